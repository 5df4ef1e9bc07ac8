/* The smallest useful unik app: greets, shows its arguments, then keeps logging. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile sig_atomic_t stopping;

static void on_term(int sig) { (void)sig; stopping = 1; }

int main(int argc, char **argv) {
    const char *greeting = getenv("GREETING");
    signal(SIGTERM, on_term);
    printf("hello from unik: %s\n", greeting ? greeting : "(no GREETING set)");
    for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);
    fflush(stdout);
    for (int tick = 1; !stopping && (getenv("TICKS") == NULL || tick <= atoi(getenv("TICKS"))); tick++) {
        printf("tick %d\n", tick);
        fflush(stdout);
        sleep(1);
    }
    printf("goodbye\n");
    return 0;
}
