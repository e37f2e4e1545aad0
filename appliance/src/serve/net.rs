//! The network side of `appliance serve`: HTTP/1.1 by hyper 1 on tokio, optionally behind
//! rustls.
//!
//! - Connections are tasks, so an idle keep-alive client or a slow sender costs a socket and a
//!   few KiB, not a worker: at most `max_connections` are open (more wait in the kernel's accept
//!   queue).
//! - Requests are bounded where the work is: at most `max_requests` handlers run at once on
//!   tokio's blocking pool (file system, snapshot readers); more wait for a slot without holding
//!   a thread. A file body is read piece by piece only as the client takes it.
//! - Timeouts: a request head, and the idle time before it on a kept-alive connection, within
//!   `head` (hyper's header timer); a body silent for `io` fails its handler; a client that takes
//!   nothing of a response for `io` loses the connection ([`WriteDeadline`]).
//! - A request refused for its token (401, 403) closes the connection.
//! - Shutdown: stop accepting, let every request in progress finish, close idle connections.

use super::http::{ChannelWriter, LogLine, Request, Response};
use super::App;
use crate::tls;
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Seek};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskCx, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 100;
/// An unread rest of a request body is read and dropped up to this size, for at most this long.
const DRAIN_LIMIT: u64 = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// A file body is read in pieces of this size.
const FILE_PIECE: u64 = 1 << 20;
const SERVER: &str = concat!("appliance/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_requests: usize,
    /// From the end of one request (or the connection's start) to the end of the next head.
    pub head: Duration,
    /// Longest silence while reading a body or writing a response.
    pub io: Duration,
}

struct Shared {
    app: Arc<App>,
    limits: Limits,
    requests: Arc<Semaphore>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A listening socket and what it serves.
pub struct Port {
    pub listener: std::net::TcpListener,
    /// HTTPS (with the server's certificate) or plain HTTP.
    pub tls: bool,
    /// Plain HTTP beside HTTPS: only the boot files (PXE firmware cannot present a CA or a
    /// token); everything else is refused with the HTTPS address, so tokens never cross in clear.
    pub boot_only: Option<String>,
}

/// What one connection's requests need to know about their port.
#[derive(Clone)]
struct Via {
    peer: SocketAddr,
    boot_only: Option<Arc<str>>,
}

/// Why serving ended.
pub struct Stopped {
    pub signal: &'static str,
    pub drained: Duration,
}

/// Serve until SIGTERM or SIGINT; SIGHUP reloads the TLS certificate. `tick` runs every
/// `every` on the blocking pool (the upload sessions' idle sweep).
pub fn serve(
    app: Arc<App>,
    ports: Vec<Port>,
    certs: Option<Arc<tls::Certs>>,
    limits: Limits,
    every: Duration,
    tick: impl Fn() + Send + Sync + 'static,
) -> Result<Stopped> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .max_blocking_threads(limits.max_requests + 64)
        .thread_name("serve")
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        let mut hup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
        let tls = match &certs {
            Some(c) => Some(tokio_rustls::TlsAcceptor::from(c.server_config()?)),
            None => None,
        };
        let shared = Arc::new(Shared {
            app,
            requests: Arc::new(Semaphore::new(limits.max_requests)),
            limits: limits.clone(),
            tls,
        });
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut acceptors = Vec::new();
        for p in ports {
            p.listener
                .set_nonblocking(true)
                .context("making the listening socket non-blocking")?;
            let listener =
                TcpListener::from_std(p.listener).context("registering the listener")?;
            acceptors.push(tokio::spawn(accept(
                listener,
                p.tls,
                p.boot_only.map(Arc::from),
                shared.clone(),
                connections.clone(),
                stop_rx.clone(),
            )));
        }
        let tick = Arc::new(tick);
        let mut ticker = tokio::time::interval(every);
        let signal = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => match &certs {
                    Some(c) => match c.reload() {
                        Ok(what) => eprintln!("appliance serve: SIGHUP: TLS certificate reloaded: {what}"),
                        Err(e) => eprintln!("appliance serve: SIGHUP: error: {e:#}; still serving the previous certificate"),
                    },
                    None => eprintln!("appliance serve: SIGHUP: nothing to reload (no TLS)"),
                },
                _ = ticker.tick() => {
                    let t = tick.clone();
                    let _ = tokio::task::spawn_blocking(move || t()).await;
                }
            }
        };
        eprintln!(
            "appliance serve: {signal}: not accepting connections; finishing the requests in progress"
        );
        // Dropping the listeners refuses new connections at once.
        for a in acceptors {
            a.abort();
            let _ = a.await;
        }
        let _ = stop_tx.send(true);
        let started = Instant::now();
        let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        tokio::select! {
            _ = connections.acquire_many(all) => {}
            _ = term.recv() => second_signal(),
            _ = int.recv() => second_signal(),
        }
        Ok(Stopped {
            signal,
            drained: started.elapsed(),
        })
    })
}

fn second_signal() {
    eprintln!("appliance serve: second signal: exiting at once");
    std::process::exit(1);
}

