//! A small HTTP/1.1 server core: request heads, bodies (Content-Length and chunked), responses,
//! keep-alive, timeouts. One worker thread serves one connection at a time, so the worker count
//! bounds the work in progress; connections beyond it wait in the kernel's accept queue.
//!
//! Why not `tiny_http`: its 0.12 request reader drains an unread body by allocating a buffer of
//! the *declared* `Content-Length` at once, so one unauthenticated request claiming a huge body
//! aborts the process (tiny-http/tiny-http#290), and it has no socket timeouts, so a client that
//! stalls mid-body holds a worker for ever. Both matter for an appliance.
//!
//! Every limit is explicit: head size and count of header lines, time to send a head, idle time
//! between keep-alive requests, silence while a body or a response is in transit.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 100;
/// Largest chunk-size line or trailer line of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// An unread rest of a body up to this size is read and dropped to keep the connection;
/// beyond it the connection is closed after the response.
const DRAIN_LIMIT: u64 = 64 << 10;
/// Longest time spent draining such a rest.
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// Longest time one request body may take, however steadily it trickles in.
const BODY_TIME: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone)]
pub struct Timeouts {
    /// From the first byte of a request to the end of its head.
    pub head: Duration,
    /// Between two requests on a kept-alive connection (and before the first one).
    pub idle: Duration,
    /// Longest silence while reading a body or writing a response.
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            head: Duration::from_secs(30),
            idle: Duration::from_secs(5),
            io: Duration::from_secs(60),
        }
    }
}

/// How often an idle connection looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);

pub struct Request<'c> {
    pub method: String,
    /// The path part of the request target, still percent-encoded.
    pub path: String,
    /// What follows `?` in the request target (empty without one), still percent-encoded.
    pub query: String,
    pub headers: Vec<(String, String)>,
    body: BodyReader<'c>,
}

impl Request<'_> {
    /// First value of a header (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body length the client declared, when it declared one (not for chunked bodies).
    pub fn declared_length(&self) -> Option<u64> {
        match self.body.framing {
            Framing::Length(_) => Some(self.body.declared),
            Framing::Chunked(_) => None,
        }
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
impl Read for Request<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

#[derive(Debug)]
pub enum BodyError {
    TooLarge(u64),
    Io(io::Error),
}

enum Framing {
    Length(u64),
    Chunked(ChunkState),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    Done,
}

struct BodyReader<'c> {
    conn: &'c mut BufReader<TcpStream>,
    framing: Framing,
    declared: u64,
    /// The client asked for `100 Continue` before it sends the body.
    expect_continue: bool,
    started: bool,
    io_timeout: Duration,
    /// Reading fails with TimedOut after this instant (set when reading starts).
    deadline: Option<Instant>,
}

