//! The appliance's HTTP/1.1 request handling: hyper's parser with the options of
//! `appliance/src/serve/net.rs` (64 KiB heads, 100 headers, half-close, title-case answers) and
//! our handler side of it (`appliance/src/serve/http.rs`, compiled here from its source file: the
//! appliance is a binary crate): header access, declared length, the blocking body reader with
//! its limit. Input: whatever a client sends on one connection (request heads, bodies with
//! Content-Length or chunked framing, pipelined requests), then end of input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../../appliance/src/serve/http.rs"]
#[allow(dead_code)]
mod http;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let mut r = http::Request::new(&parts, body, Duration::from_secs(2));
    let (status, text) = tokio::task::spawn_blocking(move || {
        let _ = r.header("content-type");
        let _ = r.declared_length();
        match r.read_body(64 << 10) {
            Ok(b) => (200u16, b.len().to_string()),
            Err(http::BodyError::TooLarge(_)) => (413, "too large".into()),
            Err(http::BodyError::Io(e)) => (400, e.to_string()),
        }
    })
    .await
    .unwrap_or((500, String::new()));
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    Ok(resp)
}

fuzz_target!(|data: &[u8]| {
    let input = data.to_vec();
    let answer_bytes = runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let serve = tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(2))
                .max_buf_size(64 << 10)
                .max_headers(100)
                .title_case_headers(true)
                .half_close(true);
            let svc = hyper::service::service_fn(answer);
            let _ = b
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
                .await;
        });
        let _ = client.write_all(&input).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
        serve.abort();
        out
    });
    // Every answer starts as a status line.
    assert!(
        answer_bytes.is_empty() || answer_bytes.starts_with(b"HTTP/1."),
        "garbled answer"
    );
});
