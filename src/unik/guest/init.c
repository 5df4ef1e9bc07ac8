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
 *   /unik/run/mounts       volumes to mount before the app: "SERIAL MOUNTPOINT FSTYPE" lines
 *   /unik/run/mount_timeout seconds to wait for each boot volume's disk to appear (default 15,
 *                          at most 3600): an EBS volume is attached only once the instance runs
 *   /unik/run/net          per-boot network: address=A.B.C.D/N, gateway=... lines (and dns=,
 *                          read only by older images' inits: /etc/resolv.conf is in the archive),
 *                          or address=dhcp: ask the network's DHCP server (bootable disks);
 *                          with config=imds as well, once leased, the EC2 user-data from the
 *                          instance metadata service (IMDSv2) is a run archive unpacked over
 *                          this one (all but the network, already up); none (404) or no
 *                          answer within ~10 s: the baked run configuration stays
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
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
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

/*
 * Boot-time memory comes from a bump arena in .bss, not the heap: musl's first malloc() sets
 * its heap up, code nothing else in the boot runs, and under TCG that first run alone cost
 * ~6 ms of a ~0.6 s boot. Arena blocks are never reused (the boot needs a few KiB); when the
 * arena is full, take() falls back to the heap, and drop() frees only heap blocks.
 */
static char arena[64 * 1024];
static size_t arena_used;

static void *take(size_t size)
{
	size = (size + 15) & ~(size_t)15;
	if (size > sizeof arena - arena_used)
		return malloc(size);
	void *block = arena + arena_used;
	arena_used += size;
	return block;
}

static void drop(void *block)
{
	if ((char *)block < arena || (char *)block >= arena + sizeof arena)
		free(block);
}

/* Whole file, NUL-terminated; NULL if it does not exist. *len excludes the added NUL. */
static char *slurp(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	struct stat st;
	/* Regular files say their size; sysfs and procfs files say 4096 or 0. */
	size_t cap = fstat(fd, &st) == 0 && st.st_size > 0 && st.st_size < (1 << 20) ? (size_t)st.st_size + 1 : 4096;
	size_t n = 0;
	char *buf = take(cap);
	for (;;) {
		if (!buf) {
			close(fd);
			return NULL;
		}
		if (n + 1 >= cap) {
			char *bigger = take(cap * 2);
			if (bigger)
				memcpy(bigger, buf, n);
			drop(buf);
			buf = bigger;
			cap *= 2;
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

/* A NULL-terminated array of strings (an argv or an environment) that grows in the arena. */
struct words {
	char **at;
	size_t count, cap;
};

static void push_word(struct words *words, char *word)
{
	if (words->count + 2 > words->cap) {
		size_t cap = words->cap ? words->cap * 2 : 32;
		char **bigger = take(cap * sizeof *bigger);
		if (!bigger)
			return;
		if (words->count)
			memcpy(bigger, words->at, words->count * sizeof *bigger);
		drop(words->at);
		words->at = bigger;
		words->cap = cap;
	}
	words->at[words->count++] = word;
	words->at[words->count] = NULL;
}

/* Append the NUL-separated words of a file. */
static void add_words(const char *path, struct words *words)
{
	size_t len;
	char *data = slurp(path, &len);
	if (!data)
		return;
	for (size_t i = 0; i < len; i += strlen(data + i) + 1)
		push_word(words, data + i);
}

/* KEY=VALUE words; a later KEY replaces an earlier one in place, as setenv() would. */
static void put_env(struct words *env, char *pair)
{
	size_t key_len = strcspn(pair, "=");
	if (key_len == 0 || pair[key_len] != '=')
		return;
	for (size_t i = 0; i < env->count; i++) {
		if (strncmp(env->at[i], pair, key_len + 1) == 0) {
			env->at[i] = pair;
			return;
		}
	}
	push_word(env, pair);
}

static void load_env(const char *path, struct words *env)
{
	struct words pairs = { 0 };
	add_words(path, &pairs);
	for (size_t i = 0; i < pairs.count; i++)
		put_env(env, pairs.at[i]);
}

/*
 * The run archive through qemu's fw_cfg. The instances of a big image all boot the image's own
 * initrd file (shared, never copied); each then gets its run archive, the same newc cpio the
 * host otherwise appends to a copy of that initrd, as the fw_cfg file opt/unik/run. Init
 * unpacks it as the kernel would have: directories and regular files, nothing else.
 */
#define FW_CFG_RUN_ARCHIVE "/sys/firmware/qemu_fw_cfg/by_name/opt/unik/run/raw"
#define CPIO_HEADER_LEN 110

static unsigned long cpio_field(const char *header, int index)
{
	char hex[9];
	memcpy(hex, header + 6 + 8 * index, 8); /* after the 6-byte magic, 8 hex digits each */
	hex[8] = '\0';
	return strtoul(hex, NULL, 16);
}

/* A run archive in memory, from fw_cfg or from the instance metadata service. */
static void unpack_archive(const char *data, size_t len)
{
	size_t at = 0;
	while (at + CPIO_HEADER_LEN <= len && memcmp(data + at, "070701", 6) == 0) {
		const char *header = data + at;
		unsigned long mode = cpio_field(header, 1), size = cpio_field(header, 6);
		unsigned long name_len = cpio_field(header, 11);
		size_t body = (at + CPIO_HEADER_LEN + name_len + 3) & ~(size_t)3;
		if (name_len == 0 || body > len || size > len - body || header[CPIO_HEADER_LEN + name_len - 1] != '\0')
			break;
		const char *name = header + CPIO_HEADER_LEN;
		if (strcmp(name, "TRAILER!!!") == 0)
			break;
		char path[512];
		if (snprintf(path, sizeof path, "/%s", name) >= (int)sizeof path) {
			say("unik: run archive entry name too long: %.64s...\n", name);
		} else if (S_ISDIR(mode)) {
			if (mkdir(path, mode & 07777) < 0 && errno == EEXIST)
				chmod(path, mode & 07777);
		} else if (S_ISREG(mode)) {
			int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode & 07777);
			if (fd < 0 || write(fd, data + body, size) != (ssize_t)size)
				say("unik: cannot write %s from the run archive: %s\n", path, strerror(errno));
			if (fd >= 0)
				close(fd);
		}
		at = (body + size + 3) & ~(size_t)3;
	}
}

static void unpack_run_archive(void)
{
	size_t len;
	char *data = slurp(FW_CFG_RUN_ARCHIVE, &len);
	if (!data)
		return;
	unpack_archive(data, len);
	drop(data);
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
	drop(list);
}

static void set_hostname(void)
{
	char *name = slurp("/unik/run/hostname", NULL);
	if (!name)
		return;
	name[strcspn(name, "\r\n")] = '\0';
	if (*name && sethostname(name, strlen(name)) < 0)
		say("unik: cannot set hostname: %s\n", strerror(errno));
	drop(name);
}

/* A per-boot number of seconds; the default when the file is absent, malformed or out of range. */
static int run_seconds(const char *path, int max, int fallback)
{
	char *text = slurp(path, NULL);
	if (!text)
		return fallback;
	char *end;
	long v = strtol(text, &end, 10);
	int ok = end != text && v >= 0 && v <= max;
	drop(text);
	return ok ? (int)v : fallback;
}

static int stop_timeout(void)
{
	return run_seconds("/unik/run/stop_timeout", 86400, DEFAULT_STOP_TIMEOUT);
}


static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Volumes. A volume is a disk whose serial is the volume's id, so init finds it whatever order
 * the disks were probed in: a virtio-blk disk says it in /sys/block/vd<x>/serial (the id's first
 * 20 characters: virtio-blk's limit), an NVMe one (an EBS volume: "vol" and the id's hex digits)
 * in /sys/block/nvme<x>n<y>/device/serial, the controller's, which NVMe pads with spaces.
 * At boot /unik/run/mounts lists "SERIAL MOUNTPOINT FSTYPE" lines; while the app runs the daemon
 * sends the same words as "TAG mount ..." over the control channel, and "TAG umount MOUNTPOINT"
 * before it unplugs a disk.
 */
#define MAX_MOUNTS 64
#define DISK_WAIT_MS 15000
#define MAX_MOUNT_TIMEOUT 3600

static char *mounted[MAX_MOUNTS];

/* 1 if the sysfs file holds this serial, trailing whitespace aside; 0 if not or if it is absent.
 * A stack buffer, not slurp(): this runs every 20 ms while a disk is awaited, and arena blocks
 * are never reused. */
static int serial_is(const char *path, const char *serial)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	char text[128];
	ssize_t n = read(fd, text, sizeof text - 1);
	close(fd);
	if (n <= 0)
		return 0;
	while (n > 0 && (text[n - 1] == '\0' || isspace((unsigned char)text[n - 1])))
		n--;
	text[n] = '\0';
	return strcmp(text, serial) == 0;
}

/* The one lookup of boot volumes and hot-plugged ones: virtio-blk's own serial file first (the
 * usual disk, one open per disk), then the device's (NVMe, and any other driver that has one). */
static int find_disk(const char *serial, char *dev, size_t devlen)
{
	DIR *dir = opendir("/sys/block");
	if (!dir)
		return -1;
	struct dirent *entry;
	int found = -1;
	while (found < 0 && (entry = readdir(dir)) != NULL) {
		if (entry->d_name[0] == '.')
			continue;
		char path[300];
		snprintf(path, sizeof path, "/sys/block/%s/serial", entry->d_name);
		int match = serial_is(path, serial);
		if (!match && strncmp(entry->d_name, "vd", 2) != 0) {
			snprintf(path, sizeof path, "/sys/block/%s/device/serial", entry->d_name);
			match = serial_is(path, serial);
		}
		if (match) {
			snprintf(dev, devlen, "/dev/%s", entry->d_name);
			found = 0;
		}
	}
	closedir(dir);
	return found;
}

/* A graceful stop (SIGINT, SIGTERM: blocked, so pending) must not wait out a long disk wait. */
static int stop_pending(void)
{
	sigset_t pending;
	return sigpending(&pending) == 0 && (sigismember(&pending, SIGINT) || sigismember(&pending, SIGTERM));
}

static void mkdirs(const char *path)
{
	char buf[512];
	snprintf(buf, sizeof buf, "%s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p == '/') {
			*p = '\0';
			mkdir(buf, 0755);
			*p = '/';
		}
	}
	mkdir(buf, 0755);
}

/* Mount the disk with this serial, waiting up to wait_ms for it to appear; returns 0, or an
 * errno-style code with *why set. */
static int mount_volume(const char *serial, const char *target, const char *fstype, long long wait_ms,
			const char **why)
{
	char dev[300];
	long long deadline = now_ms() + wait_ms;
	/* A hot-plugged disk shows up a little after the host added it; an EBS volume seconds after
	 * the boot (EC2 attaches it once the instance runs). */
	while (find_disk(serial, dev, sizeof dev) < 0) {
		if (now_ms() > deadline) {
			*why = "no disk with that serial appeared";
			return ENODEV;
		}
		if (stop_pending()) {
			*why = "stopped while waiting for its disk";
			return ECANCELED;
		}
		usleep(20000);
	}
	mkdirs(target);
	static const char *const guesses[] = { "ext4", "vfat", NULL };
	const char *const one[] = { fstype, NULL };
	const char *const *types = strcmp(fstype, "auto") == 0 ? guesses : one;
	int err = EINVAL;
	for (; *types; types++) {
		/* ext2 volumes are served by the ext4 driver, which the cloud kernel has built in. */
		const char *type = strcmp(*types, "ext2") == 0 ? "ext4" : *types;
		if (mount(dev, target, type, MS_NOATIME, NULL) == 0) {
			for (int i = 0; i < MAX_MOUNTS; i++) {
				if (!mounted[i]) {
					mounted[i] = strdup(target);
					break;
				}
			}
			return 0;
		}
		err = errno;
	}
	*why = strerror(err);
	return err;
}

static int unmount_volume(const char *target, const char **why)
{
	sync();
	if (umount(target) < 0) {
		*why = errno == EBUSY ? "busy: a program still uses it" : strerror(errno);
		return errno;
	}
	for (int i = 0; i < MAX_MOUNTS; i++) {
		if (mounted[i] && strcmp(mounted[i], target) == 0) {
			free(mounted[i]);
			mounted[i] = NULL;
		}
	}
	return 0;
}

/* Boot-time volumes; a volume the app expects but cannot have is fatal (exit status 125). */
static int mount_boot_volumes(void)
{
	char *list = slurp("/unik/run/mounts", NULL);
	if (!list)
		return 0;
	int failed = 0;
	/* One deadline for them all: EC2 attaches a boot's volumes together. */
	int wait_s = run_seconds("/unik/run/mount_timeout", MAX_MOUNT_TIMEOUT, DISK_WAIT_MS / 1000);
	long long deadline = now_ms() + wait_s * 1000LL;
	char *save;
	for (char *line = strtok_r(list, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char serial[64], target[256], fstype[32];
		if (sscanf(line, "%63s %255s %31s", serial, target, fstype) != 3)
			continue;
		const char *why = "";
		long long left = deadline - now_ms();
		if (mount_volume(serial, target, fstype, left > 0 ? left : 0, &why) != 0) {
			say("unik: cannot mount volume %s on %s: %s\n", serial, target, why);
			failed = 1;
		}
	}
	drop(list);
	return failed ? -1 : 0;
}

static void unmount_all(void)
{
	for (int i = 0; i < MAX_MOUNTS; i++) {
		if (mounted[i])
			umount2(mounted[i], MNT_DETACH);
	}
}

/*
 * The control channel: the second serial port (ttyS1), raw. Each request is one line,
 * "TAG VERB ARGS...", answered by "TAG ok" or "TAG err WHY". A UART costs the boot almost
 * nothing, where a virtio-serial device cost ~0.1 s of PCI and driver probing under TCG.
 * Bytes the host sends before the port is opened can be lost (opening the UART clears its
 * FIFO), so the host repeats a request until it is answered; the tag makes a repeat safe:
 * the last request's answer is sent again, the request is not run twice. The tag also lets
 * the host skip what a dropped earlier connection may have left half-sent.
 */
#define CONTROL_TAG_LEN 12 /* hex digits */

static int open_control(void)
{
	int fd = open("/dev/ttyS1", O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return -1;
	struct termios tio;
	/* No UART behind the node (a host without the control port): tcgetattr fails. */
	if (tcgetattr(fd, &tio) < 0) {
		close(fd);
		return -1;
	}
	cfmakeraw(&tio);
	tio.c_cflag |= CLOCAL | CREAD; /* no modem lines: nothing may hang the port up */
	if (tcsetattr(fd, TCSANOW, &tio) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* A clone of a VM template, right after its restore, is told who it is (see the clone section). */
static int app_listening(void);
static int clone_identity(const char *hostname, const char *seed_hex, const char *realtime_ns, const char **why);
static int clone_network(const char *address, const char *gateway, const char *mac, const char **why);

static void reply(int fd, const char *text)
{
	(void)!write(fd, text, strlen(text));
}

static void handle_command(int fd, char *line)
{
	static char last_tag[32], last_answer[400];
	char tag[32], verb[16], a[256], b[256], c[32];
	int n = sscanf(line, "%31s %15s %255s %255s %31s", tag, verb, a, b, c) - 1;
	/* Blank, a fragment with no verb, or the tail of a request whose start was lost: nobody
	 * waits for an answer, and it must not count as the last request (see open_control). */
	if (n < 1 || strlen(tag) != CONTROL_TAG_LEN || strspn(tag, "0123456789abcdef") != CONTROL_TAG_LEN)
		return;
	if (strcmp(tag, last_tag) == 0) {
		reply(fd, last_answer); /* a repeat: the host missed the answer, or sent it early */
		return;
	}
	const char *why = NULL;
	int err = 0;
	if (strcmp(verb, "ping") == 0) {
		/* liveness only */
	} else if (n == 4 && strcmp(verb, "mount") == 0) {
		err = mount_volume(a, b, c, DISK_WAIT_MS, &why); /* the daemon plugged the disk first */
	} else if (n == 2 && strcmp(verb, "umount") == 0) {
		err = unmount_volume(a, &why);
	} else if (n == 1 && strcmp(verb, "listening") == 0) {
		if (!app_listening()) {
			err = EAGAIN;
			why = "not listening";
		}
	} else if (n == 4 && strcmp(verb, "clone") == 0) {
		err = clone_identity(a, b, c, &why);
	} else if (n == 4 && strcmp(verb, "netaddr") == 0) {
		err = clone_network(a, b, c, &why);
	} else {
		err = EINVAL;
		why = "unknown command";
	}
	if (err)
		snprintf(last_answer, sizeof last_answer, "%s err %s\n", tag, why ? why : strerror(err));
	else
		snprintf(last_answer, sizeof last_answer, "%s ok\n", tag);
	snprintf(last_tag, sizeof last_tag, "%s", tag);
	reply(fd, last_answer);
}

/* Read what the host sent; run each complete line. */
static void serve_control(int fd)
{
	static char buf[1024];
	static size_t used;
	for (;;) {
		ssize_t r = read(fd, buf + used, sizeof buf - 1 - used);
		if (r <= 0)
			return;
		used += (size_t)r;
		buf[used] = '\0';
		char *nl;
		while ((nl = strchr(buf, '\n')) != NULL) {
			*nl = '\0';
			handle_command(fd, buf);
			size_t rest = used - (size_t)(nl + 1 - buf);
			memmove(buf, nl + 1, rest);
			used = rest;
			buf[used] = '\0';
		}
		if (used == sizeof buf - 1)
			used = 0; /* an overlong line is garbage: drop it */
	}
}

/*
 * Networking. Loopback always comes up (apps may talk to themselves on 127.0.0.1). When
 * /unik/run/net exists, the first interface other than lo gets its address, netmask and
 * default route by ioctl (the kernel has no ip= support); the host's run archive carries
 * /etc/resolv.conf. The interface appears only once virtio_net has probed the NIC, hence the wait.
 */
#define NET_WAIT_MS 3000

static int interface_up(int sock, const char *ifname)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
	if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	ifr.ifr_flags |= IFF_UP;
	return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

static void inet_sockaddr(struct sockaddr *sa, in_addr_t addr)
{
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof sin);
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = addr;
	memcpy(sa, &sin, sizeof sin);
}

static int find_nic(int sock, char *name, size_t len)
{
	/* The usual case, one virtio NIC named eth0 by the kernel: an ioctl, no sysfs walk. */
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
	if (ioctl(sock, SIOCGIFINDEX, &ifr) == 0 && len > 4) {
		memcpy(name, "eth0", 5);
		return 0;
	}
	long long deadline = now_ms() + NET_WAIT_MS;
	for (;;) {
		DIR *dir = opendir("/sys/class/net");
		struct dirent *entry;
		int found = 0;
		while (dir && !found && (entry = readdir(dir)) != NULL) {
			size_t n = strlen(entry->d_name);
			if (entry->d_name[0] != '.' && strcmp(entry->d_name, "lo") != 0 && n < len) {
				memcpy(name, entry->d_name, n + 1);
				found = 1;
			}
		}
		if (dir)
			closedir(dir);
		if (found)
			return 0;
		if (now_ms() > deadline)
			return -1;
		usleep(5000);
	}
}

/* Address, netmask and default route of nic; a gateway outside the subnet (GCE leases a /32)
 * first gets a host route on the link. */
static void apply_address(int sock, const char *nic, in_addr_t ip, in_addr_t mask, in_addr_t gw)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", nic);
	inet_sockaddr(&ifr.ifr_addr, ip);
	if (ioctl(sock, SIOCSIFADDR, &ifr) < 0)
		say("unik: cannot set the address of %s: %s\n", nic, strerror(errno));
	inet_sockaddr(&ifr.ifr_netmask, mask);
	if (ioctl(sock, SIOCSIFNETMASK, &ifr) < 0)
		say("unik: cannot set the netmask of %s: %s\n", nic, strerror(errno));
	/* A gratuitous ARP when the link comes up: a host (or slirp) that already tried to reach
	 * this address learns it now instead of waiting out its ARP retry timer. */
	int notify = open("/proc/sys/net/ipv4/conf/all/arp_notify", O_WRONLY | O_CLOEXEC);
	if (notify >= 0) {
		(void)!write(notify, "1\n", 2);
		close(notify);
	}
	if (interface_up(sock, nic) < 0)
		say("unik: cannot bring up %s: %s\n", nic, strerror(errno));
	if (gw == INADDR_ANY)
		return;
	struct rtentry rt;
	if ((gw & mask) != (ip & mask)) {
		memset(&rt, 0, sizeof rt);
		inet_sockaddr(&rt.rt_dst, gw);
		inet_sockaddr(&rt.rt_genmask, INADDR_NONE);
		rt.rt_flags = RTF_UP | RTF_HOST;
		rt.rt_dev = (char *)nic;
		if (ioctl(sock, SIOCADDRT, &rt) < 0 && errno != EEXIST)
			say("unik: cannot reach the gateway on %s: %s\n", nic, strerror(errno));
	}
	memset(&rt, 0, sizeof rt);
	inet_sockaddr(&rt.rt_dst, INADDR_ANY);
	inet_sockaddr(&rt.rt_genmask, INADDR_ANY);
	inet_sockaddr(&rt.rt_gateway, gw);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	if (ioctl(sock, SIOCADDRT, &rt) < 0 && errno != EEXIST) {
		char text[INET_ADDRSTRLEN];
		inet_ntop(AF_INET, &gw, text, sizeof text);
		say("unik: cannot add the default route via %s: %s\n", text, strerror(errno));
	}
}

/*
 * DHCP (RFC 2131) for disks booted elsewhere: DISCOVER, OFFER, REQUEST, ACK over a UDP socket
 * bound to the NIC (the kernel sends from 0.0.0.0 and takes broadcast replies before the link
 * has an address). The lease is not renewed: the address stays configured for the VM's life.
 */
#define DHCP_WAIT_MS 10000
#define DHCP_MAGIC 0x63825363u
enum { DHCP_DISCOVER = 1, DHCP_OFFER = 2, DHCP_REQUEST = 3, DHCP_ACK = 5, DHCP_NAK = 6 };

struct dhcp_message {
	uint8_t op, htype, hlen, hops;
	uint32_t xid;
	uint16_t secs, flags;
	uint32_t ciaddr, yiaddr, siaddr, giaddr;
	uint8_t chaddr[16], sname[64], file[128];
	uint32_t magic;
	uint8_t options[312];
};

struct dhcp_lease {
	in_addr_t ip, mask, gateway, server, dns[3];
	uint32_t seconds;
	int mtu;
};

/* The options this client reads, from a reply; returns the message type (0: none). */
static int dhcp_parse(const struct dhcp_message *m, size_t len, struct dhcp_lease *lease)
{
	const uint8_t *o = m->options, *end = (const uint8_t *)m + len;
	int type = 0;
	while (o < end && *o != 255) {
		if (*o == 0) {
			o++;
			continue;
		}
		if (o + 2 > end || o + 2 + o[1] > end)
			break;
		uint8_t code = o[0], n = o[1];
		const uint8_t *v = o + 2;
		if (code == 53 && n >= 1)
			type = v[0];
		else if (code == 1 && n == 4)
			memcpy(&lease->mask, v, 4);
		else if (code == 3 && n >= 4)
			memcpy(&lease->gateway, v, 4);
		else if (code == 54 && n == 4)
			memcpy(&lease->server, v, 4);
		else if (code == 51 && n == 4)
			lease->seconds = ntohl(*(const uint32_t *)(const void *)v);
		else if (code == 26 && n == 2)
			lease->mtu = v[0] << 8 | v[1];
		else if (code == 6)
			for (int i = 0; i < 3 && 4 * i + 4 <= n; i++)
				memcpy(&lease->dns[i], v + 4 * i, 4);
		o += 2 + n;
	}
	lease->ip = m->yiaddr;
	return type;
}

static uint8_t *dhcp_option(uint8_t *o, uint8_t code, const void *value, uint8_t n)
{
	o[0] = code;
	o[1] = n;
	memcpy(o + 2, value, n);
	return o + 2 + n;
}

static int dhcp_send(int fd, const uint8_t mac[6], uint32_t xid, int type, const struct dhcp_lease *offer)
{
	struct dhcp_message m;
	memset(&m, 0, sizeof m);
	m.op = 1; /* BOOTREQUEST */
	m.htype = 1; /* Ethernet */
	m.hlen = 6;
	m.xid = xid;
	m.flags = htons(0x8000); /* answer by broadcast: unicast cannot reach a link with no address */
	memcpy(m.chaddr, mac, 6);
	m.magic = htonl(DHCP_MAGIC);
	uint8_t t = (uint8_t)type, client_id[7] = { 1 }, wanted[] = { 1, 3, 6, 26, 51, 54 };
	memcpy(client_id + 1, mac, 6);
	uint8_t *o = dhcp_option(m.options, 53, &t, 1);
	o = dhcp_option(o, 61, client_id, sizeof client_id);
	o = dhcp_option(o, 55, wanted, sizeof wanted);
	if (type == DHCP_REQUEST) {
		o = dhcp_option(o, 50, &offer->ip, 4);
		o = dhcp_option(o, 54, &offer->server, 4);
	}
	*o++ = 255;
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(67) };
	to.sin_addr.s_addr = INADDR_BROADCAST;
	return (int)sendto(fd, &m, (size_t)(o - (uint8_t *)&m), 0, (struct sockaddr *)&to, sizeof to);
}

/* Send `type`, then wait (resending with back-off) for a reply of `want` to this xid. */
static int dhcp_exchange(int fd, const uint8_t mac[6], uint32_t xid, int type, int want,
			 struct dhcp_lease *lease, long long deadline)
{
	int resend_ms = 500;
	while (now_ms() < deadline) {
		if (dhcp_send(fd, mac, xid, type, lease) < 0)
			say("unik: cannot send a DHCP request: %s\n", strerror(errno));
		long long resend_at = now_ms() + resend_ms;
		resend_ms = resend_ms < 4000 ? resend_ms * 2 : resend_ms;
		for (long long left; (left = (resend_at < deadline ? resend_at : deadline) - now_ms()) > 0;) {
			struct pollfd pfd = { fd, POLLIN, 0 };
			if (poll(&pfd, 1, (int)left) <= 0)
				continue;
			struct dhcp_message m;
			ssize_t n = recv(fd, &m, sizeof m, 0);
			if (n < (ssize_t)offsetof(struct dhcp_message, options) || m.op != 2 || m.xid != xid ||
			    m.magic != htonl(DHCP_MAGIC) || memcmp(m.chaddr, mac, 6) != 0)
				continue;
			struct dhcp_lease got = *lease;
			int got_type = dhcp_parse(&m, (size_t)n, &got);
			if (got_type == DHCP_NAK)
				return -1;
			if (got_type == want) {
				*lease = got;
				return 0;
			}
		}
	}
	errno = ETIMEDOUT;
	return -1;
}

static void write_resolv_conf(const struct dhcp_lease *lease)
{
	char text[128] = "";
	size_t used = 0;
	for (int i = 0; i < 3 && lease->dns[i]; i++) {
		char addr[INET_ADDRSTRLEN];
		inet_ntop(AF_INET, &lease->dns[i], addr, sizeof addr);
		used += (size_t)snprintf(text + used, sizeof text - used, "nameserver %s\n", addr);
	}
	if (!used)
		return;
	mkdir("/etc", 0755);
	int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd >= 0) {
		(void)!write(fd, text, used);
		close(fd);
	}
}

/* 0 once the NIC has its leased address. */
static int configure_dhcp(int sock, const char *nic)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", nic);
	uint8_t mac[6];
	if (ioctl(sock, SIOCGIFHWADDR, &ifr) < 0 || interface_up(sock, nic) < 0) {
		say("unik: cannot bring up %s: %s\n", nic, strerror(errno));
		return -1;
	}
	memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
	/* What is sent before the link has carrier is lost (e1000 negotiates for ~1-2 s), and the
	 * next try would come only after the back-off: wait for carrier first. */
	for (long long until = now_ms() + NET_WAIT_MS; now_ms() < until; usleep(5000))
		if (ioctl(sock, SIOCGIFFLAGS, &ifr) == 0 && (ifr.ifr_flags & IFF_RUNNING))
			break;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	int on = 1;
	struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons(68) };
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &on, sizeof on) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, nic, (socklen_t)strlen(nic) + 1) < 0 ||
	    bind(fd, (struct sockaddr *)&me, sizeof me) < 0) {
		say("unik: no DHCP socket on %s: %s\n", nic, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	uint32_t xid;
	memcpy(&xid, mac + 2, 4);
	xid ^= (uint32_t)now_ms();
	struct dhcp_lease lease;
	memset(&lease, 0, sizeof lease);
	long long deadline = now_ms() + DHCP_WAIT_MS;
	int ok = dhcp_exchange(fd, mac, xid, DHCP_DISCOVER, DHCP_OFFER, &lease, deadline) == 0 &&
		 dhcp_exchange(fd, mac, xid, DHCP_REQUEST, DHCP_ACK, &lease, deadline) == 0;
	close(fd);
	if (!ok) {
		say("unik: no DHCP lease on %s within %d ms\n", nic, DHCP_WAIT_MS);
		return -1;
	}
	if (!lease.mask) /* a server that sends none: the classful default */
		lease.mask = htonl(IN_CLASSA(ntohl(lease.ip)) ? 0xff000000u :
				   IN_CLASSB(ntohl(lease.ip)) ? 0xffff0000u : 0xffffff00u);
	if (lease.mtu >= 576) {
		ifr.ifr_mtu = lease.mtu;
		if (ioctl(sock, SIOCSIFMTU, &ifr) < 0)
			say("unik: cannot set the MTU of %s: %s\n", nic, strerror(errno));
	}
	apply_address(sock, nic, lease.ip, lease.mask, lease.gateway);
	write_resolv_conf(&lease);
	char ip[INET_ADDRSTRLEN], gw[INET_ADDRSTRLEN];
	inet_ntop(AF_INET, &lease.ip, ip, sizeof ip);
	inet_ntop(AF_INET, &lease.gateway, gw, sizeof gw);
	say("unik: %s has %s/%d via %s by DHCP (lease %u s)\n", nic, ip,
	    __builtin_popcount(lease.mask), gw, lease.seconds);
	return 0;
}

/*
 * EC2's instance metadata service (IMDSv2), for disks whose /unik/run/net says config=imds: the
 * instance's user-data is a run archive, unpacked over the baked one once DHCP has leased an
 * address. HTTP/1.0, so the service closes after each answer: a session token by PUT, then the
 * user-data by GET with that token. A fresh instance's service may miss the first packets, so
 * the whole exchange is retried with back-off for up to IMDS_WAIT_MS in all.
 */
#define IMDS_ADDRESS "169.254.169.254"
#define IMDS_WAIT_MS 10000
#define IMDS_TRY_MS 2000 /* one request: connect, send, whole answer */
#define IMDS_MAX_BODY (64 * 1024) /* EC2 itself caps user-data at 16 KB */

/* Headers and body of the last answer, and a NUL; .bss: it costs nothing to boots that never ask. */
static char imds_buffer[IMDS_MAX_BODY + 4096 + 1];

struct http_answer {
	int status;
	char *body;
	size_t len;
};

/* 0 once fd is ready for `events` (or has an error to report), -1 with errno at the deadline. */
static int wait_fd(int fd, short events, long long deadline)
{
	for (;;) {
		long long left = deadline - now_ms();
		if (left <= 0) {
			errno = ETIMEDOUT;
			return -1;
		}
		struct pollfd pfd = { fd, events, 0 };
		int n = poll(&pfd, 1, (int)left);
		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return -1;
	}
}

/* Content-Length from the header lines that end before `end`; -1 if none. */
static long content_length(const char *headers, const char *end)
{
	for (const char *line = headers; line && line < end; line = memchr(line, '\n', (size_t)(end - line))) {
		line += *line == '\n';
		if (strncasecmp(line, "Content-Length:", 15) == 0)
			return strtol(line + 15, NULL, 10);
	}
	return -1;
}

/* One request to the metadata service and its whole answer (in imds_buffer); 0, or -1 with why. */
static int imds_request(const char *request, struct http_answer *answer, long long deadline, char *why, size_t why_len)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(80) };
	inet_pton(AF_INET, IMDS_ADDRESS, &to.sin_addr);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(why, why_len, "no TCP socket: %s", strerror(errno));
		return -1;
	}
	int err = 0;
	socklen_t err_len = sizeof err;
	if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS)
		err = errno;
	else if (wait_fd(fd, POLLOUT, deadline) < 0)
		err = errno;
	else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &err_len) < 0)
		err = errno;
	if (err) {
		snprintf(why, why_len, "cannot connect to %s: %s", IMDS_ADDRESS, strerror(err));
		close(fd);
		return -1;
	}
	for (size_t sent = 0, want = strlen(request); sent < want;) {
		ssize_t n = send(fd, request + sent, want - sent, MSG_NOSIGNAL);
		if (n > 0) {
			sent += (size_t)n;
		} else if ((errno != EAGAIN && errno != EINTR) || wait_fd(fd, POLLOUT, deadline) < 0) {
			snprintf(why, why_len, "cannot send a request: %s", strerror(errno));
			close(fd);
			return -1;
		}
	}
	/* To EOF (HTTP/1.0), or to the end of the body Content-Length announces, whichever is first. */
	size_t got = 0;
	char *body = NULL;
	long expected = -1;
	for (;;) {
		if (got == sizeof imds_buffer - 1) {
			snprintf(why, why_len, "an answer larger than %d KiB", IMDS_MAX_BODY / 1024);
			close(fd);
			return -1;
		}
		ssize_t n = recv(fd, imds_buffer + got, sizeof imds_buffer - 1 - got, 0);
		if (n == 0)
			break;
		if (n < 0) {
			if ((errno != EAGAIN && errno != EINTR) || wait_fd(fd, POLLIN, deadline) < 0) {
				snprintf(why, why_len, "no whole answer: %s", strerror(errno));
				close(fd);
				return -1;
			}
			continue;
		}
		got += (size_t)n;
		if (!body) {
			char *end = memmem(imds_buffer, got, "\r\n\r\n", 4);
			if (end) {
				body = end + 4;
				expected = content_length(imds_buffer, end);
			}
		}
		if (body && expected >= 0 && got - (size_t)(body - imds_buffer) >= (size_t)expected)
			break;
	}
	close(fd);
	imds_buffer[got] = '\0';
	size_t len = body ? got - (size_t)(body - imds_buffer) : 0;
	if (!body || sscanf(imds_buffer, "HTTP/%*d.%*d %d", &answer->status) != 1) {
		snprintf(why, why_len, "not an HTTP answer");
		return -1;
	}
	if (expected >= 0 && len < (size_t)expected) {
		snprintf(why, why_len, "an answer cut short (%zu of %ld bytes)", len, expected);
		return -1;
	}
	answer->body = body;
	answer->len = expected >= 0 ? (size_t)expected : len;
	return 0;
}

