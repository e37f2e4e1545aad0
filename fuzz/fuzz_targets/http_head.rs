//! The appliance's HTTP/1.1 request reader (`appliance/src/serve/http.rs`, compiled here from its
//! source file: the appliance is a binary crate): request line, headers, body framing
//! (Content-Length, chunked, trailers), `Expect: 100-continue`, keep-alive and pipelining, over a
//! real loopback TCP connection that carries the input and then closes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::time::Duration;

#[path = "../../appliance/src/serve/http.rs"]
#[allow(dead_code)]
mod http;

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind loopback"))
}

fuzz_target!(|data: &[u8]| {
    let l = listener();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
    let (server, peer) = l.accept().expect("accept");
    let input = data.to_vec();
    // The client sends the input, says it is done, and reads every answer to the end.
    let feeder = std::thread::spawn(move || {
        let _ = client.write_all(&input);
        let _ = client.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink);
        sink
    });
    let t = http::Timeouts {
        head: Duration::from_secs(5),
        idle: Duration::from_millis(200),
        io: Duration::from_secs(5),
    };
    let stop = AtomicBool::new(false);
    http::serve_connection(server, peer, &t, &stop, &|req: &mut http::Request| {
        let _ = req.header("content-type");
        let _ = req.declared_length();
        match req.read_body(64 << 10) {
            Ok(b) => http::Response::new(200).bytes("text/plain", b.len().to_string().into_bytes()),
            Err(http::BodyError::TooLarge(_)) => http::Response::error(413, "too large"),
            Err(http::BodyError::Io(e)) => http::Response::error(400, &e.to_string()),
        }
    });
    let answer = feeder.join().expect("client thread");
    // Every answer starts as a status line.
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1."),
        "garbled answer"
    );
});
