/* Zero-copy loans through the C ABI: a request written in place (aegis_loan), answered by
 * a C instance with a reply written in place (aegis_reply_loan), read in place by the
 * caller (aegis_reply_view), and every buffer given back. Prints "all loan faces hold" when every check passed. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "aegis_ipc.h"

#define CHECK(x) do { if (!(x)) { char t_[512] = ""; aegis_last_error(t_, sizeof t_, NULL); \
    printf("FAILED line %d: %s (last error: %s)\n", __LINE__, #x, t_); return 1; } } while (0)
#define TCHECK(x) do { if (!(x)) { char t_[512] = ""; aegis_last_error(t_, sizeof t_, NULL); \
    printf("FAILED (server) line %d: %s (last error: %s)\n", __LINE__, #x, t_); exit(1); } } while (0)

static unsigned char pattern(size_t i, unsigned seed) { return (unsigned char)((i % 251) ^ seed); }

/* "rev": the request reversed, in a reply loan. "fail": error 418. "twice": asks for a
 * loan twice (the first is given back) and answers with the second. "none": answers a
 * loan it never asked for (refused), then copies. */
static void *serve(void *arg) {
    const aegis_instance *inst = arg;
    aegis_receiver *rx = NULL;
    const char *method;
    const uint8_t *p;
    size_t n;
    uint8_t *out;
    TCHECK(aegis_receiver_new(inst, &rx) == AEGIS_OK);
    for (;;) {
        aegis_status s = aegis_receiver_next(rx, -1, &method, &p, &n);
        if (s == AEGIS_STOPPED) break;
        TCHECK(s == AEGIS_OK);
        if (strcmp(method, "fail") == 0) {
            TCHECK(aegis_receiver_reply_error(rx, 418, "asked to fail") == AEGIS_OK);
            continue;
        }
        if (strcmp(method, "none") == 0) {
            TCHECK(aegis_receiver_reply_loan(rx) == AEGIS_INVALID_ARGUMENT);
            TCHECK(aegis_receiver_reply(rx, p, n) == AEGIS_OK);
            continue;
        }
        if (strcmp(method, "twice") == 0) TCHECK(aegis_reply_loan(rx, n, &out) == AEGIS_OK);
        TCHECK(aegis_reply_loan(rx, n, &out) == AEGIS_OK);
        for (size_t i = 0; i < n; i++) out[i] = p[n - 1 - i];
        TCHECK(aegis_receiver_reply_loan(rx) == AEGIS_OK);
    }
    aegis_receiver_free(rx);
    return NULL;
}

/* One loaned call of `len` bytes to `method`; checks the reversed reply. */
static int loaned_call(aegis_bus *bus, const char *method, size_t len, unsigned seed) {
    aegis_request_loan *loan = NULL;
    aegis_reply_view *view = NULL;
    uint8_t *w = NULL;
    const uint8_t *r = NULL, *again = NULL;
    size_t rlen = 0, alen = 0;
    CHECK(aegis_loan(bus, "cloan", len, &loan, &w) == AEGIS_OK && loan && (w || len == 0));
    for (size_t i = 0; i < len; i++) w[i] = pattern(i, seed);
    CHECK(aegis_call_loan(bus, "cloan", method, loan, NULL, &view, &r, &rlen) == AEGIS_OK);
    CHECK(view != NULL && rlen == len);
    for (size_t i = 0; i < len; i++) CHECK(r[i] == pattern(len - 1 - i, seed));
    CHECK(aegis_reply_view_bytes(view, &again, &alen) == AEGIS_OK && again == r && alen == rlen);
    aegis_reply_view_free(view);
    return 0;
}