/* The user-data: 1 with *data and *len (in imds_buffer), 0 when there is none, -1 with why. */
static int imds_user_data(char **data, size_t *len, char *why, size_t why_len)
{
	static const char token_request[] = "PUT /latest/api/token HTTP/1.0\r\n"
					    "Host: " IMDS_ADDRESS "\r\n"
					    "X-aws-ec2-metadata-token-ttl-seconds: 300\r\n"
					    "Content-Length: 0\r\n\r\n";
	long long deadline = now_ms() + IMDS_WAIT_MS;
	for (int pause_ms = 100;; pause_ms = pause_ms < 1000 ? pause_ms * 2 : 1000) {
		struct http_answer answer;
		long long try_deadline = now_ms() + IMDS_TRY_MS < deadline ? now_ms() + IMDS_TRY_MS : deadline;
		if (imds_request(token_request, &answer, try_deadline, why, why_len) < 0) {
			/* why is set */
		} else if (answer.status != 200) {
			snprintf(why, why_len, "HTTP %d from PUT /latest/api/token", answer.status);
		} else {
			char token[256];
			size_t n = answer.len;
			while (n && (answer.body[n - 1] == '\n' || answer.body[n - 1] == '\r'))
				n--;
			answer.body[n] = '\0';
			/* It goes into a header line: token characters only (AWS's are base64). */
			if (n == 0 || n >= sizeof token || strspn(answer.body,
				"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_.~") != n) {
				snprintf(why, why_len, "a malformed token from PUT /latest/api/token");
			} else {
				memcpy(token, answer.body, n + 1);
				char request[512];
				snprintf(request, sizeof request, "GET /latest/user-data HTTP/1.0\r\n"
					 "Host: " IMDS_ADDRESS "\r\n"
					 "X-aws-ec2-metadata-token: %s\r\n\r\n", token);
				try_deadline = now_ms() + IMDS_TRY_MS < deadline ? now_ms() + IMDS_TRY_MS : deadline;
				if (imds_request(request, &answer, try_deadline, why, why_len) < 0) {
					/* why is set */
				} else if (answer.status == 200) {
					*data = answer.body;
					*len = answer.len;
					return 1;
				} else if (answer.status == 404) {
					return 0;
				} else {
					snprintf(why, why_len, "HTTP %d from GET /latest/user-data", answer.status);
				}
			}
		}
		if (deadline - now_ms() <= pause_ms)
			return -1;
		usleep((useconds_t)pause_ms * 1000);
	}
}