async fn accept(
    listener: TcpListener,
    tls: bool,
    boot_only: Option<Arc<str>>,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    let mut last_error: Option<Instant> = None;
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) {
                    continue;
                }
                // E.g. EMFILE: out of file descriptors. Say so at most once a minute, back off a
                // little and keep serving.
                if !matches!(last_error, Some(t) if t.elapsed() < Duration::from_secs(60)) {
                    eprintln!("appliance serve: error: accepting a connection: {e}");
                    last_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let via = Via {
            peer,
            boot_only: boot_only.clone(),
        };
        tokio::spawn(connection(
            stream,
            via,
            tls,
            shared.clone(),
            stop.clone(),
            permit,
        ));
    }
}

async fn connection(
    stream: TcpStream,
    via: Via,
    tls: bool,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let io = WriteDeadline::new(stream, shared.limits.io);
    let acceptor = match (&shared.tls, tls) {
        (Some(a), true) => a.clone(),
        _ => return http(TokioIo::new(io), via, shared, stop).await,
    };
    let peer = via.peer;
    match tokio::time::timeout(shared.limits.head, acceptor.accept(io)).await {
        Ok(Ok(s)) => http(TokioIo::new(s), via, shared, stop).await,
        Ok(Err(e)) => log_connection(peer, &format!("TLS handshake failed: {e}")),
        Err(_) => log_connection(peer, "TLS handshake not completed in time"),
    }
}

async fn http<I>(io: I, via: Via, shared: Arc<Shared>, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    let peer = via.peer;
    let svc = hyper::service::service_fn(move |req| respond(shared.clone(), via.clone(), req));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head)
        .max_buf_size(MAX_HEAD.max(8192))
        .max_headers(MAX_HEADERS)
        .title_case_headers(true)
        .half_close(true);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = ended {
        // A client that goes away between requests is normal; anything else is worth a line.
        if !e.is_incomplete_message() && !e.is_canceled() {
            let what = if e.is_timeout() {
                "request head not received in time".to_string()
            } else if e.is_parse() || e.is_parse_too_large() {
                format!("malformed request, answered and closed: {e}")
            } else {
                format!("connection ended: {e}")
            };
            log_connection(peer, &what);
        }
    }
}

fn log_connection(peer: SocketAddr, note: &str) {
    LogLine {
        peer,
        method: "-".into(),
        path: "-".into(),
        status: 0,
        bytes: 0,
        started: Instant::now(),
        who: "-".into(),
        note: format!(" ({note})"),
    }
    .print();
}

async fn respond(
    shared: Arc<Shared>,
    via: Via,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Outgoing>, Infallible> {
    let started = Instant::now();
    let peer = via.peer;
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |p| p.as_str().to_string());
    let method = parts.method.as_str().to_string();
    let is_head = parts.method == hyper::Method::HEAD;
    if let Some(https) = &via.boot_only {
        if !parts.uri.path().starts_with("/boot/") {
            let msg = format!(
                "this port serves boot files only (under /boot/); the store and the API are at {https}"
            );
            let log = LogLine {
                peer,
                method,
                path: target,
                status: 403,
                bytes: 0,
                started,
                who: "-".into(),
                note: String::new(),
            };
            let resp = Response::error(403, &msg);
            return Ok(to_hyper(resp, log, is_head, None, &shared.limits));
        }
    }
    // The semaphore is never closed.
    let permit = shared.requests.clone().acquire_owned().await.ok();
    let request = Request::new(&parts, body, shared.limits.io);
    let app = shared.app.clone();
    let resp = match tokio::task::spawn_blocking(move || {
        let mut request = request;
        let resp = app.handle(&mut request);
        (resp, request.unread())
    })
    .await
    {
        Ok((r, unread)) => {
            // The rest of a body the handler did not want is read and dropped while the answer
            // goes out, so that a client still sending it gets to read the answer.
            if let Some(body) = unread {
                tokio::spawn(drain(body));
            }
            r
        }
        Err(e) => {
            eprintln!("appliance serve: internal error: a handler failed ({e}) for {method} {target} from {peer}");
            Response::error(500, "internal error (see the appliance's log)")
        }
    };
    let log = LogLine {
        peer,
        method,
        path: target,
        status: resp.status,
        bytes: 0,
        started,
        who: resp.who.clone(),
        note: String::new(),
    };
    Ok(to_hyper(resp, log, is_head, permit, &shared.limits))
}

/// Read and drop up to [`DRAIN_LIMIT`] bytes of an unread body for at most [`DRAIN_TIME`].
async fn drain(mut body: Incoming) {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    let mut total = 0u64;
    while total < DRAIN_LIMIT {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => total += f.data_ref().map_or(0, |d| d.len() as u64),
            _ => return,
        }
    }
}

