/* A caller in C: calls method "echo" of service ARGV[1] ARGV[2] times with a 1 KiB payload,
 * checks each reply, prints who answered the last one; then shows an error's detail.
 * Build: cc client.c $(pkg-config --cflags --libs aegis-ipc) -o client */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aegis_ipc.h"

static int die(const char *what, aegis_status s) {
    char text[1024];
    aegis_last_error(text, sizeof text, NULL);
    fprintf(stderr, "%s: %s (code %u): %s\n", what, aegis_status_str(s), aegis_status_code(s), text);
    return 1;
}

int main(int argc, char **argv) {
    const char *service = argc > 1 ? argv[1] : "echo";
    int calls = argc > 2 ? atoi(argv[2]) : 1000;
    uint8_t payload[1024], reply[1024];
    size_t len = 0;
    char who[256];
    aegis_bus *bus = NULL;
    aegis_call_options *opts = aegis_call_options_new();
    aegis_status s = aegis_connect(NULL, &bus);
    if (s != AEGIS_OK) return die("connect", s);
    aegis_call_options_set_timeouts(opts, 5000, 0);
    for (int i = 0; i < calls; i++) {
        memset(payload, i & 0xff, sizeof payload);
        s = aegis_call(bus, service, "echo", payload, sizeof payload, opts, reply, sizeof reply, &len);
        if (s != AEGIS_OK) return die("call", s);
        if (len != sizeof payload || memcmp(reply, payload, len) != 0) {
            fprintf(stderr, "call %d: wrong reply\n", i);
            return 1;
        }
    }
    aegis_last_instance(bus, who, sizeof who, NULL);
    printf("%d calls ok, last answered by %s\n", calls, who);
    /* An error carries its detail: here, the handler's own code and message. */
    s = aegis_call(bus, service, "fail", NULL, 0, opts, reply, sizeof reply, &len);
    if (s == AEGIS_REMOTE) {
        char text[256];
        aegis_last_error(text, sizeof text, NULL);
        printf("fail -> %s %u: %s\n", aegis_status_str(s), aegis_last_remote_code(), text);
    }
    aegis_call_options_free(opts);
    aegis_bus_free(bus);
    return 0;
}
