//! An HTTP server for unik's language tests: /ping_test, /env_test (env KEY), /mount_test (/data/data.txt).
use std::env;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Drain the headers so the client sees a clean close.
    let mut header = String::new();
    while reader.read_line(&mut header).map(|n| n > 2).unwrap_or(false) {
        header.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    match path {
        "/ping_test" => respond(&mut stream, "200 OK", "application/json", br#"{"message":"pong"}"#),
        "/env_test" => respond(&mut stream, "200 OK", "text/plain", env::var("KEY").unwrap_or_default().as_bytes()),
        "/mount_test" => match fs::read("/data/data.txt") {
            Ok(data) => respond(&mut stream, "200 OK", "text/plain", &data),
            Err(_) => respond(
                &mut stream,
                "404 Not Found",
                "application/json",
                br#"{"message":"/data/data.txt not found"}"#,
            ),
        },
        _ => respond(&mut stream, "404 Not Found", "application/json", br#"{"message":"no such path"}"#),
    }
}

fn main() {
    let port = env::var("PORT").unwrap_or_else(|_| "8080".to_string());
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).expect("rust-http: cannot listen");
    println!("rust-http: listening on :{port}");
    for stream in listener.incoming().flatten() {
        serve(stream);
    }
}
