// An HTTP server for unik's language tests: /ping_test, /env_test (env KEY), /mount_test (/data/data.txt).
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

namespace {

void send_all(int fd, const std::string &data) {
    size_t done = 0;
    while (done < data.size()) {
        ssize_t n = write(fd, data.data() + done, data.size() - done);
        if (n <= 0) return;
        done += static_cast<size_t>(n);
    }
}

void respond(int fd, int status, const std::string &type, const std::string &body) {
    std::ostringstream out;
    out << "HTTP/1.1 " << status << (status == 200 ? " OK" : " Not Found") << "\r\nContent-Type: " << type
        << "\r\nContent-Length: " << body.size() << "\r\nConnection: close\r\n\r\n" << body;
    send_all(fd, out.str());
}

void serve(int fd) {
    std::string request;
    char buf[4096];
    while (request.find("\r\n\r\n") == std::string::npos && request.size() < 65536) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) break;
        request.append(buf, static_cast<size_t>(n));
    }
    std::istringstream line(request);
    std::string method, path;
    line >> method >> path;
    path = path.substr(0, path.find('?'));
    if (path == "/ping_test") {
        respond(fd, 200, "application/json", R"({"message":"pong"})");
    } else if (path == "/env_test") {
        const char *value = std::getenv("KEY");
        respond(fd, 200, "text/plain", value ? value : "");
    } else if (path == "/mount_test") {
        std::ifstream file("/data/data.txt", std::ios::binary);
        if (!file) {
            respond(fd, 404, "application/json", R"({"message":"/data/data.txt not found"})");
        } else {
            std::ostringstream content;
            content << file.rdbuf();
            respond(fd, 200, "text/plain", content.str());
        }
    } else {
        respond(fd, 404, "application/json", R"({"message":"no such path"})");
    }
}

}  // namespace

int main() {
    const char *port_env = std::getenv("PORT");
    int port = port_env ? std::atoi(port_env) : 8080;
    std::signal(SIGPIPE, SIG_IGN);
    int server = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (server < 0 || bind(server, reinterpret_cast<sockaddr *>(&addr), sizeof addr) < 0 || listen(server, 16) < 0) {
        std::perror("cpp-http: cannot listen");
        return 1;
    }
    std::cout << "cpp-http: listening on :" << port << std::endl;
    for (;;) {
        int fd = accept(server, nullptr, nullptr);
        if (fd < 0) continue;
        serve(fd);
        close(fd);
    }
}
