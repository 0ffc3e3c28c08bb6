/* Issue 17's C items, each a check that failed on the library before it: any int in
 * aegis_status_str, AEGIS_STOPPED after aegis_stop, a reply over the maximum refused at the
 * responder, last-call state, hop-counted nested calls from C handlers, the mailbox count
 * as a connect option, and the settled answers (second handle, watch, transfer).
 * argv[1]: the pid of the Rust instance "big" (max message 1024, r-1). */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "aegis_ipc.h"

#define CHECK(x) do { if (!(x)) { char t_[512] = ""; aegis_last_error(t_, sizeof t_, NULL); \
    printf("FAILED line %d: %s (last error: %s)\n", __LINE__, #x, t_); return 1; } } while (0)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static aegis_bus *bus;
static int respond_big_status = -1;

/* "big": first answers 2000 bytes (over the 1024-byte maximum), then 3 bytes. */
static void big_handler(void *ctx, const char *method, const uint8_t *p, size_t n, aegis_responder *r) {
    static uint8_t data[2000];
    (void)ctx; (void)method; (void)p; (void)n;
    respond_big_status = (int)aegis_respond(r, data, sizeof data);
    aegis_respond(r, (const uint8_t *)"ok!", 3);
}

/* "cloop": calls itself; answers the status of that nested call as an error. */
static void loop_handler(void *ctx, const char *method, const uint8_t *p, size_t n, aegis_responder *r) {
    uint8_t reply[64];
    size_t len = 0;
    char text[256] = "";
    aegis_call_options *o = aegis_call_options_new();
    (void)ctx; (void)method;
    aegis_call_options_set_timeouts(o, 3000, 3000);
    aegis_status s = aegis_call(bus, "cloop", "m", p, n, o, reply, sizeof reply, &len);
    aegis_call_options_free(o);
    if (s != AEGIS_OK) {
        aegis_last_error(text, sizeof text, NULL);
        aegis_respond_error(r, aegis_status_code(s) ? aegis_status_code(s) : 500, text);
    }
}

/* "ctrace": answers "<ms left> <traceparent>" of the request it handles. */
static void trace_handler(void *ctx, const char *method, const uint8_t *p, size_t n, aegis_responder *r) {
    char tp[64] = "", out[128];
    int64_t left = -1;
    (void)ctx; (void)method; (void)p; (void)n;
    if (aegis_current_traceparent(tp, sizeof tp, NULL) != AEGIS_OK) strcpy(tp, "none");
    if (aegis_current_deadline_ms(&left) != AEGIS_OK) left = -1;
    snprintf(out, sizeof out, "%lld %s", (long long)left, tp);
    aegis_respond(r, (const uint8_t *)out, strlen(out));
}

struct serving { const aegis_instance *inst; aegis_handler h; };
static void *serve_thread(void *arg) {
    struct serving *s = arg;
    aegis_serve(s->inst, s->h, NULL);
    return NULL;
}

int main(void) {
    char text[512];
    uint8_t small[4], buf[64];
    size_t len = 0, need = 0;
    aegis_buffer b = {0};
    pthread_t threads[12];

    /* 11: any int. */
    CHECK(strcmp(aegis_status_str((aegis_status)77), "unknown status") == 0);
    CHECK(strcmp(aegis_status_str(-1), "unknown status") == 0);
    CHECK(aegis_status_code(-1) == 0 && aegis_status_code((aegis_status)5031) == 503);
    CHECK(strcmp(aegis_status_str(AEGIS_TIMEOUT), "timeout") == 0);

    /* 16: the mailbox count is a connect option: 300 calls in flight from one thread. */
    CHECK(aegis_connect_with(NULL, 300, &bus) == AEGIS_OK);
    {
        static aegis_pending *p[300];
        for (int i = 0; i < 300; i++)
            CHECK(aegis_submit(bus, "echo", "m", (const uint8_t *)"x", 1, NULL, &p[i]) == AEGIS_OK);
        aegis_pending *extra = NULL;
        CHECK(aegis_submit(bus, "echo", "m", (const uint8_t *)"x", 1, NULL, &extra) == AEGIS_LIMIT_EXCEEDED);
        CHECK(aegis_try_submit(bus, "echo", "m", (const uint8_t *)"x", 1, NULL, 0, &extra) == AEGIS_NOT_READY);
        for (int i = 0; i < 300; i++) {
            CHECK(aegis_pending_wait(p[i], &b) == AEGIS_OK && b.len == 1);
            aegis_buffer_free(&b);
            aegis_pending_free(p[i]);
        }
    }

    /* 14: last-call state. */
    CHECK(aegis_last_reply(buf, sizeof buf, &len) == AEGIS_NO_REPLY);
    CHECK(aegis_call(bus, "echo", "m", (const uint8_t *)"0123456789", 10, NULL, small, sizeof small, &len) == AEGIS_BUFFER_TOO_SMALL);
    CHECK(aegis_last_error(text, sizeof text, NULL) == AEGIS_OK && strstr(text, "do not fit") != NULL);
    CHECK(aegis_call(bus, "nobody", "m", NULL, 0, NULL, buf, sizeof buf, &len) == AEGIS_NO_AVAILABLE_INSTANCE);
    CHECK(aegis_last_instance(bus, text, sizeof text, NULL) == AEGIS_OK && strcmp(text, "rust-1") == 0);
    CHECK(aegis_last_reply(buf, sizeof buf, &len) == AEGIS_NO_REPLY && len == 0);
    CHECK(aegis_last_error(text, sizeof text, NULL) == AEGIS_OK && strstr(text, "no reply") != NULL);
    CHECK(aegis_last_error(text, 4, &need) == AEGIS_BUFFER_TOO_SMALL && need > 4);
    /* ... and the text asked for is still there. */
    CHECK(aegis_last_error(text, sizeof text, NULL) == AEGIS_OK && strstr(text, "no reply") != NULL);

    /* 12: a stopped instance's receiver says STOPPED at once, whatever the timeout. */
    aegis_instance *st = NULL;
    aegis_receiver *rx = NULL;
    const char *method; const uint8_t *payload; size_t plen;
    CHECK(aegis_register(bus, "cstop", "s-1", NULL, 0, &st) == AEGIS_OK);
    CHECK(aegis_receiver_new(st, &rx) == AEGIS_OK);
    CHECK(aegis_receiver_next(rx, 10, &method, &payload, &plen) == AEGIS_NO_REQUEST);
    CHECK(aegis_last_error(text, sizeof text, NULL) == AEGIS_OK && strstr(text, "no request") != NULL);
    CHECK(aegis_stop(st) == AEGIS_OK);
    double t = now();
    for (int i = 0; i < 3; i++) CHECK(aegis_receiver_next(rx, 500, &method, &payload, &plen) == AEGIS_STOPPED);
    CHECK(now() - t < 0.5);

    /* 17: a second handle on the same instance id is refused; watch says TIMEOUT. */
    aegis_instance *dup = (aegis_instance *)1;
    CHECK(aegis_register(bus, "cstop", "s-1", NULL, 0, &dup) == AEGIS_INSTANCE_CONFLICT);
    uint32_t gen = 0;
    CHECK(aegis_watch(bus, "never-registered", &gen, 50) == AEGIS_TIMEOUT && gen == 0);
    CHECK(aegis_watch(bus, "cstop", &gen, 5000) == AEGIS_OK && gen != 0); /* known: moves at once */
    CHECK(aegis_watch(bus, "cstop", &gen, 50) == AEGIS_TIMEOUT);
    const char *ids[] = {"doc-c1"};
    CHECK(aegis_claim(st, ids, 1) == AEGIS_OK);
    CHECK(aegis_transfer(st, ids, 1, "cstop", "nobody", "r") == AEGIS_BAD_REQUEST);
    CHECK(aegis_last_error(text, sizeof text, NULL) == AEGIS_OK && strstr(text, "nobody") != NULL);
    aegis_receiver_free(rx);
    aegis_instance_free(st);

    /* 13: a reply over the maximum is refused at the responder, pull and handler style. */
    aegis_instance *big = NULL;
    CHECK(aegis_register(bus, "big", "c-big", NULL, 0, &big) == AEGIS_OK);
    aegis_call_options *only_c = aegis_call_options_new();
    CHECK(aegis_call_options_exclude(only_c, "r-1") == AEGIS_OK);
    aegis_pending *pc = NULL;
    CHECK(aegis_submit(bus, "big", "m", (const uint8_t *)"x", 1, only_c, &pc) == AEGIS_OK);
    CHECK(aegis_receiver_new(big, &rx) == AEGIS_OK);
    CHECK(aegis_receiver_next(rx, 5000, &method, &payload, &plen) == AEGIS_OK);
    static uint8_t huge[2000];
    CHECK(aegis_receiver_reply(rx, huge, sizeof huge) == AEGIS_MESSAGE_TOO_LARGE);
    CHECK(aegis_receiver_reply_error(rx, 507, "too big for me") == AEGIS_OK);
    CHECK(aegis_receiver_reply_error(rx, 507, "again") == AEGIS_INVALID_ARGUMENT);
    CHECK(aegis_pending_wait(pc, &b) == AEGIS_REMOTE && aegis_last_remote_code() == 507);
    aegis_pending_free(pc);
    aegis_receiver_free(rx);
    struct serving sb = {big, big_handler};
    CHECK(pthread_create(&threads[0], NULL, serve_thread, &sb) == 0);
    CHECK(aegis_call(bus, "big", "m", NULL, 0, only_c, buf, sizeof buf, &len) == AEGIS_OK && len == 3);
    CHECK(respond_big_status == AEGIS_MESSAGE_TOO_LARGE);
    aegis_stop(big);
    pthread_join(threads[0], NULL);
    aegis_instance_free(big);
    aegis_call_options_free(only_c);

    /* 15: a C service calling itself ends in LOOP_DETECTED, not a timeout. */
    aegis_instance *lp = NULL;
    CHECK(aegis_register(bus, "cloop", "l-1", NULL, 0, &lp) == AEGIS_OK);
    struct serving sl = {lp, loop_handler};
    for (int i = 0; i < 11; i++) CHECK(pthread_create(&threads[i], NULL, serve_thread, &sl) == 0);
    aegis_call_options *o = aegis_call_options_new();
    aegis_call_options_set_timeouts(o, 10000, 10000);
    t = now();
    aegis_status s = aegis_call(bus, "cloop", "m", (const uint8_t *)"x", 1, o, buf, sizeof buf, &len);
    aegis_last_error(text, sizeof text, NULL);
    printf("loop: %s in %.3f s: %s\n", aegis_status_str(s), now() - t, text);
    CHECK(s == AEGIS_LOOP_DETECTED);
    CHECK(strstr(text, "answered with error") == NULL);
    aegis_call_options_free(o);
    aegis_stop(lp);
    for (int i = 0; i < 11; i++) pthread_join(threads[i], NULL);
    aegis_instance_free(lp);

    /* Deadline and trace context travel with the call; outside a handler there is none. */
    char tp[64];
    CHECK(aegis_current_traceparent(tp, sizeof tp, NULL) == AEGIS_BAD_REQUEST);
    aegis_instance *tr = NULL;
    CHECK(aegis_register(bus, "ctrace", "t-1", NULL, 0, &tr) == AEGIS_OK);
    struct serving st2 = {tr, trace_handler};
    CHECK(pthread_create(&threads[0], NULL, serve_thread, &st2) == 0);
    aegis_call_options *to = aegis_call_options_new();
    CHECK(aegis_call_options_set_traceparent(to, "not-a-traceparent") == AEGIS_INVALID_ARGUMENT);
    CHECK(aegis_call_options_set_traceparent(to, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") == AEGIS_OK);
    aegis_call_options_set_timeouts(to, 1500, 1500);
    char tbuf[128] = "";
    CHECK(aegis_call(bus, "ctrace", "m", NULL, 0, to, (uint8_t *)tbuf, sizeof tbuf - 1, &len) == AEGIS_OK);
    tbuf[len] = 0;
    long long left = -2;
    char seen[64] = "";
    CHECK(sscanf(tbuf, "%lld %63s", &left, seen) == 2);
    printf("trace: %s\n", tbuf);
    CHECK(left > 0 && left <= 1500);
    CHECK(strncmp(seen, "00-4bf92f3577b34da6a3ce929d0e0e4736-", 36) == 0 && strlen(seen) == 55);
    aegis_call_options_free(to);
    aegis_stop(tr);
    pthread_join(threads[0], NULL);
    aegis_instance_free(tr);

    aegis_bus_free(bus);
    printf("all C faces hold\n");
    return 0;
}
