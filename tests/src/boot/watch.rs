//! A TCP relay in front of the appliance that notes when the first chunk is requested, so the
//! tests can report the time from power-on to the first chunk request, and counts the requests
//! and the bytes the guest receives (the bytes on the wire: HTTP headers, and TLS records and
//! handshakes under HTTPS, included).
//!
//! In plain HTTP the relay reads the requests off the stream. Under HTTPS it cannot: it counts
//! bytes only, and learns the requests from the appliance's request log (one line per request,
//! naming its peer), keeping the lines whose peer is one of its own upstream connections.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct ChunkWatch {
    pub port: u16,
    first_chunk: Arc<Mutex<Option<Instant>>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    bytes_down: AtomicU64,
    connections: AtomicU64,
    /// Connections whose first byte from the client opened a TLS handshake record.
    tls_connections: AtomicU64,
    /// Connections whose client sent something else first.
    other_connections: AtomicU64,
    /// Under HTTPS: the local ports of the relay's connections to the appliance (the peers its
    /// request log names).
    peers: Mutex<HashSet<u16>>,
    /// Under HTTPS the stream is not parsed.
    opaque: bool,
}

impl ChunkWatch {
    /// Listens on 127.0.0.1:`port` (0: any) and relays every connection to 127.0.0.1:`upstream`,
    /// plain HTTP: requests are read off the stream.
    pub fn start(port: u16, upstream: u16) -> Result<ChunkWatch> {
        Self::start_inner(port, upstream, None)
    }

    /// As [`ChunkWatch::start`] for an HTTPS upstream: requests and the first chunk request are
    /// taken from `log` (the appliance's stderr), as it writes them (a line is written when its
    /// response has been sent).
    pub fn start_tls(port: u16, upstream: u16, log: &Path) -> Result<ChunkWatch> {
        Self::start_inner(port, upstream, Some(log.to_path_buf()))
    }

    fn start_inner(port: u16, upstream: u16, log: Option<PathBuf>) -> Result<ChunkWatch> {
        let l = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding port {port}"))?;
        let port = l.local_addr()?.port();
        let first_chunk = Arc::new(Mutex::new(None));
        let counts = Arc::new(Counts {
            opaque: log.is_some(),
            ..Counts::default()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (fc, n) = (first_chunk.clone(), counts.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (fc, n) = (fc.clone(), n.clone());
                std::thread::spawn(move || relay(c, upstream, fc, n));
            }
        });
        if let Some(log) = log {
            let (fc, n, stop) = (first_chunk.clone(), counts.clone(), stop.clone());
            std::thread::spawn(move || follow_log(&log, &fc, &n, &stop));
        }
        Ok(ChunkWatch {
            port,
            first_chunk,
            counts,
            stop,
        })
    }

    /// When the first `GET .../chunks/...` went by (under HTTPS: when the appliance logged it).
    pub fn first_chunk(&self) -> Option<Instant> {
        *self.first_chunk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the first chunk request and zeroes the counters (before the next VM or job).
    pub fn reset(&self) {
        *self.first_chunk.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for c in [
            &self.counts.requests,
            &self.counts.bytes_down,
            &self.counts.connections,
            &self.counts.tls_connections,
            &self.counts.other_connections,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }

    /// HTTP requests seen (plain HTTP: request lines starting with GET/HEAD/POST/PUT; HTTPS:
    /// the appliance's log lines of this relay's connections).
    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// Bytes relayed from the appliance to the guest: responses with their headers (and TLS).
    pub fn bytes_down(&self) -> u64 {
        self.counts.bytes_down.load(Ordering::SeqCst)
    }

    /// Connections relayed.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Connections that the client opened with a TLS handshake record (first byte 0x16).
    pub fn tls_connections(&self) -> u64 {
        self.counts.tls_connections.load(Ordering::SeqCst)
    }

    /// Connections whose client sent something other than a TLS handshake record first
    /// (plain HTTP); connections closed before sending anything count in neither.
    pub fn other_connections(&self) -> u64 {
        self.counts.other_connections.load(Ordering::SeqCst)
    }
}

impl Drop for ChunkWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads the appliance's request log as it grows: `TIME PEER METHOD PATH STATUS ...`.
fn follow_log(log: &Path, fc: &Mutex<Option<Instant>>, n: &Counts, stop: &AtomicBool) {
    let mut offset = 0u64;
    let mut partial = String::new();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        let Ok(mut f) = std::fs::File::open(log) else {
            continue;
        };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_end(&mut buf).is_err() {
            continue;
        }
        offset += buf.len() as u64;
        partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(i) = partial.find('\n') {
            let line: String = partial.drain(..=i).collect();
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, peer, method, path, ..] = f[..] else {
                continue;
            };
            let ours = peer
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_some_and(|p| {
                    n.peers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&p)
                });
            // `-` for no request: a failed TLS handshake, a connection closed before its head.
            if !ours || method == "-" {
                continue;
            }
            n.requests.fetch_add(1, Ordering::SeqCst);
            if method == "GET" && path.contains("/chunks/") {
                fc.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
            }
        }
    }
}

fn relay(client: TcpStream, upstream: u16, fc: Arc<Mutex<Option<Instant>>>, n: Arc<Counts>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    n.connections.fetch_add(1, Ordering::SeqCst);
    if n.opaque {
        if let Ok(a) = server.local_addr() {
            n.peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(a.port());
        }
    }
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let down = n.clone();
    let back = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(k @ 1..) = s2.read(&mut buf) {
            if c2.write_all(&buf[..k]).is_err() {
                break;
            }
            down.bytes_down.fetch_add(k as u64, Ordering::SeqCst);
        }
        let _ = c2.shutdown(Shutdown::Write);
    });
    let (mut client, mut server) = (client, server);
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = true;
    loop {
        let k = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        let data = &buf[..k];
        if first {
            let c = if data[0] == 0x16 {
                &n.tls_connections
            } else {
                &n.other_connections
            };
            c.fetch_add(1, Ordering::SeqCst);
        }
        first = false;
        if !n.opaque {
            for m in [&b"GET "[..], b"HEAD ", b"POST ", b"PUT "] {
                if data.windows(m.len()).any(|w| w == m) {
                    n.requests.fetch_add(1, Ordering::SeqCst);
                }
            }
            if data.windows(8).any(|w| w == b"/chunks/") {
                fc.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
            }
        }
        if server.write_all(data).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
    let _ = back.join();
}