fn to_hyper(
    resp: Response,
    log: LogLine,
    is_head: bool,
    permit: Option<OwnedSemaphorePermit>,
    limits: &Limits,
) -> hyper::Response<Outgoing> {
    let mut b = hyper::Response::builder()
        .status(resp.status)
        .header(hyper::header::SERVER, SERVER);
    for (n, v) in &resp.headers {
        b = b.header(n.as_str(), v.as_str());
    }
    if resp.status == 401 || resp.status == 403 {
        b = b.header(hyper::header::CONNECTION, "close");
    }
    let (kind, len) = match resp.body {
        super::http::Body::Empty => (Kind::Full(None), Some(0)),
        super::http::Body::Bytes(v) => {
            let n = v.len() as u64;
            (Kind::Full(Some(Bytes::from(v))), Some(n))
        }
        super::http::Body::File { file, offset, len } => (
            Kind::File {
                file: Some(file),
                offset,
                left: len,
                pending: None,
            },
            Some(len),
        ),
        super::http::Body::Stream { len, write } if !is_head => {
            let (tx, rx) = mpsc::channel(4);
            let mut w = ChannelWriter {
                tx,
                rt: tokio::runtime::Handle::current(),
                io_timeout: limits.io,
                buf: Vec::new(),
            };
            tokio::task::spawn_blocking(move || {
                // The request slot is held until the stream is made.
                let _slot = permit;
                if let Err(e) = write(&mut w).and_then(|_| std::io::Write::flush(&mut w)) {
                    let _ = w.tx.try_send(Err(e));
                }
            });
            (Kind::Channel(rx), len)
        }
        super::http::Body::Stream { len, .. } => (Kind::Full(None), len),
    };
    let done = matches!(kind, Kind::Full(None)) || is_head;
    let body = Outgoing {
        kind,
        len,
        sent: 0,
        done,
        log,
    };
    b.body(body).unwrap_or_else(|e| {
        let mut r = hyper::Response::new(Outgoing::error(e.to_string()));
        *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// A response body: in memory, a file range read as the client takes it, or a stream a
/// blocking writer makes. Prints its access-log line when hyper is done with it.
pub struct Outgoing {
    kind: Kind,
    len: Option<u64>,
    sent: u64,
    done: bool,
    log: LogLine,
}

type Piece = io::Result<(File, Bytes)>;

enum Kind {
    Full(Option<Bytes>),
    File {
        file: Option<File>,
        offset: u64,
        left: u64,
        pending: Option<JoinHandle<Piece>>,
    },
    Channel(mpsc::Receiver<io::Result<Bytes>>),
}

impl Outgoing {
    fn error(msg: String) -> Outgoing {
        Outgoing {
            kind: Kind::Full(None),
            len: Some(0),
            sent: 0,
            done: true,
            log: LogLine {
                peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                method: "-".into(),
                path: "-".into(),
                status: 500,
                bytes: 0,
                started: Instant::now(),
                who: "-".into(),
                note: format!(" (internal error: {msg})"),
            },
        }
    }
}

impl Kind {
    fn poll_next(&mut self, cx: &mut TaskCx<'_>) -> Poll<Option<io::Result<Bytes>>> {
        match self {
            Kind::Full(b) => Poll::Ready(b.take().map(Ok)),
            Kind::Channel(rx) => rx.poll_recv(cx),
            Kind::File {
                file,
                offset,
                left,
                pending,
            } => {
                if pending.is_none() {
                    if *left == 0 {
                        return Poll::Ready(None);
                    }
                    let Some(f) = file.take() else {
                        return Poll::Ready(None);
                    };
                    let (at, n) = (*offset, (*left).min(FILE_PIECE));
                    *pending = Some(tokio::task::spawn_blocking(move || {
                        // Read into spare capacity: no zeroing of the piece before the read.
                        let mut buf = Vec::with_capacity(n as usize);
                        (&f).seek(io::SeekFrom::Start(at))?;
                        (&f).take(n).read_to_end(&mut buf)?;
                        if (buf.len() as u64) < n {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the file shrank while it was being sent",
                            ));
                        }
                        Ok((f, Bytes::from(buf)))
                    }));
                }
                let Some(task) = pending.as_mut() else {
                    return Poll::Ready(None);
                };
                let got = ready!(Pin::new(task).poll(cx));
                *pending = None;
                Poll::Ready(Some(match got {
                    Ok(Ok((f, b))) => {
                        *file = Some(f);
                        *offset += b.len() as u64;
                        *left -= b.len() as u64;
                        Ok(b)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(io::Error::other(e)),
                }))
            }
        }
    }
}

impl http_body::Body for Outgoing {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let next = ready!(this.kind.poll_next(cx));
        match &next {
            Some(Ok(b)) => this.sent += b.len() as u64,
            Some(Err(e)) => this.log.note = format!(" (response cut short: {e})"),
            None => this.done = true,
        }
        Poll::Ready(next.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::File { left, .. } => *left == 0,
            Kind::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.log.bytes = self.sent;
        if !self.done && !http_body::Body::is_end_stream(self) && self.log.note.is_empty() {
            self.log.note = " (response not delivered: the connection ended)".into();
        }
        self.log.print();
    }
}

/// A socket whose writes fail after `limit` without progress: a client that stops reading a
/// response loses its connection instead of holding it.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            timer: None,
        }
    }

    /// After a write returned Pending: Pending until the deadline, then an error.
    fn stalled<T>(&mut self, cx: &mut TaskCx<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut TaskCx<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stalled(cx),
            r => {
                self.timer = None;
                r
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(r, cx)
    }
}
