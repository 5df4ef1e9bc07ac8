// An HTTP server for unik's language tests: /ping_test, /env_test (env KEY), /mount_test (/data/data.txt).
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

public class Main {
    private static void reply(HttpExchange exchange, int status, String type, byte[] body) throws IOException {
        exchange.getResponseHeaders().set("Content-Type", type);
        exchange.sendResponseHeaders(status, body.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(body);
        }
    }

    private static byte[] utf8(String text) {
        return text.getBytes(StandardCharsets.UTF_8);
    }

    public static void main(String[] args) throws IOException {
        String portEnv = System.getenv("PORT");
        int port = portEnv == null ? 8080 : Integer.parseInt(portEnv);
        HttpServer server = HttpServer.create(new InetSocketAddress("0.0.0.0", port), 16);
        server.createContext("/ping_test", ex -> reply(ex, 200, "application/json", utf8("{\"message\":\"pong\"}")));
        server.createContext("/env_test", ex -> {
            String value = System.getenv("KEY");
            reply(ex, 200, "text/plain", utf8(value == null ? "" : value));
        });
        server.createContext("/mount_test", ex -> {
            Path data = Path.of("/data/data.txt");
            if (Files.isReadable(data)) {
                reply(ex, 200, "text/plain", Files.readAllBytes(data));
            } else {
                reply(ex, 404, "application/json", utf8("{\"message\":\"/data/data.txt not found\"}"));
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> server.stop(0)));
        server.start();
        System.out.println("java-http: listening on :" + port);
    }
}
