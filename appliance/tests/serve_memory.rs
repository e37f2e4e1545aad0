//! Issue 8 item 8: what authenticated clients send cannot grow `appliance serve`'s memory without
//! bound. The real server on 127.0.0.1; its peak resident size (`VmHWM` in /proc/<pid>/status)
//! is measured after each scenario of the issue and must stay far below what the issue saw
//! (1,031 MiB for uploaded indexes, 182 and 668 MiB for progress reports).

use snapshot::format::index::ChunkIndex;
use snapshot::CHUNK_SIZE;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::http::{agent, get, post_json, send, write_tokens, Server};
use common::BIN;

const UPLOAD_WEB1: &str = "upload-web1-0123456789abcdef";
const READ_WEB1: &str = "read-web1-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef0123";

fn init_store(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    let out = Command::new(BIN)
        .args(["init", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_tokens(
        &store,
        serde_json::json!({ "tokens": [
            { "name": "uploader", "token": UPLOAD_WEB1, "access": "upload", "hosts": ["web1"] },
            { "name": "reader", "token": READ_WEB1, "access": "read", "hosts": ["web1"] },
            { "name": "root", "token": ADMIN, "access": "admin" },
        ]}),
    );
    store
}

/// Peak resident set of process `pid`, in MiB.
fn peak_mib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024
}

fn open_session(srv: &Server) -> common::http::Resp {
    post_json(
        &srv.url("/api/v1/uploads"),
        Some(UPLOAD_WEB1),
        serde_json::json!({ "host": "web1" }),
    )
}

/// Two sessions of one token, each with two 256 MiB indexes (32 TiB disks), as in the issue:
/// streamed to disk, the server's peak stays small; a token's fifth session is refused with
/// 429; an aborted session's files go.
#[test]
fn uploaded_indexes_are_streamed_and_sessions_per_token_capped() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let srv = Server::start(&store, &[]);
    let pid = srv.child.id();
    let before = peak_mib(pid);
    // The largest index accepted: 8 Mi slots of a 32 TiB disk, plus the header.
    let big = ChunkIndex::new(CHUNK_SIZE * (8 << 20)).to_bytes();
    assert_eq!(big.len(), (256 << 20) + 64);
    let a = agent();
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let r = open_session(&srv);
        assert_eq!(r.status, 201, "{}", r.text());
        let u = r.json()["upload"].as_str().unwrap().to_string();
        for disk in 0..2 {
            let r = a
                .put(&srv.url(&format!("/api/v1/uploads/{u}/indexes/{disk}")))
                .set("Authorization", &format!("Bearer {UPLOAD_WEB1}"))
                .send_bytes(&big)
                .unwrap();
            assert_eq!(r.status(), 201);
        }
        sessions.push(u);
    }
    drop(big);
    let after = peak_mib(pid);
    eprintln!(
        "server peak after 2 sessions x 2 x 256 MiB indexes: {after} MiB (at start {before} MiB)"
    );
    assert!(
        after < 64,
        "the server's peak grew to {after} MiB while receiving 1 GiB of indexes (issue: 1,031 MiB)"
    );
    // The indexes are on disk, in the sessions' directories.
    for u in &sessions {
        let f = store.join(format!("tmp/uploads/{u}/disk1.idx"));
        assert_eq!(std::fs::metadata(&f).unwrap().len(), (256 << 20) + 64);
    }
    // A malformed index is refused, and so is one longer than its header says.
    let mut bad = ChunkIndex::new(CHUNK_SIZE).to_bytes();
    bad.push(0);
    let u = &sessions[0];
    let r = send(
        "PUT",
        &srv.url(&format!("/api/v1/uploads/{u}/indexes/3")),
        Some(UPLOAD_WEB1),
        &[],
        Some(&bad),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("longer than"), "{}", r.text());

    // Four sessions per token; the fifth gets 429 with a reason.
    for _ in 0..2 {
        assert_eq!(open_session(&srv).status, 201);
    }
    let r = open_session(&srv);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("4 upload sessions open"),
        "{}",
        r.text()
    );
    // Ending one makes room, and its files go with it.
    let r = send(
        "DELETE",
        &srv.url(&format!("/api/v1/uploads/{u}")),
        Some(UPLOAD_WEB1),
        &[],
        None,
    );
    assert_eq!(r.status, 204);
    let gone = store.join(format!("tmp/uploads/{u}"));
    let t0 = std::time::Instant::now();
    while gone.exists() {
        assert!(t0.elapsed().as_secs() < 5, "{} left behind", gone.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(open_session(&srv).status, 201);
}

/// 3,000 progress reports of 60 KiB for made-up hosts are refused (413), reports for a known
/// host keep one small record, and the listing stays small.
#[test]
fn progress_reports_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    std::fs::create_dir_all(store.join("hosts/web1")).unwrap();
    let srv = Server::start(&store, &[]);
    let pid = srv.child.id();
    let a = agent();
    let filler = "x".repeat(60 << 10);
    for i in 0..3000 {
        let body = serde_json::json!({ "state": "running", "message": filler }).to_string();
        let r = a
            .post(&srv.url(&format!("/api/v1/progress/made-up-{i}")))
            .set("Authorization", &format!("Bearer {ADMIN}"))
            .set("Content-Type", "application/json")
            .send_string(&body);
        match r {
            Err(ureq::Error::Status(413, _)) => {}
            other => panic!("a 60 KiB report for a made-up host: {other:?}"),
        }
    }
    // Too big for one record.
    let r = post_json(
        &srv.url("/api/v1/progress/web1"),
        Some(READ_WEB1),
        serde_json::json!({ "state": "running", "message": filler }),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    let msg = "y".repeat(12 << 10);
    for _ in 0..500 {
        let r = post_json(
            &srv.url("/api/v1/progress/web1"),
            Some(READ_WEB1),
            serde_json::json!({ "state": "running", "message": msg }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = get(&srv.url("/api/v1/progress"), Some(ADMIN));
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert!(r.body.len() < 16 << 10, "listing of {} bytes", r.body.len());
    let peak = peak_mib(pid);
    eprintln!("server peak after 3,000 + 500 progress reports: {peak} MiB");
    assert!(
        peak < 32,
        "the server's peak grew to {peak} MiB (issue: 182 MiB)"
    );
}