impl BodyReader<'_> {
    fn start(&mut self) -> io::Result<()> {
        if self.started {
            if self.deadline.is_some_and(|d| Instant::now() > d) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the request body took too long",
                ));
            }
            return Ok(());
        }
        self.started = true;
        self.deadline = Some(Instant::now() + BODY_TIME);
        let s = self.conn.get_ref();
        s.set_read_timeout(Some(self.io_timeout))?;
        if self.expect_continue && !self.is_done() {
            let mut w: &TcpStream = s;
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(ChunkState::Done)
        )
    }

    /// Make the connection reusable: read and drop a small unread rest of the body. Returns
    /// whether the connection can carry another request.
    fn finish(&mut self) -> bool {
        if self.is_done() {
            return true;
        }
        // The client waits for `100 Continue` before sending: the body is not on the wire, and
        // we cannot know whether it will come; close.
        if self.expect_continue && !self.started {
            return false;
        }
        if let Framing::Length(n) = self.framing {
            if n > DRAIN_LIMIT {
                return false;
            }
        }
        let mut sink = [0u8; 8192];
        let mut drained = 0u64;
        let until = Instant::now() + DRAIN_TIME;
        if self.start().is_err() {
            return false;
        }
        self.deadline = Some(self.deadline.map_or(until, |d| d.min(until)));
        if self
            .conn
            .get_ref()
            .set_read_timeout(Some(DRAIN_TIME))
            .is_err()
        {
            return false;
        }
        loop {
            match self.read(&mut sink) {
                Ok(0) => return self.is_done(),
                Ok(n) => {
                    drained += n as u64;
                    if drained > DRAIN_LIMIT {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    fn read_chunked(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Framing::Chunked(state) = self.framing else {
                return Ok(0);
            };
            match state {
                ChunkState::Done => return Ok(0),
                ChunkState::Size => {
                    let line = read_line(self.conn, MAX_CHUNK_LINE)?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let n = u64::from_str_radix(size, 16)
                        .ok()
                        .filter(|_| !size.is_empty() && size.len() <= 15)
                        .ok_or_else(|| bad_data("malformed chunk size in chunked body"))?;
                    if n == 0 {
                        // Trailer fields, then the empty line.
                        for _ in 0..MAX_HEADERS {
                            if read_line(self.conn, MAX_CHUNK_LINE)?.is_empty() {
                                self.framing = Framing::Chunked(ChunkState::Done);
                                return Ok(0);
                            }
                        }
                        return Err(bad_data("too many trailer lines in chunked body"));
                    }
                    self.framing = Framing::Chunked(ChunkState::Data(n));
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(0);
                    }
                    let want = buf.len().min(left.min(usize::MAX as u64) as usize);
                    let n = self.conn.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(eof());
                    }
                    let left = left - n as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    });
                    return Ok(n);
                }
                ChunkState::DataEnd => {
                    if !read_line(self.conn, 2)?.is_empty() {
                        return Err(bad_data("chunk data longer than its declared size"));
                    }
                    self.framing = Framing::Chunked(ChunkState::Size);
                }
            }
        }
    }
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.start()?;
        match self.framing {
            Framing::Length(0) => Ok(0),
            Framing::Length(left) => {
                let want = buf.len().min(left.min(usize::MAX as u64) as usize);
                if want == 0 {
                    return Ok(0);
                }
                let n = self.conn.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(eof());
                }
                self.framing = Framing::Length(left - n as u64);
                Ok(n)
            }
            Framing::Chunked(_) => self.read_chunked(buf),
        }
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the client closed the connection before the end of the body",
    )
}

fn bad_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Read one CRLF- (or LF-) terminated line of at most `max` bytes, without the terminator.
fn read_line(conn: &mut BufReader<TcpStream>, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let buf = conn.fill_buf()?;
        if buf.is_empty() {
            return Err(eof());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..i]);
            conn.consume(i + 1);
            break;
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        conn.consume(n);
        if line.len() > max + 1 {
            return Err(bad_data("line too long"));
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line.len() > max {
        return Err(bad_data("line too long"));
    }
    String::from_utf8(line).map_err(|_| bad_data("line is not UTF-8"))
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
    /// snapshot), else the connection closes after them (an archive being built).
    Stream {
        len: Option<u64>,
        write: Mutex<Option<StreamFn>>,
    },
}

/// Writes a streamed body; returns the bytes written.
pub type StreamFn = Box<dyn FnOnce(&mut dyn Write) -> io::Result<u64>>;

impl Body {
    fn len(&self) -> Option<u64> {
        match self {
            Body::Empty => Some(0),
            Body::Bytes(b) => Some(b.len() as u64),
            Body::File { len, .. } => Some(*len),
            Body::Stream { len, .. } => *len,
        }
    }

    /// A body whose end only the closing connection marks.
    pub fn unframed(&self) -> bool {
        self.len().is_none()
    }

    pub fn stream(len: Option<u64>, write: StreamFn) -> Body {
        Body::Stream {
            len,
            write: Mutex::new(Some(write)),
        }
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
        let body = serde_json::json!({ "error": msg });
        Response::new(status).bytes("application/json", json_bytes(&body))
    }
}

/// Compact JSON on one line (clients such as `HttpStore` quote the first line of an error body).
pub fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    b.push(b'\n');
    b
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// One line of the access log: what was asked, what was answered, by whom, how long it took.
pub struct LogLine<'a> {
    pub peer: SocketAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub started: Instant,
    pub who: &'a str,
    pub note: &'a str,
}

