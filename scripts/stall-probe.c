/* stall-probe: how long this host keeps a real-time thread from running.
 *
 * One thread per CPU, pinned, at SCHED_FIFO priority 90, sleeps 200 µs again and again
 * and reports every wake-up that came more than 2 ms late. Nothing in the guest can make
 * such a thread wait (it preempts every normal thread), so what it reports is the host's
 * doing (the vCPU not running, or a timer interrupt delivered late) or a kernel section
 * with preemption off: the floor under any latency tail measured on this machine.
 *
 *   gcc -O2 -pthread -o /tmp/stall-probe scripts/stall-probe.c
 *   sudo /tmp/stall-probe 8        # 8 seconds; run it idle, then beside a benchmark
 *
 * Output: one line per late wake-up (seconds since start, CPU, how late), then a
 * summary per CPU.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double seconds;
static double start;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

struct result {
    int cpu;
    int late;
    double worst_ms;
};

static void *probe(void *arg) {
    struct result *r = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(r->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    struct sched_param p = {.sched_priority = 90};
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &p) != 0)
        fprintf(stderr, "cpu %d: no SCHED_FIFO (not root?): normal priority\n", r->cpu);
    const double nap = 200e-6;
    struct timespec ts = {0, (long)(nap * 1e9)};
    double prev = now();
    while (prev - start < seconds) {
        nanosleep(&ts, NULL);
        double t = now();
        double late = t - prev - nap;
        if (late > 0.002) {
            r->late++;
            if (late * 1e3 > r->worst_ms)
                r->worst_ms = late * 1e3;
            printf("%.3f cpu %d late %.2f ms\n", t - start, r->cpu, late * 1e3);
        }
        prev = t;
    }
    return NULL;
}

int main(int argc, char **argv) {
    seconds = argc > 1 ? atof(argv[1]) : 8.0;
    int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 1 || cpus > 256)
        cpus = 1;
    pthread_t th[256];
    struct result res[256] = {0};
    start = now();
    for (int i = 0; i < cpus; i++) {
        res[i].cpu = i;
        pthread_create(&th[i], NULL, probe, &res[i]);
    }
    for (int i = 0; i < cpus; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < cpus; i++)
        printf("cpu %d: %d wake-ups over 2 ms late in %.0f s, worst %.2f ms\n", i, res[i].late,
               seconds, res[i].worst_ms);
    return 0;
}
