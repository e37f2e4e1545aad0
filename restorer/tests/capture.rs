//! `restorer capture` against a token-protected appliance whose commit answer is lost (issue 8,
//! item 14): the commit is retried, finds its session gone, and must then check with the same
//! token (and CA, timeouts) as the rest of the capture that the snapshot exists.
//! Needs `cargo build -p appliance`.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A TCP relay to `upstream` that forwards everything, except that the answer to the first
/// `POST .../commit` is read from the appliance and thrown away, and the client's connection
/// closed: the commit happened, the client never hears of it.
fn lossy_commit_proxy(upstream: u16) -> (u16, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dropped = Arc::new(AtomicBool::new(false));
    let dropped2 = dropped.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let dropped = dropped2.clone();
            std::thread::spawn(move || relay(client, upstream, &dropped));
        }
    });
    (port, dropped)
}

fn relay(client: TcpStream, upstream: u16, dropped: &Arc<AtomicBool>) {
    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    // Set before the commit's bytes reach the appliance, so before its answer can come back.
    let drop_next = Arc::new(AtomicBool::new(false));
    let (mut c_r, mut u_w) = (client.try_clone().unwrap(), up.try_clone().unwrap());
    let (mut u_r, mut c_w) = (up, client);
    let flag = drop_next.clone();
    let first = dropped.clone();
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = c_r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.starts_with("POST /api/v1/uploads/")
                && text.lines().next().is_some_and(|l| l.contains("/commit "))
                && !first.swap(true, Ordering::SeqCst)
            {
                flag.store(true, Ordering::SeqCst);
            }
            if u_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = u_w.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = u_r.read(&mut buf) {
        if n == 0 {
            break;
        }
        if drop_next.load(Ordering::SeqCst) {
            // The commit's answer: swallowed, and the client cut off.
            break;
        }
        if c_w.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = c_w.shutdown(Shutdown::Both);
    let _ = u_r.shutdown(Shutdown::Both);
    let _ = t.join();
}

#[test]
fn lost_commit_is_rechecked_with_the_captures_token() {
    let env = Env::new("capture-lost-commit");
    let token = "capture-token-0123456789abcdef";
    std::fs::write(
        env.store.join("private/tokens.json"),
        format!(r#"{{"tokens":[{{"token":"{token}","access":"upload","hosts":["lost1"]}}]}}"#),
    )
    .unwrap();
    let srv = env.serve();
    let upstream: u16 = srv
        .url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/store")
        .parse()
        .unwrap();
    let (port, dropped) = lossy_commit_proxy(upstream);
    let image = env.dir.join("disk.raw");
    let mut data = vec![0u8; 8 * MIB as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&image, &data).unwrap();
    let out = restorer()
        .args([
            "capture", "--json", "--raw", "--host", "lost1", "--token", token,
        ])
        .args(["--retry-for", "20s", "--to"])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(&image)
        .run()
        .no_panic();
    assert!(
        dropped.load(Ordering::SeqCst),
        "the commit's answer was not dropped:\n{}",
        out.describe()
    );
    assert!(out.success(), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let id = v["snapshot"].as_str().unwrap();
    assert!(
        env.store
            .join(format!("hosts/lost1/snapshots/{id}/manifest.json"))
            .exists(),
        "{v}"
    );
}