/* The run archive in the user-data, then the hostname again: it was set before the network was
 * up. Env, args, mounts and the stop timeout are read after this; the network is already up. */
static void imds_run_config(void)
{
	char why[160], *data;
	size_t len;
	int got = imds_user_data(&data, &len, why, sizeof why);
	if (got == 0) {
		say("unik: no user-data in the instance metadata service: the baked run configuration stays\n");
		return;
	}
	if (got > 0 && (len < 6 || memcmp(data, "070701", 6) != 0)) {
		snprintf(why, sizeof why, "the user-data (%zu bytes) is not a run archive (newc cpio)", len);
		got = -1;
	}
	if (got < 0) {
		say("unik: no run configuration from the instance metadata service: %s\n", why);
		return;
	}
	unpack_archive(data, len);
	say("unik: run configuration from the instance metadata service (%zu bytes)\n", len);
	set_hostname();
}

static void configure_nic(int sock, const char *conf)
{
	char address[32] = "", gateway[32] = "", config[16] = "";
	for (const char *line = conf; *line;) {
		size_t n = strcspn(line, "\n");
		/* The host validated these lines; anything else is a newer host's key: ignored. */
		sscanf(line, "address=%31[^\n]", address);
		sscanf(line, "gateway=%31[^\n]", gateway);
		sscanf(line, "config=%15[^\n]", config);
		line += n + (line[n] == '\n');
	}
	int dhcp = strcmp(address, "dhcp") == 0;
	char *slash = strchr(address, '/');
	int prefix = slash ? atoi(slash + 1) : -1;
	if (slash)
		*slash = '\0';
	struct in_addr ip, gw = { INADDR_ANY };
	if (!dhcp && (inet_pton(AF_INET, address, &ip) != 1 || prefix < 0 || prefix > 32)) {
		say("unik: bad network address in /unik/run/net\n");
		return;
	}
	char nic[IFNAMSIZ];
	if (find_nic(sock, nic, sizeof nic) < 0) {
		say("unik: no network interface appeared within %d ms\n", NET_WAIT_MS);
		return;
	}
	if (dhcp) {
		if (configure_dhcp(sock, nic) == 0 && strcmp(config, "imds") == 0)
			imds_run_config();
		return;
	}
	if (*gateway)
		inet_pton(AF_INET, gateway, &gw);
	/* A shift by 32 is undefined in C: /0 is spelled out. */
	in_addr_t mask = prefix ? htonl(0xffffffffu << (32 - prefix)) : 0;
	apply_address(sock, nic, ip.s_addr, mask, gw.s_addr);
}

