/* Test app for volumes: reports each second what it sees under /data and /hot, writes
 * /hot/out.txt (and syncs) once it sees /hot/in.txt, and holds /hot/hold open if present,
 * so that the disk is busy and cannot be unmounted. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const char *first_line(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return "-";
	ssize_t n = read(fd, buf, size - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	return buf;
}

int main(void)
{
	int wrote = 0, held = -1;
	char data[128], hot[128];
	for (int tick = 1;; tick++) {
		printf("tick %d data=%s hot=%s\n", tick, first_line("/data/data.txt", data, sizeof data),
		       first_line("/hot/in.txt", hot, sizeof hot));
		if (!wrote && access("/hot/in.txt", F_OK) == 0) {
			int fd = open("/hot/out.txt", O_CREAT | O_WRONLY | O_TRUNC, 0644);
			if (fd >= 0) {
				(void)!write(fd, "written by the guest\n", 21);
				close(fd);
				sync();
				wrote = 1;
				printf("wrote /hot/out.txt\n");
			}
		}
		if (held < 0 && access("/hot/hold", F_OK) == 0) {
			held = open("/hot/hold", O_RDONLY);
			printf("holding /hot/hold\n");
		}
		fflush(stdout);
		usleep(500000);
	}
}