impl LogLine<'_> {
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

/// Serve requests on one connection until the client closes it, it idles out, a request asks to
/// close, or `stop` is set (checked between requests only: a request in progress completes).
pub fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    t: &Timeouts,
    stop: &AtomicBool,
    handler: &dyn Fn(&mut Request) -> Response,
) {
    let _ = stream.set_nodelay(true);
    if stream.set_write_timeout(Some(t.io)).is_err() {
        return;
    }
    let mut conn = BufReader::with_capacity(64 << 10, stream);
    loop {
        if !wait_for_request(&mut conn, t.idle, stop) {
            return;
        }
        let started = Instant::now();
        let head = match read_head(&mut conn, t.head) {
            Ok(h) => h,
            Err(HeadError::Closed) => return,
            Err(HeadError::Reply(status, msg)) => {
                let resp = Response::error(status, &msg);
                let sent = write_response(conn.get_ref(), false, false, resp.status, &resp, true)
                    .unwrap_or(0);
                LogLine {
                    peer,
                    method: "-",
                    path: "-",
                    status,
                    bytes: sent,
                    started,
                    who: "-",
                    note: &format!(" ({msg})"),
                }
                .print();
                lingering_close(conn.get_ref());
                return;
            }
        };
        let framing = match body_framing(&head.headers) {
            Ok(f) => f,
            Err((status, msg)) => {
                let resp = Response::error(status, msg);
                let sent = write_response(
                    conn.get_ref(),
                    head.http10,
                    head.method == "HEAD",
                    resp.status,
                    &resp,
                    true,
                )
                .unwrap_or(0);
                LogLine {
                    peer,
                    method: &head.method,
                    path: &head.target,
                    status,
                    bytes: sent,
                    started,
                    who: "-",
                    note: &format!(" ({msg})"),
                }
                .print();
                lingering_close(conn.get_ref());
                return;
            }
        };
        let keep_alive = wants_keep_alive(&head);
        let is_head = head.method == "HEAD";
        let http10 = head.http10;
        let (method, target) = (head.method.clone(), head.target.clone());
        let declared = match framing {
            Framing::Length(n) => n,
            Framing::Chunked(_) => 0,
        };
        let expect_continue = !http10
            && head.headers.iter().any(|(n, v)| {
                n.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case("100-continue")
            });
        let (path, query) = match head.target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (head.target.clone(), String::new()),
        };
        let mut req = Request {
            method: head.method,
            path,
            query,
            headers: head.headers,
            body: BodyReader {
                conn: &mut conn,
                framing,
                declared,
                expect_continue,
                started: false,
                io_timeout: t.io,
                deadline: None,
            },
        };
        let resp = handler(&mut req);
        let clean = req.body.finish();
        drop(req);
        let close = !keep_alive || !clean || stop.load(Ordering::SeqCst) || resp.body.unframed();
        let result = write_response(conn.get_ref(), http10, is_head, resp.status, &resp, close);
        let (bytes, note) = match &result {
            Ok(n) => (*n, String::new()),
            Err(e) => (0, format!(" (response not delivered: {e})")),
        };
        LogLine {
            peer,
            method: &method,
            path: &target,
            status: resp.status,
            bytes,
            started,
            who: &resp.who,
            note: &note,
        }
        .print();
        if result.is_err() {
            return;
        }
        if close {
            if !clean {
                lingering_close(conn.get_ref());
            }
            return;
        }
    }
}