/*
 * VM templates. The host snapshots a warm instance once its app listens on a TCP port
 * ("listening"), and later starts clones from that snapshot: every clone wakes up as the
 * template was, with its hostname, its kernel's random state, its clock and its NIC's MAC
 * and address. "clone HOSTNAME SEED NS" gives it its own hostname, mixes SEED (hex bytes from
 * the host's getrandom) into the kernel's pool and reseeds the CRNG at once (as vmgenid does),
 * and sets the wall clock to NS (Unix nanoseconds); "netaddr A.B.C.D/N GATEWAY MAC" gives the
 * NIC its own MAC (virtio-net changes it live) and address.
 */
#define RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#define RNDRESEEDCRNG 0x5207 /* _IO('R', 0x07) */

static int app_listening(void)
{
	FILE *f = fopen("/proc/net/tcp", "re");
	if (!f)
		return 0;
	char line[256];
	unsigned state;
	int found = 0;
	while (!found && fgets(line, sizeof line, f))
		found = sscanf(line, " %*u: %*x:%*x %*x:%*x %x", &state) == 1 && state == 0x0A; /* TCP_LISTEN */
	fclose(f);
	return found;
}

static int hex_value(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static int clone_identity(const char *hostname, const char *seed_hex, const char *realtime_ns, const char **why)
{
	if (sethostname(hostname, strlen(hostname)) < 0) {
		*why = "cannot set the hostname";
		return errno;
	}
	struct {
		int entropy_count, buf_size;
		unsigned char buf[64];
	} seed;
	size_t len = strlen(seed_hex) / 2;
	if (len == 0 || len > sizeof seed.buf) {
		*why = "bad seed";
		return EINVAL;
	}
	for (size_t i = 0; i < len; i++) {
		int hi = hex_value(seed_hex[2 * i]), lo = hex_value(seed_hex[2 * i + 1]);
		if (hi < 0 || lo < 0) {
			*why = "bad seed";
			return EINVAL;
		}
		seed.buf[i] = (unsigned char)(hi << 4 | lo);
	}
	seed.entropy_count = (int)len * 8;
	seed.buf_size = (int)len;
	int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	int err = fd < 0 || ioctl(fd, RNDADDENTROPY, &seed) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0 ? errno : 0;
	if (fd >= 0)
		close(fd);
	if (err) {
		*why = "cannot reseed the kernel's random generator";
		return err;
	}
	char *end;
	long long ns = strtoll(realtime_ns, &end, 10);
	struct timespec now = { .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
	if (*end || ns <= 0) {
		*why = "bad time";
		return EINVAL;
	}
	if (clock_settime(CLOCK_REALTIME, &now) < 0) {
		*why = "cannot set the clock";
		return errno;
	}
	return 0;
}

static int clone_network(const char *address, const char *gateway, const char *mac, const char **why)
{
	unsigned char hw[6];
	char ip_text[32];
	int prefix;
	struct in_addr ip, gw = { INADDR_ANY };
	if (sscanf(mac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &hw[0], &hw[1], &hw[2], &hw[3], &hw[4], &hw[5]) != 6 ||
	    sscanf(address, "%31[^/]/%d", ip_text, &prefix) != 2 || prefix < 0 || prefix > 32 ||
	    inet_pton(AF_INET, ip_text, &ip) != 1 || (strcmp(gateway, "-") != 0 && inet_pton(AF_INET, gateway, &gw) != 1)) {
		*why = "bad address";
		return EINVAL;
	}
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	char nic[IFNAMSIZ];
	if (sock < 0 || find_nic(sock, nic, sizeof nic) < 0) {
		if (sock >= 0)
			close(sock);
		*why = "no network interface";
		return ENODEV;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", nic);
	ifr.ifr_hwaddr.sa_family = 1; /* ARPHRD_ETHER */
	memcpy(ifr.ifr_hwaddr.sa_data, hw, 6);
	if (ioctl(sock, SIOCSIFHWADDR, &ifr) < 0) {
		int err = errno;
		close(sock);
		*why = "cannot change the MAC address";
		return err;
	}
	in_addr_t mask = prefix ? htonl(0xffffffffu << (32 - prefix)) : 0;
	apply_address(sock, nic, ip.s_addr, mask, gw.s_addr);
	close(sock);
	return 0;
}

static void setup_network(void)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		say("unik: no IPv4 socket: %s\n", strerror(errno));
		return;
	}
	if (interface_up(sock, "lo") < 0)
		say("unik: cannot bring up lo: %s\n", strerror(errno));
	char *conf = slurp("/unik/run/net", NULL);
	if (conf) {
		configure_nic(sock, conf);
		drop(conf);
	}
	close(sock);
}

static pid_t start_app(char **argv)
{
	/* vfork: no page tables to copy and no copy-on-write faults, each of them slow under TCG,
	 * and PID 1 waits until the app is exec'd, so the app is first on the single vCPU. The
	 * child only makes system calls (no handler is installed, so signal() touches no state). */
	pid_t pid = vfork();
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

static void signal_app(pid_t app, int sig)
{
	/* The app may have left its process group; then at least the app itself gets it. */
	if (kill(-app, sig) < 0)
		kill(app, sig);
}

/* Supervise the app until it is gone; returns its wait status. Reaps every other child too,
 * and serves the control channel meanwhile. */
static int supervise(pid_t app, const sigset_t *mask, int ctl)
{
	int stopping = 0;
	long long kill_at = 0;
	int timeout_s = stop_timeout();
	int sigfd = signalfd(-1, mask, SFD_CLOEXEC);

	for (;;) {
		/* Reap first: SIGCHLD may have been merged with an earlier one. */
		int status;
		pid_t pid;
		while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
			if (pid == app)
				return status;
		}

		long long now = now_ms();
		int wait_ms = -1;
		if (stopping) {
			long long left = kill_at - now;
			if (left <= 0) {
				signal_app(app, SIGKILL);
				kill_at = now + 3600 * 1000LL; /* SIGKILL once; then just wait */
				continue;
			}
			wait_ms = (int)left;
		}
		struct pollfd fds[2] = { { sigfd, POLLIN, 0 }, { ctl, POLLIN, 0 } };
		if (poll(fds, 2, wait_ms) < 0)
			continue;
		if (fds[1].revents & POLLIN)
			serve_control(ctl);
		else if (fds[1].revents & (POLLHUP | POLLERR)) {
			close(ctl); /* CLOCAL: it should not happen; if it does, start afresh */
			ctl = open_control();
		}

		struct signalfd_siginfo info;
		if (!(fds[0].revents & POLLIN) || read(sigfd, &info, sizeof info) != sizeof info)
			continue;
		int sig = (int)info.ssi_signo;
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
	unmount_all();
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
	unpack_run_archive();
	/* Early: what the host sends before the port is open is lost (see open_control). */
	int ctl = open_control();

	load_modules();
	set_hostname();
	setup_network();

	/* The kernel hands init its leftover command-line words as environment: not the app's. */
	static char default_path[] = "PATH=/unik:/bin:/usr/bin", default_home[] = "HOME=/";
	struct words env = { 0 };
	put_env(&env, default_path);
	put_env(&env, default_home);
	load_env("/unik/env", &env);
	load_env("/unik/run/env", &env);

	struct words argv = { 0 };
	add_words("/unik/entrypoint", &argv);
	if (argv.count == 0) {
		static char app[] = "/unik/app";
		push_word(&argv, app);
	}
	if (access("/unik/run/args", F_OK) == 0)
		add_words("/unik/run/args", &argv);
	else
		add_words("/unik/args", &argv);
	if (!argv.at || !env.at)
		finish(127);

	if (mount_boot_volumes() < 0) {
		say("\nunik: exit status 125\n");
		finish(125);
	}

	/* The app's environment is init's from here on: execvp searches the app's PATH. */
	environ = env.at;
	pid_t app = start_app(argv.at);
	if (app < 0) {
		say("unik: cannot run %s: %s\n", argv.at[0], strerror(errno));
		say("\nunik: exit status 127\n");
		finish(127);
	}

	int status = supervise(app, &mask, ctl);
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
