/* An echo instance in C: registers instance ARGV[2] of service ARGV[1] and answers every
 * request with its own payload until SIGTERM/SIGINT. Prints "ready" once registered.
 * Build: cc echo_server.c $(pkg-config --cflags --libs aegis-ipc) -o echo_server */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "aegis_ipc.h"

static aegis_instance *instance;

static void on_signal(int sig) {
    (void)sig;
    aegis_stop(instance); /* wakes the serving thread; aegis_serve returns */
}

static void echo(void *ctx, const char *method, const uint8_t *payload, size_t len,
                 aegis_responder *r) {
    (void)ctx;
    if (strcmp(method, "fail") == 0) {
        aegis_respond_error(r, 418, "asked to fail");
        return;
    }
    aegis_respond(r, payload, len);
}

static int die(const char *what, aegis_status s) {
    char text[512];
    aegis_last_error(text, sizeof text, NULL);
    fprintf(stderr, "%s: %s (%s)\n", what, aegis_status_str(s), text);
    return 1;
}

int main(int argc, char **argv) {
    const char *service = argc > 1 ? argv[1] : "echo";
    const char *id = argc > 2 ? argv[2] : "c-echo";
    const char *metadata[] = {"lang", "c"};
    aegis_bus *bus = NULL;
    aegis_status s = aegis_connect(NULL, &bus); /* AEGIS_IPC_DIR or the default directory */
    if (s != AEGIS_OK) return die("connect", s);
    s = aegis_register(bus, service, id, metadata, 1, &instance);
    if (s != AEGIS_OK) {
        aegis_bus_free(bus);
        return die("register", s);
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("ready %s %s\n", service, id);
    fflush(stdout);
    s = aegis_serve(instance, echo, NULL);
    aegis_instance_free(instance); /* unregisters */
    aegis_bus_free(bus);
    return s == AEGIS_OK ? 0 : die("serve", s);
}