/// Wait until the next request starts arriving. False when the connection should end instead.
fn wait_for_request(conn: &mut BufReader<TcpStream>, idle: Duration, stop: &AtomicBool) -> bool {
    if !conn.buffer().is_empty() {
        return !stop.load(Ordering::SeqCst);
    }
    let deadline = Instant::now() + idle;
    if conn.get_ref().set_read_timeout(Some(POLL)).is_err() {
        return false;
    }
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        match conn.fill_buf() {
            Ok(b) => return !b.is_empty(),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

struct Head {
    method: String,
    target: String,
    http10: bool,
    headers: Vec<(String, String)>,
}

enum HeadError {
    /// Nothing to answer: the client went away or sent nothing in time.
    Closed,
    /// Answer with this status and message, then close.
    Reply(u16, String),
}

fn read_head(conn: &mut BufReader<TcpStream>, limit: Duration) -> Result<Head, HeadError> {
    let deadline = Instant::now() + limit;
    let mut total = 0usize;
    let mut next_line = |conn: &mut BufReader<TcpStream>| -> Result<String, HeadError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Reply(
                408,
                "request head not received in time".into(),
            ));
        }
        conn.get_ref()
            .set_read_timeout(Some(left))
            .map_err(|_| HeadError::Closed)?;
        match read_line(conn, MAX_HEAD) {
            Ok(l) => {
                total += l.len() + 2;
                if total > MAX_HEAD {
                    return Err(HeadError::Reply(431, "request head too large".into()));
                }
                Ok(l)
            }
            Err(e) => Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    HeadError::Reply(408, "request head not received in time".into())
                }
                io::ErrorKind::InvalidData => {
                    HeadError::Reply(400, format!("malformed request: {e}"))
                }
                _ => HeadError::Closed,
            }),
        }
    };
    let mut line = next_line(conn)?;
    // RFC 9112 2.2: ignore at least one empty line before the request line.
    if line.is_empty() {
        line = next_line(conn)?;
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Reply(400, "malformed request line".into()));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(HeadError::Reply(400, "malformed request method".into()));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HeadError::Reply(
            400,
            "malformed request target (expected /path)".into(),
        ));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => {
            return Err(HeadError::Reply(
                505,
                "only HTTP/1.0 and HTTP/1.1 are supported".into(),
            ))
        }
        _ => return Err(HeadError::Reply(400, "malformed request line".into())),
    };
    let mut headers = Vec::new();
    loop {
        let line = next_line(conn)?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(HeadError::Reply(431, "too many header fields".into()));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HeadError::Reply(400, "malformed header field".into()));
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(HeadError::Reply(400, "malformed header field name".into()));
        }
        headers.push((
            name.to_string(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        http10,
        headers,
    })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How the request body is delimited (RFC 9112 6.3), refusing the ambiguous cases that enable
/// request smuggling.
fn body_framing(headers: &[(String, String)]) -> Result<Framing, (u16, &'static str)> {
    let te: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .map(|(_, v)| v.as_str())
        .collect();
    let cl: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_str())
        .collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err((400, "both Transfer-Encoding and Content-Length given"));
        }
        let codings: Vec<String> = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        if codings != ["chunked"] {
            return Err((501, "unsupported Transfer-Encoding (only chunked)"));
        }
        return Ok(Framing::Chunked(ChunkState::Size));
    }
    let mut len: Option<u64> = None;
    for v in cl.iter().flat_map(|v| v.split(',')) {
        let v = v.trim();
        let n = v
            .parse::<u64>()
            .ok()
            .filter(|_| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .ok_or((400, "malformed Content-Length"))?;
        if len.is_some_and(|l| l != n) {
            return Err((400, "conflicting Content-Length values"));
        }
        len = Some(n);
    }
    Ok(Framing::Length(len.unwrap_or(0)))
}

fn wants_keep_alive(h: &Head) -> bool {
    let conn: Vec<String> = h
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    if conn.iter().any(|t| t == "close") {
        return false;
    }
    !h.http10 || conn.iter().any(|t| t == "keep-alive")
}

