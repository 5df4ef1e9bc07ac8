/*
 * unik guest init: PID 1 of every unik micro-VM. The initramfs holds this program, the app and a
 * few protocol files (see unik/guest/__init__.py for the full list):
 *
 *   /unik/modules          kernel modules to load, one absolute path per line, in order
 *   /unik/entrypoint       argv prefix, NUL-separated words (default "/unik/app")
 *   /unik/args             default arguments, NUL-separated
 *   /unik/env              baked environment, NUL-separated KEY=VALUE
 *   /unik/run/args         per-boot arguments: replace /unik/args when present
 *   /unik/run/env          per-boot environment: applied after /unik/env, wins on conflicts
 *   /unik/run/hostname     per-boot hostname, one line
 *   /unik/run/stop_timeout seconds between SIGTERM and SIGKILL on a graceful stop (default 5)
 *
 * Console protocol: when the app is gone, init prints exactly one of
 *
 *   "\nunik: exit status N\n"        the app exited with status N (127: it could not be run)
 *   "\nunik: killed by signal N\n"   the app died from signal N
 *
 * (the leading newline guarantees the line starts at column 0 even if the app's last line had
 * no newline; the serial tty turns "\n" into "\r\n"). Then it writes the code (N, or 128+N for
 * a signal) to the isa-debug-exit port 0xf4, so qemu exits with status ((code << 1) | 1) & 0xff,
 * and falls back to an ACPI power-off (qemu exit status 0) when that device is absent.
 *
 * A graceful stop is SIGINT (ctrl-alt-del on -M pc, thanks to RB_DISABLE_CAD) or SIGTERM: the
 * app's process group gets SIGTERM, then SIGKILL after the stop timeout.
 *
 * PID 1 must never exit (that panics the kernel), so every path ends in power-off or sleep.
 * No linux/ headers: musl-gcc does not see the kernel headers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DEBUG_EXIT_PORT 0xf4
#define DEFAULT_STOP_TIMEOUT 5

static int console = 2;

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;
	/* A short write to the console is not worth a retry loop: these lines are tiny. */
	(void)!write(console, buf, (size_t)n);
}

/* Whole file, NUL-terminated; NULL if it does not exist. *len excludes the added NUL. */
static char *slurp(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap);
	for (;;) {
		if (!buf) {
			close(fd);
			return NULL;
		}
		if (n + 1 >= cap) {
			cap *= 2;
			char *bigger = realloc(buf, cap);
			if (!bigger)
				free(buf);
			buf = bigger;
			continue;
		}
		ssize_t r = read(fd, buf + n, cap - n - 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	buf[n] = '\0';
	if (len)
		*len = n;
	return buf;
}

/* Append the NUL-separated words of a file to a growing argv-style array. */
static void add_words(const char *path, char ***vec, size_t *count)
{
	size_t len;
	char *data = slurp(path, &len);
	if (!data)
		return;
	for (size_t i = 0; i < len;) {
		size_t wl = strlen(data + i);
		char **bigger = realloc(*vec, (*count + 2) * sizeof **vec);
		if (!bigger)
			return;
		*vec = bigger;
		(*vec)[(*count)++] = data + i;
		(*vec)[*count] = NULL;
		i += wl + 1;
	}
}

static void load_env(const char *path)
{
	char **vars = NULL;
	size_t n = 0;
	add_words(path, &vars, &n);
	for (size_t i = 0; i < n; i++) {
		char *eq = strchr(vars[i], '=');
		if (!eq || eq == vars[i])
			continue;
		*eq = '\0';
		setenv(vars[i], eq + 1, 1);
	}
}

static void mount_fs(const char *type, const char *dir, const char *data)
{
	mkdir(dir, 0755);
	if (mount(type, dir, type, MS_NOSUID | (strcmp(type, "devtmpfs") ? MS_NODEV : 0), data) < 0 &&
	    errno != EBUSY)
		say("unik: cannot mount %s on %s: %s\n", type, dir, strerror(errno));
}

static void load_modules(void)
{
	char *list = slurp("/unik/modules", NULL);
	if (!list)
		return;
	for (char *line = strtok(list, "\n"); line; line = strtok(NULL, "\n")) {
		if (!*line)
			continue;
		int fd = open(line, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			say("unik: cannot open module %s: %s\n", line, strerror(errno));
			continue;
		}
		/* Keep going on failure: the app may not even need that device. */
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			say("unik: cannot load module %s: %s\n", line, strerror(errno));
		close(fd);
	}
	free(list);
}

static void set_hostname(void)
{
	char *name = slurp("/unik/run/hostname", NULL);
	if (!name)
		return;
	name[strcspn(name, "\r\n")] = '\0';
	if (*name && sethostname(name, strlen(name)) < 0)
		say("unik: cannot set hostname: %s\n", strerror(errno));
	free(name);
}

static int stop_timeout(void)
{
	char *text = slurp("/unik/run/stop_timeout", NULL);
	if (!text)
		return DEFAULT_STOP_TIMEOUT;
	char *end;
	long v = strtol(text, &end, 10);
	int ok = end != text && v >= 0 && v <= 86400;
	free(text);
	return ok ? (int)v : DEFAULT_STOP_TIMEOUT;
}

static pid_t start_app(char **argv)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;

	/* Child: undo what PID 1 set up for itself. */
	sigset_t none;
	sigemptyset(&none);
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	signal(SIGCHLD, SIG_DFL);
	sigprocmask(SIG_SETMASK, &none, NULL);
	setsid();
	int fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	(void)!chdir("/");
	execvp(argv[0], argv);
	say("unik: cannot run %s: %s\n", argv[0], strerror(errno));
	_exit(127);
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void signal_app(pid_t app, int sig)
{
	/* The app may have left its process group; then at least the app itself gets it. */
	if (kill(-app, sig) < 0)
		kill(app, sig);
}

/* Supervise the app until it is gone; returns its wait status. Reaps every other child too. */
static int supervise(pid_t app, const sigset_t *mask)
{
	int app_status = 0;
	int stopping = 0;
	long long kill_at = 0;
	int timeout_s = stop_timeout();

	for (;;) {
		/* Reap first: SIGCHLD may have been merged with an earlier one. */
		int status;
		pid_t pid;
		while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
			if (pid == app)
				return status;
		}
		if (pid < 0 && errno == ECHILD)
			return app_status; /* not reachable while the app lives; defensive */

		siginfo_t info;
		int sig;
		if (stopping) {
			long long left = kill_at - now_ms();
			if (left <= 0) {
				signal_app(app, SIGKILL);
				kill_at = now_ms() + 3600 * 1000LL; /* SIGKILL once; then just wait */
				continue;
			}
			struct timespec ts = { left / 1000, (left % 1000) * 1000000 };
			sig = sigtimedwait(mask, &info, &ts);
		} else {
			sig = sigwaitinfo(mask, &info);
		}
		if (sig < 0)
			continue; /* EAGAIN (deadline) or EINTR */
		if ((sig == SIGINT || sig == SIGTERM) && !stopping) {
			stopping = 1;
			kill_at = now_ms() + (long long)timeout_s * 1000;
			signal_app(app, SIGTERM);
		}
	}
}

