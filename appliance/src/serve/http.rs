//! What handlers see of HTTP: a [`Request`] whose body they read as a blocking stream, and a
//! [`Response`] whose body is bytes, a byte range of a file or a function that writes it. The
//! protocol itself is hyper's (see [`super::net`]); handlers run on tokio's blocking pool, so
//! they stay plain synchronous code (file system, snapshot readers, archive writers).
//!
//! Every limit is explicit: a request body is read with a silence timeout and an overall
//! deadline, a streamed response waits at most the silence timeout for a slow reader.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

/// Longest time one request body may take, however steadily it trickles in.
const BODY_TIME: Duration = Duration::from_secs(15 * 60);

pub struct Request {
    pub method: String,
    /// The path part of the request target, still percent-encoded.
    pub path: String,
    /// What follows `?` in the request target (empty without one), still percent-encoded.
    pub query: String,
    pub headers: Vec<(String, String)>,
    body: BodyReader,
}

impl Request {
    pub fn new(parts: &hyper::http::request::Parts, body: Incoming, io_timeout: Duration) -> Self {
        let headers = parts
            .headers
            .iter()
            .map(|(n, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_string(), v)
            })
            .collect();
        let declared = http_body::Body::size_hint(&body).exact();
        Request {
            method: parts.method.as_str().to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            headers,
            body: BodyReader {
                incoming: Some(body),
                buf: Bytes::new(),
                rt: Handle::current(),
                io_timeout,
                deadline: Instant::now() + BODY_TIME,
                declared,
            },
        }
    }

    /// First value of a header (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body length the client declared, when it declared one (not for chunked bodies).
    pub fn declared_length(&self) -> Option<u64> {
        self.body.declared
    }

    /// The body, if the handler left some of it unread.
    pub fn unread(self) -> Option<Incoming> {
        self.body
            .incoming
            .filter(|b| !http_body::Body::is_end_stream(b))
    }

    /// Read the whole body if it is at most `limit` bytes.
    pub fn read_body(&mut self, limit: u64) -> Result<Vec<u8>, BodyError> {
        if let Some(n) = self.declared_length() {
            if n > limit {
                return Err(BodyError::TooLarge(limit));
            }
        }
        let cap = self.declared_length().unwrap_or(64 << 10).min(limit) as usize;
        let mut out = Vec::with_capacity(cap);
        (&mut self.body)
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(BodyError::Io)?;
        if out.len() as u64 > limit {
            return Err(BodyError::TooLarge(limit));
        }
        Ok(out)
    }
}

/// The body as a stream, for handlers that must not hold it whole (uploaded indexes).
impl Read for Request {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

#[derive(Debug)]
pub enum BodyError {
    TooLarge(u64),
    Io(io::Error),
}

/// hyper's body stream, read from a blocking thread: each frame is awaited on the runtime with
/// the silence timeout. Nothing is read (and no `100 Continue` sent) until a handler asks.
struct BodyReader {
    incoming: Option<Incoming>,
    buf: Bytes,
    rt: Handle,
    io_timeout: Duration,
    deadline: Instant,
    declared: Option<u64>,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.buf.is_empty() {
                let n = out.len().min(self.buf.len());
                out[..n].copy_from_slice(&self.buf.split_to(n));
                return Ok(n);
            }
            let Some(body) = self.incoming.as_mut() else {
                return Ok(0);
            };
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request body not received in time",
                ));
            }
            let wait = self.io_timeout.min(left);
            match self.rt.block_on(tokio::time::timeout(wait, body.frame())) {
                Err(_) => {
                    self.incoming = None;
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("request body: nothing received for {wait:?}"),
                    ));
                }
                Ok(None) => self.incoming = None,
                Ok(Some(Err(e))) => {
                    self.incoming = None;
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, e));
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf = data;
                    }
                }
            }
        }
    }
}

/// What a handler answers.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// Who made the request, for the access log (token name or number, never the token).
    pub who: String,
}

pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from `offset`, streamed.
    File {
        file: File,
        offset: u64,
        len: u64,
    },
    /// Bytes a function writes as it makes them: `len` of them when known (a file taken out of a
    /// snapshot), else sent chunked (an archive being built).
    Stream {
        len: Option<u64>,
        write: StreamFn,
    },
}

/// Writes a streamed body; returns the bytes written.
pub type StreamFn = Box<dyn FnOnce(&mut dyn Write) -> io::Result<u64> + Send>;

impl Body {
    pub fn stream(len: Option<u64>, write: StreamFn) -> Body {
        Body::Stream { len, write }
    }
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Empty,
            who: "-".into(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn bytes(mut self, content_type: &str, body: Vec<u8>) -> Response {
        self.body = Body::Bytes(body);
        self.header("Content-Type", content_type)
    }

    /// `{"error": msg}` with `status`.
    pub fn error(status: u16, msg: &str) -> Response {
        let body = serde_json::to_value(snapshot::api::ApiError::new(msg)).unwrap_or_default();
        Response::new(status).bytes("application/json", json_bytes(&body))
    }
}

/// Compact JSON on one line (clients such as `HttpStore` quote the first line of an error body).
/// (A `serde_json::Value`, not any `Serialize`: the fuzz crate includes this file and has no
/// `serde` of its own.)
pub fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    b.push(b'\n');
    b
}

/// One line of the access log: what was asked, what was answered, by whom, how long it took.
pub struct LogLine {
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    pub started: Instant,
    pub who: String,
    pub note: String,
}

impl LogLine {
    pub fn print(&self) {
        let path: String = self
            .path
            .chars()
            .take(300)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let method: String = self.method.chars().take(16).collect();
        eprintln!(
            "{} {} {} {} {} {} {}ms {}{}",
            humantime::format_rfc3339_millis(SystemTime::now()),
            self.peer,
            method,
            path,
            self.status,
            self.bytes,
            self.started.elapsed().as_millis(),
            self.who,
            self.note
        );
    }
}

/// A stream's writer: buffers, then hands each piece to the response body, waiting at most the
/// silence timeout for the client to take it.
pub struct ChannelWriter {
    pub tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    pub rt: Handle,
    pub io_timeout: Duration,
    pub buf: Vec<u8>,
}

const PIECE: usize = 256 << 10;

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE)));
        let send = tokio::time::timeout(self.io_timeout, self.tx.send(Ok(piece)));
        match self.rt.block_on(send) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client went away",
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for too long",
            )),
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// RFC 9110 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mon = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mon <= 2);
    let wd = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const WD: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d:02} {} {y} {h:02}:{m:02}:{s:02} GMT",
        WD[wd],
        MON[(mon - 1) as usize]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // leap day
        assert_eq!(http_date(t), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