/// Write the response; the body is left out for HEAD, 204 and 304. Returns the body bytes sent.
fn write_response(
    stream: &TcpStream,
    http10: bool,
    is_head: bool,
    status: u16,
    resp: &Response,
    close: bool,
) -> io::Result<u64> {
    let mut head = String::with_capacity(512);
    let _ = write!(
        head,
        "{} {} {}\r\nDate: {}\r\nServer: appliance/{}\r\n",
        if http10 { "HTTP/1.0" } else { "HTTP/1.1" },
        status,
        reason(status),
        http_date(SystemTime::now()),
        env!("CARGO_PKG_VERSION")
    );
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    if let (false, Some(len)) = (no_body, resp.body.len()) {
        let _ = write!(head, "Content-Length: {len}\r\n");
    }
    for (n, v) in &resp.headers {
        // Header values come from our own code, but never let one break the framing.
        if n.bytes().all(is_tchar) && !v.bytes().any(|b| b == b'\r' || b == b'\n') {
            let _ = write!(head, "{n}: {v}\r\n");
        }
    }
    if close {
        head.push_str("Connection: close\r\n");
    } else if http10 {
        head.push_str("Connection: keep-alive\r\n");
    }
    head.push_str("\r\n");
    let mut w: &TcpStream = stream;
    if no_body || is_head {
        w.write_all(head.as_bytes())?;
        return Ok(0);
    }
    match &resp.body {
        Body::Empty => {
            w.write_all(head.as_bytes())?;
            Ok(0)
        }
        Body::Bytes(b) => {
            // One write for small answers: no Nagle/delayed-ACK stall between head and body.
            let mut all = head.into_bytes();
            all.extend_from_slice(b);
            w.write_all(&all)?;
            Ok(b.len() as u64)
        }
        Body::File { file, offset, len } => {
            w.write_all(head.as_bytes())?;
            let mut f: &File = file;
            f.seek(SeekFrom::Start(*offset))?;
            // std uses sendfile/splice here on Linux: no copy through user space.
            let sent = io::copy(&mut f.take(*len), &mut w)?;
            if sent != *len {
                // The file shrank under us: the promised length cannot be kept.
                let _ = stream.shutdown(Shutdown::Both);
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file ended after {sent} of {len} bytes"),
                ));
            }
            Ok(sent)
        }
        Body::Stream { len, write } => {
            w.write_all(head.as_bytes())?;
            let f = write
                .lock()
                .map_err(|_| io::Error::other("stream lock"))?
                .take();
            let Some(f) = f else {
                return Err(io::Error::other("stream already written"));
            };
            let mut out = io::BufWriter::with_capacity(1 << 16, w);
            let sent = f(&mut out)?;
            out.flush()?;
            if len.is_some_and(|l| l != sent) {
                // The promised length cannot be kept: the client must see a cut body.
                let _ = stream.shutdown(Shutdown::Both);
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream ended after {sent} of {len:?} bytes"),
                ));
            }
            Ok(sent)
        }
    }
}

/// Close a connection whose client may still be sending (a body we did not read): stop writing,
/// then read and drop for a moment, so the kernel does not answer the unread data with a reset
/// that could destroy our response before the client reads it.
fn lingering_close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut sink = [0u8; 16 << 10];
    let mut total = 0usize;
    let mut r: &TcpStream = stream;
    while total < (16 << 20) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match r.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

/// IMF-fixdate (RFC 9110 5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {mon} {year} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_208_000); // 2024-02-29 12:00:00
        assert_eq!(http_date(t), "Thu, 29 Feb 2024 12:00:00 GMT");
    }

    #[test]
    fn framing_rules() {
        let h = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert!(matches!(body_framing(&h(&[])), Ok(Framing::Length(0))));
        assert!(matches!(
            body_framing(&h(&[("Content-Length", "12")])),
            Ok(Framing::Length(12))
        ));
        assert!(matches!(
            body_framing(&h(&[("content-length", "12"), ("Content-Length", "12")])),
            Ok(Framing::Length(12))
        ));
        assert!(body_framing(&h(&[("Content-Length", "12"), ("Content-Length", "13")])).is_err());
        assert!(body_framing(&h(&[("Content-Length", "+12")])).is_err());
        assert!(body_framing(&h(&[("Content-Length", "99999999999999999999999")])).is_err());
        assert!(matches!(
            body_framing(&h(&[("Transfer-Encoding", "chunked")])),
            Ok(Framing::Chunked(_))
        ));
        assert!(body_framing(&h(&[("Transfer-Encoding", "gzip, chunked")])).is_err());
        assert!(body_framing(&h(&[
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "3")
        ]))
        .is_err());
    }
}
