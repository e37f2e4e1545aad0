//! A TCP relay in front of the appliance that notes when the first chunk is requested, so the
//! tests can report the time from power-on to the first chunk request, and counts the requests
//! and the bytes the guest receives (the bytes on the wire, HTTP headers included).

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct ChunkWatch {
    pub port: u16,
    first_chunk: Arc<Mutex<Option<Instant>>>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    bytes_down: AtomicU64,
}

impl ChunkWatch {
    /// Listens on 127.0.0.1:`port` (0: any) and relays every connection to 127.0.0.1:`upstream`.
    pub fn start(port: u16, upstream: u16) -> Result<ChunkWatch> {
        let l = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding port {port}"))?;
        let port = l.local_addr()?.port();
        let first_chunk = Arc::new(Mutex::new(None));
        let counts = Arc::new(Counts::default());
        let (fc, n) = (first_chunk.clone(), counts.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (fc, n) = (fc.clone(), n.clone());
                std::thread::spawn(move || relay(c, upstream, fc, n));
            }
        });
        Ok(ChunkWatch {
            port,
            first_chunk,
            counts,
        })
    }

    /// When the first `GET .../chunks/...` went by.
    pub fn first_chunk(&self) -> Option<Instant> {
        *self.first_chunk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the first chunk request and zeroes the counters (before the next VM or job).
    pub fn reset(&self) {
        *self.first_chunk.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.counts.requests.store(0, Ordering::SeqCst);
        self.counts.bytes_down.store(0, Ordering::SeqCst);
    }

    /// HTTP requests seen (request lines starting with GET/HEAD/POST/PUT).
    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// Bytes relayed from the appliance to the guest: responses with their headers.
    pub fn bytes_down(&self) -> u64 {
        self.counts.bytes_down.load(Ordering::SeqCst)
    }
}

fn relay(client: TcpStream, upstream: u16, fc: Arc<Mutex<Option<Instant>>>, n: Arc<Counts>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
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
    loop {
        let k = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        let data = &buf[..k];
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
        if server.write_all(data).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
    let _ = back.join();
}
