"""An HTTP server for unik's language tests: /ping_test, /env_test (env KEY), /mount_test (/data/data.txt)."""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import TCPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/ping_test":
            self.reply(200, "application/json", json.dumps({"message": "pong"}, separators=(",", ":")).encode())
        elif path == "/env_test":
            self.reply(200, "text/plain", os.environ.get("KEY", "").encode())
        elif path == "/mount_test":
            try:
                with open("/data/data.txt", "rb") as f:
                    self.reply(200, "text/plain", f.read())
            except OSError:
                self.reply(404, "application/json", b'{"message":"/data/data.txt not found"}')
        else:
            self.reply(404, "application/json", b'{"message":"no such path"}')

    def reply(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(HTTPServer):
    def server_bind(self) -> None:
        # HTTPServer's own server_bind looks up the host's FQDN: a DNS query the guest need not make.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Server(("0.0.0.0", port), Handler)
    print(f"python-http: listening on :{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