static void finish(int code)
{
	/* Nothing may keep writing while the disks are synced. */
	kill(-1, SIGKILL);
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	sync();
	if (ioperm(DEBUG_EXIT_PORT, 4, 1) == 0)
		outl((unsigned int)code, DEBUG_EXIT_PORT);
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

int main(void)
{
	/* First: until this runs, ctrl-alt-del would hard-reboot the VM. */
	reboot(RB_DISABLE_CAD);

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &mask, NULL);

	mount_fs("devtmpfs", "/dev", "mode=0755");
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (fd >= 0)
		console = fd;
	mount_fs("proc", "/proc", NULL);
	mount_fs("sysfs", "/sys", NULL);
	mount_fs("tmpfs", "/tmp", "mode=1777");

	load_modules();
	set_hostname();

	/* The kernel hands init its leftover command-line words as environment: not the app's. */
	clearenv();
	setenv("PATH", "/unik:/bin:/usr/bin", 1);
	setenv("HOME", "/", 1);
	load_env("/unik/env");
	load_env("/unik/run/env");

	char **argv = NULL;
	size_t argc = 0;
	add_words("/unik/entrypoint", &argv, &argc);
	if (argc == 0) {
		static char app[] = "/unik/app";
		argv = realloc(argv, 2 * sizeof *argv);
		if (!argv)
			finish(127);
		argv[argc++] = app;
		argv[argc] = NULL;
	}
	if (access("/unik/run/args", F_OK) == 0)
		add_words("/unik/run/args", &argv, &argc);
	else
		add_words("/unik/args", &argv, &argc);

	pid_t app = start_app(argv);
	if (app < 0) {
		say("unik: cannot run %s: %s\n", argv[0], strerror(errno));
		say("\nunik: exit status 127\n");
		finish(127);
	}

	int status = supervise(app, &mask);
	int code;
	if (WIFSIGNALED(status)) {
		say("\nunik: killed by signal %d\n", WTERMSIG(status));
		code = 128 + WTERMSIG(status);
	} else {
		code = WEXITSTATUS(status);
		say("\nunik: exit status %d\n", code);
	}
	finish(code);
	return 0;
}
