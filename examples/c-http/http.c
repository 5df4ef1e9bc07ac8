/*
 * A tiny HTTP server for unik's network tests, static C with no dependencies:
 *   GET /ping_test   {"message":"pong"}
 *   GET /env_test    the value of the environment variable KEY
 *   GET /mount_test  the contents of /data/data.txt (404 with a message when it is absent)
 *   GET /identity_test  {"hostname":..., "time":UNIX SECONDS, "random":32 hex digits of getrandom}:
 *                    what must differ between clones of one VM template (warm starts)
 * It listens on $PORT (default 8080), one connection at a time, and exits on SIGTERM.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stopping;

static void on_term(int sig) { (void)sig; stopping = 1; }

static void send_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		data += n;
		len -= (size_t)n;
	}
}

static void respond(int fd, int status, const char *type, const char *body, size_t len)
{
	char head[256];
	const char *reason = status == 200   ? "OK"
			     : status == 404 ? "Not Found"
			     : status == 500 ? "Internal Server Error"
					     : "Bad Request";
	int n = snprintf(head, sizeof head,
			 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
			 status, reason, type, len);
	send_all(fd, head, (size_t)n);
	send_all(fd, body, len);
}

static void respond_text(int fd, int status, const char *type, const char *body)
{
	respond(fd, status, type, body, strlen(body));
}

static void mount_test(int fd)
{
	int file = open("/data/data.txt", O_RDONLY);
	if (file < 0) {
		respond_text(fd, 404, "application/json", "{\"message\":\"/data/data.txt not found\"}");
		return;
	}
	static char buf[65536];
	size_t used = 0;
	ssize_t n;
	while (used < sizeof buf && (n = read(file, buf + used, sizeof buf - used)) > 0)
		used += (size_t)n;
	close(file);
	respond(fd, 200, "text/plain", buf, used);
}

static void identity_test(int fd)
{
	char host[65] = "", hex[33] = "", body[256];
	unsigned char bytes[16];
	gethostname(host, sizeof host - 1);
	if (getrandom(bytes, sizeof bytes, 0) != (ssize_t)sizeof bytes) {
		respond_text(fd, 500, "application/json", "{\"message\":\"getrandom failed\"}");
		return;
	}
	for (size_t i = 0; i < sizeof bytes; i++)
		snprintf(hex + 2 * i, 3, "%02x", bytes[i]);
	snprintf(body, sizeof body, "{\"hostname\":\"%s\",\"time\":%lld,\"random\":\"%s\"}", host,
		 (long long)time(NULL), hex);
	respond_text(fd, 200, "application/json", body);
}

static void serve(int fd)
{
	char req[4096];
	size_t used = 0;
	/* The request line is all this server needs; stop at the end of the headers. */
	while (used < sizeof req - 1) {
		ssize_t n = read(fd, req + used, sizeof req - 1 - used);
		if (n <= 0)
			break;
		used += (size_t)n;
		req[used] = '\0';
		if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
			break;
	}
	req[used] = '\0';
	char method[8], path[1024];
	if (sscanf(req, "%7s %1023s", method, path) != 2) {
		respond_text(fd, 400, "application/json", "{\"message\":\"bad request\"}");
		return;
	}
	char *query = strchr(path, '?');
	if (query)
		*query = '\0';
	if (strcmp(path, "/ping_test") == 0) {
		respond_text(fd, 200, "application/json", "{\"message\":\"pong\"}");
	} else if (strcmp(path, "/env_test") == 0) {
		const char *value = getenv("KEY");
		respond_text(fd, 200, "text/plain", value ? value : "");
	} else if (strcmp(path, "/mount_test") == 0) {
		mount_test(fd);
	} else if (strcmp(path, "/identity_test") == 0) {
		identity_test(fd);
	} else {
		respond_text(fd, 404, "application/json", "{\"message\":\"no such path\"}");
	}
}

int main(void)
{
	const char *port_env = getenv("PORT");
	int port = port_env ? atoi(port_env) : 8080;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL); /* no SA_RESTART: accept() returns EINTR on SIGTERM */
	signal(SIGPIPE, SIG_IGN);

	int srv = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in addr;
	memset(&addr, 0, sizeof addr);
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short)port);
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(srv, 16) < 0) {
		perror("c-http: cannot listen");
		return 1;
	}
	printf("c-http: listening on port %d\n", port);
	fflush(stdout);
	while (!stopping) {
		int fd = accept(srv, NULL, NULL);
		if (fd < 0)
			continue;
		serve(fd);
		close(fd);
	}
	printf("c-http: stopping\n");
	return 0;
}