int main(void) {
    aegis_bus *server = NULL, *bus = NULL;
    aegis_instance *inst = NULL;
    pthread_t t;
    static const size_t sizes[] = {0, 1, 100, 4096, 256 << 10, 12 << 20};

    CHECK(aegis_connect(NULL, &server) == AEGIS_OK);
    CHECK(aegis_register(server, "cloan", "c-1", NULL, 0, &inst) == AEGIS_OK);
    CHECK(pthread_create(&t, NULL, serve, inst) == 0);
    CHECK(aegis_connect(NULL, &bus) == AEGIS_OK);

    for (unsigned k = 0; k < sizeof sizes / sizeof sizes[0]; k++)
        CHECK(loaned_call(bus, "rev", sizes[k], k) == 0);
    /* Memory comes back: the channel's request heap holds 32 MiB, so a leaked 12 MiB loan or view
     * would fail the third round. */
    for (unsigned k = 0; k < 8; k++) CHECK(loaned_call(bus, "twice", 12 << 20, k) == 0);
    for (unsigned k = 0; k < 8; k++) {
        aegis_request_loan *loan = NULL;
        uint8_t *w = NULL;
        CHECK(aegis_loan(bus, "cloan", 12 << 20, &loan, &w) == AEGIS_OK);
        aegis_loan_free(loan);
    }
    /* Over the service's largest message; more than the channel's heap holds; NULL
     * arguments; an error answer returns no view. */
    {
        aegis_request_loan *loan = NULL;
        aegis_reply_view *view = (aegis_reply_view *)1;
        uint8_t *w = NULL;
        const uint8_t *r = NULL;
        size_t rlen = 7;
        CHECK(aegis_loan(bus, "cloan", (size_t)64 << 20, &loan, &w) == AEGIS_MESSAGE_TOO_LARGE);
        {
            aegis_request_loan *a = NULL, *b = NULL;
            CHECK(aegis_loan(bus, "cloan", 12 << 20, &a, &w) == AEGIS_OK);
            CHECK(aegis_loan(bus, "cloan", 12 << 20, &b, &w) == AEGIS_OK);
            CHECK(aegis_loan(bus, "cloan", 12 << 20, &loan, &w) == AEGIS_LIMIT_EXCEEDED);
            aegis_loan_free(a);
            aegis_loan_free(b);
        }
        CHECK(aegis_loan(bus, "cloan", 8, NULL, &w) == AEGIS_NULL_ARGUMENT);
        CHECK(aegis_loan(bus, NULL, 8, &loan, &w) == AEGIS_NULL_ARGUMENT);
        CHECK(aegis_loan(bus, "nobody", 8, &loan, &w) == AEGIS_NO_AVAILABLE_INSTANCE);
        CHECK(aegis_call_loan(bus, "cloan", "rev", NULL, NULL, &view, &r, &rlen) == AEGIS_NULL_ARGUMENT);
        CHECK(aegis_loan(bus, "cloan", 8, &loan, &w) == AEGIS_OK);
        CHECK(aegis_call_loan(bus, "cloan", "fail", loan, NULL, &view, &r, &rlen) == AEGIS_REMOTE);
        CHECK(aegis_last_remote_code() == 418 && view == NULL && r == NULL && rlen == 0);
        /* A loan goes to the service it was made for. */
        CHECK(aegis_loan(bus, "cloan", 8, &loan, &w) == AEGIS_OK);
        CHECK(aegis_call_loan(bus, "nobody", "rev", loan, NULL, &view, &r, &rlen) == AEGIS_BAD_REQUEST);
        /* A copied request with the reply read in place; a handler answering a loan it
         * never asked for is refused and can still answer. */
        CHECK(aegis_call_view(bus, "cloan", "rev", (const uint8_t *)"abc", 3, NULL, &view, &r, &rlen) == AEGIS_OK);
        CHECK(rlen == 3 && memcmp(r, "cba", 3) == 0);
        aegis_reply_view_free(view);
        CHECK(aegis_call_view(bus, "cloan", "none", (const uint8_t *)"abc", 3, NULL, &view, &r, &rlen) == AEGIS_OK);
        CHECK(rlen == 3 && memcmp(r, "abc", 3) == 0);
        aegis_reply_view_free(view);
        aegis_reply_view_free(NULL);
        aegis_loan_free(NULL);
    }
    /* Pipelined: four 1 MiB loans submitted at once, each reply read in place; a fifth
     * freed unread; then loans of 12, 12 and 7 MiB fit the 32 MiB heap again (had one
     * 1 MiB block not come back, the third would not). */
    {
        aegis_pending *p[5] = {NULL};
        aegis_reply_view *view = NULL;
        aegis_request_loan *loan = NULL;
        uint8_t *w = NULL;
        const uint8_t *r = NULL;
        size_t rlen = 0, len = 1 << 20;
        for (unsigned k = 0; k < 5; k++) {
            CHECK(aegis_loan(bus, "cloan", len, &loan, &w) == AEGIS_OK);
            for (size_t i = 0; i < len; i++) w[i] = pattern(i, 20 + k);
            CHECK(aegis_submit_loan(bus, "cloan", "rev", loan, NULL, &p[k]) == AEGIS_OK && p[k]);
        }
        for (unsigned k = 0; k < 4; k++) {
            CHECK(aegis_pending_wait_view(p[k], &view, &r, &rlen) == AEGIS_OK);
            CHECK(view != NULL && rlen == len);
            for (size_t i = 0; i < len; i++) CHECK(r[i] == pattern(len - 1 - i, 20 + k));
            aegis_reply_view_free(view);
            CHECK(aegis_pending_wait_view(p[k], &view, &r, &rlen) == AEGIS_INVALID_ARGUMENT);
            CHECK(view == NULL);
            aegis_pending_free(p[k]);
        }
        aegis_pending_free(p[4]);
        CHECK(aegis_submit_loan(bus, "cloan", "rev", NULL, NULL, &p[0]) == AEGIS_NULL_ARGUMENT);
        /* The one serving thread answers in order: once this is answered, the freed call
         * is settled and its block can come back. */
        CHECK(aegis_call_view(bus, "cloan", "rev", (const uint8_t *)"x", 1, NULL, &view, &r, &rlen) == AEGIS_OK);
        aegis_reply_view_free(view);
        {
            aegis_request_loan *a = NULL, *b = NULL, *c = NULL;
            CHECK(aegis_loan(bus, "cloan", 12 << 20, &a, &w) == AEGIS_OK);
            CHECK(aegis_loan(bus, "cloan", 12 << 20, &b, &w) == AEGIS_OK);
            CHECK(aegis_loan(bus, "cloan", 7 << 20, &c, &w) == AEGIS_OK);
            aegis_loan_free(a);
            aegis_loan_free(b);
            aegis_loan_free(c);
        }
    }
    /* By resource id: a loan made for the owner of "doc-1", answered in place; refused
     * for an id nobody owns, and for another id than the one it was made for. */
    {
        static const char *const ids[] = {"doc-1", "doc-2"};
        aegis_request_loan *loan = NULL;
        aegis_reply_view *view = NULL;
        uint8_t *w = NULL;
        const uint8_t *r = NULL;
        size_t rlen = 0, len = 256 << 10;
        CHECK(aegis_claim(inst, ids, 2) == AEGIS_OK);
        CHECK(aegis_loan_resource(bus, "doc-1", len, &loan, &w) == AEGIS_OK && loan && w);
        for (size_t i = 0; i < len; i++) w[i] = pattern(i, 9);
        CHECK(aegis_call_resource_loan(bus, "doc-1", "rev", loan, NULL, &view, &r, &rlen) == AEGIS_OK);
        CHECK(view != NULL && rlen == len);
        for (size_t i = 0; i < len; i++) CHECK(r[i] == pattern(len - 1 - i, 9));
        aegis_reply_view_free(view);
        CHECK(aegis_loan_resource(bus, "doc-none", 8, &loan, &w) == AEGIS_RESOURCE_NOT_FOUND);
        CHECK(aegis_loan_resource(bus, "doc-1", 8, NULL, &w) == AEGIS_NULL_ARGUMENT);
        CHECK(aegis_loan_resource(bus, "doc-1", 8, &loan, &w) == AEGIS_OK);
        CHECK(aegis_call_resource_loan(bus, "doc-2", "rev", loan, NULL, &view, &r, &rlen) == AEGIS_BAD_REQUEST);
        CHECK(view == NULL);
        CHECK(aegis_call_resource_loan(bus, "doc-1", "rev", NULL, NULL, &view, &r, &rlen) == AEGIS_NULL_ARGUMENT);
    }
    aegis_stop(inst);
    pthread_join(t, NULL);
    aegis_instance_free(inst);
    aegis_bus_free(bus);
    aegis_bus_free(server);
    printf("all loan faces hold\n");
    return 0;
}
