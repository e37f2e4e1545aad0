//! A TCP relay in front of the appliance that notes when the first chunk is requested, so the
//! tests can report the time from power-on to the first chunk request.

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct ChunkWatch {
    pub port: u16,
    first_chunk: Arc<Mutex<Option<Instant>>>,
    requests: Arc<Mutex<u64>>,
}

impl ChunkWatch {
    /// Listens on 127.0.0.1:`port` (0: any) and relays every connection to 127.0.0.1:`upstream`.
    pub fn start(port: u16, upstream: u16) -> Result<ChunkWatch> {
        let l = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding port {port}"))?;
        let port = l.local_addr()?.port();
        let first_chunk = Arc::new(Mutex::new(None));
        let requests = Arc::new(Mutex::new(0));
        let (fc, rq) = (first_chunk.clone(), requests.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (fc, rq) = (fc.clone(), rq.clone());
                std::thread::spawn(move || relay(c, upstream, fc, rq));
            }
        });
        Ok(ChunkWatch {
            port,
            first_chunk,
            requests,
        })
    }

    /// When the first `GET .../chunks/...` went by.
    pub fn first_chunk(&self) -> Option<Instant> {
        *self.first_chunk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the first chunk request (before the next VM).
    pub fn reset(&self) {
        *self.first_chunk.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// HTTP requests seen (request lines starting with GET/HEAD/POST/PUT).
    pub fn requests(&self) -> u64 {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn relay(client: TcpStream, upstream: u16, fc: Arc<Mutex<Option<Instant>>>, rq: Arc<Mutex<u64>>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
    let (mut client, mut server) = (client, server);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        for m in [&b"GET "[..], b"HEAD ", b"POST ", b"PUT "] {
            if data.windows(m.len()).any(|w| w == m) {
                *rq.lock().unwrap_or_else(|e| e.into_inner()) += 1;
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
