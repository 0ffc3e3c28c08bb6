/* Round-trip latency of aegis_call from C: ARGV[2] calls (1 KiB) to service ARGV[1] after a
 * warm-up; prints calls/s and the p50/p99 in microseconds (clock_gettime per call). */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "aegis_ipc.h"

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const char *service = argc > 1 ? argv[1] : "echo";
    int n = argc > 2 ? atoi(argv[2]) : 200000;
    uint8_t payload[1024], reply[1024];
    size_t len;
    double *lat = malloc(sizeof(double) * (size_t)n);
    aegis_bus *bus = NULL;
    if (!lat || aegis_connect(NULL, &bus) != AEGIS_OK) return 1;
    memset(payload, 7, sizeof payload);
    for (int i = 0; i < n / 10; i++) /* warm-up */
        if (aegis_call(bus, service, "echo", payload, sizeof payload, NULL, reply, sizeof reply, &len) != AEGIS_OK) return 1;
    double start = now_us();
    for (int i = 0; i < n; i++) {
        double t = now_us();
        if (aegis_call(bus, service, "echo", payload, sizeof payload, NULL, reply, sizeof reply, &len) != AEGIS_OK) return 1;
        lat[i] = now_us() - t;
    }
    double total = now_us() - start;
    qsort(lat, (size_t)n, sizeof(double), cmp);
    printf("C: %d calls, %.0f calls/s, p50 %.2f us, p99 %.2f us\n", n, n / total * 1e6,
           lat[n / 2], lat[n * 99 / 100]);
    free(lat);
    aegis_bus_free(bus);
    return 0;
}
