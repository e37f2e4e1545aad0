//! `appliance serve` end to end: the real binary on 127.0.0.1, a store made with `appliance init`,
//! snapshots committed through the upload API, read back through `snapshot::store::HttpStore`.

use sha2::{Digest as _, Sha256};
use snapshot::format::index::{ChunkIndex, Slot};
use snapshot::format::Digest;
use snapshot::manifest::{Disk, DiskTotals, Firmware, Hardware, Manifest, MANIFEST_VERSION};
use snapshot::ptable::PartitionTable;
use snapshot::sign::PublicKey;
use snapshot::store::{http::Options, open_snapshot, HttpStore};
use snapshot::{encode_chunk, CHUNK_SIZE};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::http::{get, post_json, send, write_tokens, Server};
use common::BIN;

// ---------------------------------------------------------------------------------------------
// Harness

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
    store
}

fn store_pubkey(store: &Path) -> PublicKey {
    let out = Command::new(BIN)
        .args(["pubkey", "--store"])
        .arg(store)
        .output()
        .unwrap();
    assert!(out.status.success());
    PublicKey::parse(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

/// Send raw bytes, half-close, and read the whole answer.
fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A disk image of `slots` 4 MiB slots (the last `tail` bytes long when non-zero): data slots
/// of pseudo-random but compressible bytes, and every slot at an index in `zero` all zeros.
fn disk_image(seed: u64, slots: usize, tail: usize, zero: &[usize]) -> Vec<u8> {
    let size =
        (slots - 1) * CHUNK_SIZE as usize + if tail > 0 { tail } else { CHUNK_SIZE as usize };
    let mut v = vec![0u8; size];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (i, c) in v.chunks_mut(CHUNK_SIZE as usize).enumerate() {
        if zero.contains(&i) {
            continue;
        }
        for b in c.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Small alphabet: zstd shrinks it, the blob is zstd-encoded.
            let w = (x & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes();
            b.copy_from_slice(&w[..b.len()]);
        }
    }
    v
}

/// The chunk index of an image and the blobs of its data slots.
fn chunk_image(img: &[u8]) -> (ChunkIndex, Vec<(Digest, Vec<u8>)>) {
    let mut idx = ChunkIndex::new(img.len() as u64);
    let mut blobs: Vec<(Digest, Vec<u8>)> = Vec::new();
    for i in 0..idx.len() {
        let (off, len) = idx.span(i);
        let data = &img[off as usize..(off + len) as usize];
        if data.iter().all(|&b| b == 0) {
            idx.set(i, Slot::Zeros);
        } else {
            let d = Digest::of(data);
            idx.set(i, Slot::Data(d));
            if !blobs.iter().any(|(x, _)| *x == d) {
                blobs.push((d, encode_chunk(data, 3)));
            }
        }
    }
    (idx, blobs)
}

fn manifest_for(disks: &[(&ChunkIndex, u64)]) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        // The server replaces host, snapshot and created with its own.
        host: "client-says".into(),
        snapshot: "client-says".into(),
        created: "1970-01-01T00:00:00Z".into(),
        sequence: None,
        firmware: Firmware::Bios,
        hardware: Hardware::default(),
        chunk_size: CHUNK_SIZE,
        disks: disks
            .iter()
            .enumerate()
            .map(|(n, (idx, stored))| {
                let data = idx
                    .slots()
                    .filter(|(_, s)| matches!(s, Slot::Data(_)))
                    .count() as u64;
                Disk {
                    number: n as u32,
                    size: idx.disk_size,
                    logical_sector: 512,
                    physical_sector: 512,
                    table: PartitionTable::None,
                    partitions: Vec::new(),
                    index_sha256: hex::encode(Sha256::digest(idx.to_bytes())),
                    totals: DiskTotals {
                        used_bytes: idx.disk_size,
                        data_chunks: data,
                        zero_chunks: idx.len() as u64 - data,
                        unused_chunks: 0,
                        stored_bytes: *stored,
                    },
                }
            })
            .collect(),
    }
}

/// Upload `images` as a snapshot of `host` the way a capture client does; returns its id.
fn upload_snapshot(srv: &Server, token: Option<&str>, host: &str, images: &[Vec<u8>]) -> String {
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        token,
        serde_json::json!({ "host": host }),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let u = r.json()["upload"].as_str().unwrap().to_string();
    let mut disks = Vec::new();
    for (n, img) in images.iter().enumerate() {
        let (idx, blobs) = chunk_image(img);
        let digests: Vec<String> = blobs.iter().map(|(d, _)| d.hex()).collect();
        let r = post_json(
            &srv.url(&format!("/api/v1/uploads/{u}/missing")),
            token,
            serde_json::json!({ "digests": digests }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let missing: Vec<String> = serde_json::from_value(r.json()["missing"].clone()).unwrap();
        for (d, blob) in &blobs {
            if missing.contains(&d.hex()) {
                let r = send(
                    "PUT",
                    &srv.url(&format!("/api/v1/uploads/{u}/chunks/{d}")),
                    token,
                    &[],
                    Some(blob),
                );
                assert!(r.status == 201 || r.status == 200, "{}", r.text());
            }
        }
        let r = send(
            "PUT",
            &srv.url(&format!("/api/v1/uploads/{u}/indexes/{n}")),
            token,
            &[],
            Some(&idx.to_bytes()),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let stored = blobs.iter().map(|(_, b)| b.len() as u64).sum();
        disks.push((idx, stored));
    }
    let refs: Vec<(&ChunkIndex, u64)> = disks.iter().map(|(i, s)| (i, *s)).collect();
    let m = manifest_for(&refs);
    let r = send(
        "POST",
        &srv.url(&format!("/api/v1/uploads/{u}/commit")),
        token,
        &[],
        Some(&m.to_bytes()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["host"], host);
    v["snapshot"].as_str().unwrap().to_string()
}

fn http_store(srv: &Server, token: Option<&str>) -> HttpStore {
    HttpStore::new(
        &srv.url("/store"),
        Options {
            token: token.map(str::to_string),
            retry_for: Duration::from_secs(2),
            timeout: Duration::from_secs(30),
            ..Options::default()
        },
    )
    .unwrap()
}

const READ_WEB1: &str = "read-web1-0123456789abcdef";
const UPLOAD_WEB1: &str = "upload-web1-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef0123";
const READ_ALL: &str = "read-all-0123456789abcdef";

fn tokens_json() -> serde_json::Value {
    serde_json::json!({ "tokens": [
        { "name": "reader", "token": READ_WEB1, "access": "read", "hosts": ["web1"] },
        { "name": "uploader", "token": UPLOAD_WEB1, "access": "upload", "hosts": ["web1"] },
        { "name": "root", "token": ADMIN, "access": "admin" },
        { "token": READ_ALL, "access": "read" },
    ]})
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn upload_flow_then_read_back_through_http_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let srv = Server::start(&store, &[]);
    srv.wait_log("WARNING: no");

    let img = disk_image(1, 3, 1 << 20, &[1]);
    let (idx, blobs) = chunk_image(&img);
    assert_eq!(blobs.len(), 2);
    let (d0, b0) = &blobs[0];
    let (d1, b1) = &blobs[1];

    let r = post_json(
        &srv.url("/api/v1/uploads"),
        None,
        serde_json::json!({ "host": "web1" }),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let u = r.json()["upload"].as_str().unwrap().to_string();
    let id = r.json()["snapshot"].as_str().unwrap().to_string();
    assert!(
        id.len() == 16 && id.as_bytes()[8] == b'T' && id.ends_with('Z'),
        "{id}"
    );
    let up = |p: &str| srv.url(&format!("/api/v1/uploads/{u}{p}"));

    let r = post_json(
        &up("/missing"),
        None,
        serde_json::json!({ "digests": [d0.hex(), d1.hex(), d0.hex()] }),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["missing"], serde_json::json!([d0.hex(), d1.hex()]));
    let r = post_json(
        &up("/missing"),
        None,
        serde_json::json!({ "digests": ["xyz"] }),
    );
    assert_eq!(r.status, 400);

    // A blob that does not hash to the digest in the URL, a corrupt blob, an oversized body.
    let r = send("PUT", &up(&format!("/chunks/{d0}")), None, &[], Some(b1));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("hashes to"));
    let mut bad = b0.clone();
    let n = bad.len();
    bad[n - 10] ^= 0x55;
    let r = send("PUT", &up(&format!("/chunks/{d0}")), None, &[], Some(&bad));
    assert_eq!(r.status, 400, "{}", r.text());
    let huge = vec![7u8; (4 << 20) + (64 << 10) + 1];
    let r = send("PUT", &up(&format!("/chunks/{d0}")), None, &[], Some(&huge));
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(!store.join(d0.chunk_path()).exists());

    let r = send("PUT", &up(&format!("/chunks/{d0}")), None, &[], Some(b0));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = send("PUT", &up(&format!("/chunks/{d0}")), None, &[], Some(b0));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        &up("/missing"),
        None,
        serde_json::json!({ "digests": [d0.hex(), d1.hex()] }),
    );
    assert_eq!(r.json()["missing"], serde_json::json!([d1.hex()]));

    let r = send("PUT", &up("/indexes/0"), None, &[], Some(b"not an index"));
    assert_eq!(r.status, 400);
    let r = send("PUT", &up("/indexes/0"), None, &[], Some(&idx.to_bytes()));
    assert_eq!(r.status, 201, "{}", r.text());

    // Manifest whose index hash is wrong.
    let mut m = manifest_for(&[(&idx, (b0.len() + b1.len()) as u64)]);
    let good_sha = m.disks[0].index_sha256.clone();
    m.disks[0].index_sha256 = "00".repeat(32);
    let r = send("POST", &up("/commit"), None, &[], Some(&m.to_bytes()));
    assert_eq!(r.status, 400, "{}", r.text());
    // A manifest with a second disk whose index was never uploaded.
    let mut m2 = manifest_for(&[(&idx, 0), (&idx, 0)]);
    m2.disks[0].index_sha256 = good_sha.clone();
    let r = send("POST", &up("/commit"), None, &[], Some(&m2.to_bytes()));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("disk 1"), "{}", r.text());
    m.disks[0].index_sha256 = good_sha;
    // d1 is still missing: refused, the session stays usable.
    let r = send("POST", &up("/commit"), None, &[], Some(&m.to_bytes()));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["missing"], serde_json::json!([d1.hex()]));

    let r = send("PUT", &up(&format!("/chunks/{d1}")), None, &[], Some(b1));
    assert_eq!(r.status, 201);
    let r = send("POST", &up("/commit"), None, &[], Some(&m.to_bytes()));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!({ "host": "web1", "snapshot": id })
    );
    // The session ended with the commit.
    let r = send("POST", &up("/commit"), None, &[], Some(&m.to_bytes()));
    assert_eq!(r.status, 404);

    // Listings.
    let r = get(&srv.url("/api/v1/hosts"), None);
    assert_eq!(
        r.json(),
        serde_json::json!([{ "host": "web1", "latest": id, "snapshots": 1 }])
    );
    let r = get(&srv.url("/api/v1/hosts/web1/snapshots"), None);
    let v = r.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["snapshot"], id.as_str());
    assert_eq!(v[0]["latest"], true);
    assert!(v[0]["created"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        v[0]["disks"],
        serde_json::json!([{ "size": img.len(), "used_bytes": img.len(),
                             "stored_bytes": b0.len() + b1.len() }])
    );
    let r = get(
        &srv.url(&format!("/api/v1/hosts/web1/snapshots/{id}")),
        None,
    );
    assert_eq!(r.status, 200);
    let served = Manifest::parse(&r.body, "api").unwrap();
    assert_eq!(
        (served.host.as_str(), served.snapshot.as_str()),
        ("web1", id.as_str())
    );
    assert_ne!(served.created, "1970-01-01T00:00:00Z");
    assert_eq!(
        get(&srv.url("/api/v1/hosts/web2/snapshots"), None).status,
        404
    );
    assert_eq!(
        get(&srv.url("/api/v1/hosts/web1/snapshots/nope"), None).status,
        404
    );
    assert_eq!(
        get(&srv.url("/api/v1/hosts/..%2Fx/snapshots"), None).status,
        400
    );

    // The store's key, through the API, checks the signature the commit made.
    let key = store_pubkey(&store);
    let r = get(&srv.url("/api/v1/pubkey"), None);
    assert_eq!(r.json()["pubkey"], key.to_hex());

    let opts = Options {
        retry_for: Duration::from_secs(2),
        ..Options::default()
    };
    let hs = snapshot::store::open(&srv.url("/store"), &opts).unwrap();
    let snap = open_snapshot(hs.as_ref(), "web1", None, Some(&key)).unwrap();
    assert_eq!(snap.manifest.snapshot, id);
    assert_eq!(snap.indexes, vec![idx.clone()]);
    let out = tempfile::NamedTempFile::new().unwrap();
    out.as_file().set_len(img.len() as u64).unwrap();
    snapshot::reader::read_disk(hs.as_ref(), &snap.indexes[0], out.as_file(), 2).unwrap();
    assert!(
        std::fs::read(out.path()).unwrap() == img,
        "restored image differs"
    );

    // A second snapshot of the same host through the helper: latest moves to it.
    let id2 = upload_snapshot(&srv, None, "web1", std::slice::from_ref(&img));
    assert!(id2 > id, "{id2} after {id}");
    let r = get(&srv.url("/api/v1/hosts"), None);
    assert_eq!(r.json()[0]["latest"], id2.as_str());
    assert_eq!(r.json()[0]["snapshots"], 2);
}

#[test]
fn store_files_ranges_head_etag_and_hidden_paths() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let srv = Server::start(&store, &[]);
    let img = disk_image(2, 1, 3 << 20, &[]);
    let id = upload_snapshot(&srv, None, "web1", std::slice::from_ref(&img));
    let (_, blobs) = chunk_image(&img);
    let (d, blob) = &blobs[0];
    let len = blob.len();
    let chunk_url = srv.url(&format!("/store/{}", d.chunk_path()));

    let r = send("HEAD", &chunk_url, None, &[], None);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.h("content-length"), Some(len.to_string().as_str()));
    assert_eq!(r.h("etag"), Some(format!("\"{d}\"").as_str()));
    assert_eq!(
        r.h("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(r.h("accept-ranges"), Some("bytes"));

    let r = get(&chunk_url, None);
    assert_eq!(r.status, 200);
    assert!(r.body == *blob);

    let range = |spec: &str| send("GET", &chunk_url, None, &[("Range", spec)], None);
    let r = range("bytes=0-15");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, blob[..16]);
    assert_eq!(
        r.h("content-range"),
        Some(format!("bytes 0-15/{len}").as_str())
    );
    assert_eq!(r.h("content-length"), Some("16"));
    let r = range("bytes=-4");
    assert_eq!((r.status, &r.body[..]), (206, &blob[len - 4..]));
    let r = range("bytes=16-");
    assert_eq!((r.status, &r.body[..]), (206, &blob[16..]));
    let r = range(&format!("bytes={len}-"));
    assert_eq!(r.status, 416);
    assert_eq!(
        r.h("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
    // Several ranges: the whole file.
    let r = range("bytes=0-1,4-5");
    assert_eq!((r.status, r.body.len()), (200, len));
    // If-Range with another tag: the whole file.
    let r = send(
        "GET",
        &chunk_url,
        None,
        &[("Range", "bytes=0-1"), ("If-Range", "\"other\"")],
        None,
    );
    assert_eq!((r.status, r.body.len()), (200, len));
    let r = send(
        "GET",
        &chunk_url,
        None,
        &[("If-None-Match", &format!("\"{d}\""))],
        None,
    );
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());

    // `latest` and manifests: revalidated every time, ETag from size and mtime.
    let r = get(&srv.url("/store/hosts/web1/latest"), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.text().trim(), id);
    assert_eq!(r.h("cache-control"), Some("no-cache"));
    let etag = r.h("etag").unwrap().to_string();
    assert!(etag.starts_with('"') && !etag.contains(&d.hex()));
    let r = send(
        "GET",
        &srv.url("/store/hosts/web1/latest"),
        None,
        &[("If-None-Match", &etag)],
        None,
    );
    assert_eq!(r.status, 304);
    let r = get(
        &srv.url(&format!("/store/hosts/web1/snapshots/{id}/manifest.json")),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.h("cache-control"), Some("no-cache"));
    assert_eq!(r.h("content-type"), Some("application/json"));
    let r = send(
        "HEAD",
        &srv.url(&format!("/store/hosts/web1/snapshots/{id}/disk0.idx")),
        None,
        &[],
        None,
    );
    assert_eq!(r.status, 200);

    // Never served: private/, tmp/, dot components, directories, unknown files.
    std::fs::write(store.join("tmp/leftover"), b"x").unwrap();
    std::fs::write(store.join(".hidden"), b"x").unwrap();
    for p in [
        "/store/private/signing.key",
        "/store/private/gc.lock",
        "/store/tmp/leftover",
        "/store/.hidden",
        "/store/hosts/web1",
        "/store/hosts/web1/snapshots/",
        "/store/nothing",
        "/store/",
        "/boot/anything",
        "/",
    ] {
        assert_eq!(get(&srv.url(p), None).status, 404, "{p}");
    }
    for p in [
        "/store/../store/private/signing.key",
        "/store/hosts/../private/signing.key",
        "/store/%2e%2e/store/store.json",
        "/store/private%2fsigning.key",
        "/store/hosts/./web1/latest",
        "/store//store.json",
        "/store/.%2e/store.json",
    ] {
        let resp = raw(
            &srv.addr(),
            format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        assert!(resp.starts_with("HTTP/1.1 404 "), "{p}: {resp}");
    }
    let r = send("POST", &srv.url("/store/store.json"), None, &[], Some(b""));
    assert_eq!(r.status, 405);
    assert_eq!(r.h("allow"), Some("GET, HEAD"));
    let r = send("GET", &srv.url("/api/v1/uploads"), None, &[], None);
    assert_eq!(r.status, 405);

    // One access-log line per request, with status and bytes.
    srv.wait_log(&format!("GET /store/{} 206 16 ", d.chunk_path()));
}

#[test]
fn commit_with_a_missing_chunk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let srv = Server::start(&store, &[]);
    let img = disk_image(3, 2, 0, &[]);
    let (idx, blobs) = chunk_image(&img);
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        None,
        serde_json::json!({ "host": "db1" }),
    );
    let u = r.json()["upload"].as_str().unwrap().to_string();
    // Only the first chunk goes up.
    let (d0, b0) = &blobs[0];
    let r = send(
        "PUT",
        &srv.url(&format!("/api/v1/uploads/{u}/chunks/{d0}")),
        None,
        &[],
        Some(b0),
    );
    assert_eq!(r.status, 201);
    let r = send(
        "PUT",
        &srv.url(&format!("/api/v1/uploads/{u}/indexes/0")),
        None,
        &[],
        Some(&idx.to_bytes()),
    );
    assert_eq!(r.status, 201);
    let m = manifest_for(&[(&idx, 0)]);
    let r = send(
        "POST",
        &srv.url(&format!("/api/v1/uploads/{u}/commit")),
        None,
        &[],
        Some(&m.to_bytes()),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let v = r.json();
    assert_eq!(v["missing"], serde_json::json!([blobs[1].0.hex()]));
    assert!(v["error"].as_str().unwrap().contains("1 chunks"));
    // Nothing was published.
    assert_eq!(
        get(&srv.url("/api/v1/hosts"), None).json(),
        serde_json::json!([])
    );
    assert!(!store.join("hosts/db1/latest").exists());
    // DELETE ends the session.
    let r = send(
        "DELETE",
        &srv.url(&format!("/api/v1/uploads/{u}")),
        None,
        &[],
        None,
    );
    assert_eq!(r.status, 204);
    let r = send(
        "DELETE",
        &srv.url(&format!("/api/v1/uploads/{u}")),
        None,
        &[],
        None,
    );
    assert_eq!(r.status, 404);
}

#[test]
fn tokens_authenticate_and_scope_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    write_tokens(&store, tokens_json());
    let srv = Server::start(&store, &[]);
    assert!(!srv.log().contains("WARNING: no "), "{}", srv.log());
    let img1 = disk_image(4, 1, 1 << 20, &[]);
    let img2 = disk_image(5, 1, 1 << 20, &[]);
    let id1 = upload_snapshot(&srv, Some(ADMIN), "web1", &[img1]);
    let id2 = upload_snapshot(&srv, Some(ADMIN), "web2", std::slice::from_ref(&img2));
    let web2_chunk = format!("/store/{}", chunk_image(&img2).1[0].0.chunk_path());

    // No token, an unknown token, a malformed header: 401 with a challenge.
    let r = get(&srv.url("/store/store.json"), None);
    assert_eq!(r.status, 401);
    assert!(r.h("www-authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(
        get(&srv.url("/api/v1/hosts"), Some("wrong-token-0123456789")).status,
        401
    );
    let r = send(
        "GET",
        &srv.url("/store/store.json"),
        None,
        &[("Authorization", &format!("Basic {ADMIN}"))],
        None,
    );
    assert_eq!(r.status, 401);

    // A read token for web1.
    let t = Some(READ_WEB1);
    assert_eq!(get(&srv.url("/store/store.json"), t).status, 200);
    assert_eq!(get(&srv.url("/store/hosts/web1/latest"), t).status, 200);
    assert_eq!(get(&srv.url("/store/hosts/web2/latest"), t).status, 403);
    assert_eq!(
        get(
            &srv.url(&format!("/store/hosts/web2/snapshots/{id2}/manifest.json")),
            t
        )
        .status,
        403
    );
    // Chunks are content-addressed: readable with any valid token.
    assert_eq!(get(&srv.url(&web2_chunk), t).status, 200);
    let hosts = get(&srv.url("/api/v1/hosts"), t).json();
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    assert_eq!(hosts[0]["host"], "web1");
    assert_eq!(get(&srv.url("/api/v1/hosts/web1/snapshots"), t).status, 200);
    assert_eq!(get(&srv.url("/api/v1/hosts/web2/snapshots"), t).status, 403);
    assert_eq!(
        get(&srv.url(&format!("/api/v1/hosts/web2/snapshots/{id2}")), t).status,
        403
    );
    assert_eq!(get(&srv.url("/api/v1/pubkey"), t).status, 200);
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        t,
        serde_json::json!({ "host": "web1" }),
    );
    assert_eq!(r.status, 403);

    // The same through HttpStore, as the restorer would.
    let key = store_pubkey(&store);
    let hs = http_store(&srv, t);
    let snap = open_snapshot(&hs, "web1", None, Some(&key)).unwrap();
    assert_eq!(snap.manifest.snapshot, id1);
    let e = match open_snapshot(&hs, "web2", None, Some(&key)) {
        Ok(_) => panic!("web2 readable with a web1 token"),
        Err(e) => e,
    };
    assert!(format!("{e:#}").contains("403"), "{e:#}");

    // An unscoped read token sees both hosts.
    let hosts = get(&srv.url("/api/v1/hosts"), Some(READ_ALL)).json();
    assert_eq!(hosts.as_array().unwrap().len(), 2);

    // An upload token for web1: uploads for web1 only; its session is its host's.
    let t = Some(UPLOAD_WEB1);
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        t,
        serde_json::json!({ "host": "web2" }),
    );
    assert_eq!(r.status, 403);
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        t,
        serde_json::json!({ "host": "web1" }),
    );
    assert_eq!(r.status, 201);
    let u = r.json()["upload"].as_str().unwrap().to_string();
    let missing = srv.url(&format!("/api/v1/uploads/{u}/missing"));
    let body = serde_json::json!({ "digests": [] });
    assert_eq!(
        post_json(&missing, Some(READ_WEB1), body.clone()).status,
        403
    );
    assert_eq!(post_json(&missing, None, body.clone()).status, 401);
    assert_eq!(post_json(&missing, t, body.clone()).status, 200);
    assert_eq!(post_json(&missing, Some(ADMIN), body).status, 200);
    assert_eq!(get(&srv.url("/store/hosts/web2/latest"), t).status, 403);

    // The log names tokens, never shows them.
    srv.wait_log("token=reader");
    let log = srv.wait_log("token=#3");
    for secret in [READ_WEB1, UPLOAD_WEB1, ADMIN, READ_ALL] {
        assert!(!log.contains(secret), "token {secret} in the log");
    }

    // Tokens are re-read when the file changes: revoke the reader, add another.
    let mut v = tokens_json();
    v["tokens"][0]["token"] = "replacement-0123456789abcdef".into();
    write_tokens(&store, v);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&srv.url("/store/store.json"), Some(READ_WEB1)).status != 401 {
        assert!(Instant::now() < deadline, "old token still accepted");
        // mtime granularity: rewrite so that size or inode changes are seen too.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        get(
            &srv.url("/store/store.json"),
            Some("replacement-0123456789abcdef")
        )
        .status,
        200
    );
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let mut srv = Server::start(&store, &[]);
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        None,
        serde_json::json!({ "host": "web1" }),
    );
    let u = r.json()["upload"].as_str().unwrap().to_string();
    let img = disk_image(6, 1, 0, &[]);
    let (_, blobs) = chunk_image(&img);
    let (d, blob) = &blobs[0];

    // Half a chunk upload, then SIGTERM.
    let mut s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "PUT /api/v1/uploads/{u}/chunks/{d} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    )
    .unwrap();
    let half = blob.len() / 2;
    s.write_all(&blob[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    srv.signal("-TERM");

    // New connections are refused while the request in flight goes on.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(srv.addr()).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(srv.child.try_wait().unwrap().is_none(), "exited too early");

    s.write_all(&blob[half..]).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 201 "), "{resp}");
    assert!(resp.contains("Connection: close"), "{resp}");
    assert!(store.join(d.chunk_path()).exists());

    let st = srv.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "{}", srv.log());
    srv.wait_log("SIGTERM");
    srv.wait_log("aborted (server shutting down)");
}

#[test]
fn upload_sessions_hold_the_gc_lock_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let srv = Server::start(&store, &["--upload-idle-timeout", "2s"]);
    let gc = || {
        Command::new(BIN)
            .args(["gc", "--store"])
            .arg(&store)
            .output()
            .unwrap()
    };
    let open = || {
        let r = post_json(
            &srv.url("/api/v1/uploads"),
            None,
            serde_json::json!({ "host": "web1" }),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["upload"].as_str().unwrap().to_string()
    };
    let u = open();
    let out = gc();
    assert!(!out.status.success(), "gc ran during an upload");
    let r = send(
        "DELETE",
        &srv.url(&format!("/api/v1/uploads/{u}")),
        None,
        &[],
        None,
    );
    assert_eq!(r.status, 204);
    let out = gc();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Idle sessions end by themselves and release the lock.
    let u = open();
    assert!(!gc().status.success());
    std::thread::sleep(Duration::from_millis(3500));
    let r = post_json(
        &srv.url(&format!("/api/v1/uploads/{u}/missing")),
        None,
        serde_json::json!({ "digests": [] }),
    );
    assert_eq!(r.status, 404);
    assert!(gc().status.success());
    srv.wait_log("expired (idle)");

    // While gc holds the store, opening a session is refused with 503, not queued.
    let held = Command::new("flock")
        .args(["-x", "-n"])
        .arg(store.join("private/gc.lock"))
        .args(["sleep", "3"])
        .spawn();
    if let Ok(mut child) = held {
        std::thread::sleep(Duration::from_millis(500));
        let r = post_json(
            &srv.url("/api/v1/uploads"),
            None,
            serde_json::json!({ "host": "web1" }),
        );
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.h("retry-after"), Some("60"));
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn hostile_and_odd_requests_are_answered_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let srv = Server::start(&store, &[]);
    let a = srv.addr();
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        None,
        serde_json::json!({ "host": "web1" }),
    );
    let u = r.json()["upload"].as_str().unwrap().to_string();
    let img = disk_image(7, 1, 1 << 20, &[]);
    let (_, blobs) = chunk_image(&img);
    let (d, blob) = &blobs[0];

    // A body declared far larger than memory: refused from the header, nothing allocated.
    let resp = raw(
        &a,
        format!("PUT /api/v1/uploads/{u}/chunks/{d} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999\r\n\r\nabc").as_bytes(),
    );
    assert!(resp.starts_with("HTTP/1.1 413 "), "{resp}");
    let resp = raw(
        &a,
        b"GET /store/store.json HTTP/1.1\r\nContent-Length: 99999999999999999\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    // Garbage, oversized heads, unsupported versions and codings, smuggling attempts.
    assert!(raw(&a, b"hello\r\n\r\n").starts_with("HTTP/1.1 400 "));
    // hyper answers an unknown version with 400 (RFC 9110 allows it; the old server said 505).
    assert!(raw(&a, b"GET /store/store.json HTTP/2.0\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70_000));
    assert!(raw(&a, big.as_bytes()).starts_with("HTTP/1.1 4"));
    let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(200));
    assert!(raw(&a, many.as_bytes()).starts_with("HTTP/1.1 431 "));
    let resp = raw(
        &a,
        b"POST /api/v1/uploads HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    let resp = raw(
        &a,
        b"POST /api/v1/uploads HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    );
    // Refused as malformed (hyper: 400; the old server said 501), never guessed at.
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    let resp = raw(
        &a,
        b"POST /api/v1/uploads HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"host\": ",
    );
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");

    // A chunked upload, and keep-alive: two requests on one connection.
    let mut req = format!(
        "PUT /api/v1/uploads/{u}/chunks/{d} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for part in blob.chunks(100_000) {
        req.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nTrailer: x\r\n\r\n");
    req.extend_from_slice(b"GET /store/store.json HTTP/1.1\r\nHost: x\r\n\r\n");
    let resp = raw(&a, &req);
    assert!(resp.starts_with("HTTP/1.1 201 "), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 2, "{resp}");
    assert!(resp.contains("bmr-store"), "{resp}");
    assert!(store.join(d.chunk_path()).exists());

    // Expect: 100-continue is honoured.
    let mut s = TcpStream::connect(&a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/v1/uploads/{u}/missing HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 15\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"{\"digests\": []}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200 "), "{line}");

    // Still serving after all that.
    assert_eq!(get(&srv.url("/store/store.json"), None).status, 200);
    assert_eq!(
        get(&srv.url("/api/v1/uploads/nope/missing"), None).status,
        405
    );
}

#[test]
fn boot_files_are_served_without_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    write_tokens(&store, tokens_json());
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(boot.join("pxe")).unwrap();
    std::fs::write(boot.join("pxe/boot.ipxe"), b"#!ipxe\nchain vmlinuz\n").unwrap();
    std::fs::write(boot.join("pxe/vmlinuz"), vec![0x4du8; 100_000]).unwrap();
    let srv = Server::start(&store, &["--boot", boot.to_str().unwrap()]);
    let r = get(&srv.url("/boot/pxe/boot.ipxe"), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "#!ipxe\nchain vmlinuz\n");
    assert_eq!(r.h("cache-control"), Some("no-cache"));
    assert!(r.h("content-type").unwrap().starts_with("text/plain"));
    let r = send(
        "GET",
        &srv.url("/boot/pxe/vmlinuz"),
        None,
        &[("Range", "bytes=99990-")],
        None,
    );
    assert_eq!((r.status, r.body.len()), (206, 10));
    let resp = raw(
        &srv.addr(),
        b"GET /boot/../store/private/signing.key HTTP/1.1\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    // The store itself still needs a token.
    assert_eq!(get(&srv.url("/store/store.json"), None).status, 401);
}

#[test]
fn boot_images_report_progress_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    write_tokens(&store, tokens_json());
    // Reports are kept only for hosts the store knows (issue 8 item 8).
    std::fs::create_dir_all(store.join("hosts/web1")).unwrap();
    let srv = Server::start(&store, &[]);
    let url = srv.url("/api/v1/progress/web1");
    let r = post_json(&url, None, serde_json::json!({"state": "running"}));
    assert_eq!(r.status, 401, "{}", r.text());
    let r = post_json(
        &srv.url("/api/v1/progress/web2"),
        Some(READ_WEB1),
        serde_json::json!({"state": "running"}),
    );
    assert_eq!(
        r.status, 403,
        "a token scoped to web1 may not report for web2"
    );
    let r = post_json(&url, Some(READ_WEB1), serde_json::json!("not an object"));
    assert_eq!(r.status, 400);
    for state in ["starting", "running", "done"] {
        let r = post_json(
            &url,
            Some(READ_WEB1),
            serde_json::json!({"state": state, "message": format!("{state} line"), "seconds": 3}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let all = get(&srv.url("/api/v1/progress"), Some(ADMIN)).json();
    let list = all.as_array().unwrap();
    assert_eq!(list.len(), 1, "the last report per host: {all}");
    assert_eq!(list[0]["host"], "web1");
    assert_eq!(list[0]["state"], "done");
    assert_eq!(list[0]["message"], "done line");
    let t0 = std::time::Instant::now();
    while !srv
        .log
        .lock()
        .unwrap()
        .contains("progress web1: done done line")
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "progress not logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Issue 8 item 12: a symlinked directory (or file) inside the served tree is never followed,
/// whether it points out of the tree (`private/`) or to another host's files.
#[test]
fn symlinks_inside_the_store_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    write_tokens(&store, tokens_json());
    let srv = Server::start(&store, &[]);
    let img = disk_image(11, 1, 1 << 20, &[]);
    upload_snapshot(&srv, Some(ADMIN), "web1", std::slice::from_ref(&img));
    let id2 = upload_snapshot(&srv, Some(ADMIN), "web2", &[img]);
    let link = |target: &str, at: &str| {
        std::os::unix::fs::symlink(target, store.join(at)).unwrap();
    };
    link("../../private", "hosts/web1/x");
    link("../../web2/snapshots", "hosts/web1/y");
    link("../../private/signing.key", "hosts/web1/key");
    link("../private", "chunks/priv");
    std::fs::create_dir_all(dir.path().join("outside")).unwrap();
    std::fs::write(dir.path().join("outside/secret"), "secret").unwrap();
    link(
        dir.path().join("outside").to_str().unwrap(),
        "hosts/web1/abs",
    );
    for path in [
        "hosts/web1/x/signing.key".to_string(),
        "hosts/web1/x/tokens.json".to_string(),
        "hosts/web1/key".to_string(),
        format!("hosts/web1/y/{id2}/manifest.json"),
        "hosts/web1/abs/secret".to_string(),
        "chunks/priv/signing.key".to_string(),
    ] {
        for token in [READ_WEB1, ADMIN] {
            let r = get(&srv.url(&format!("/store/{path}")), Some(token));
            assert!(
                r.status == 404 || r.status == 403,
                "{path} with {token}: {} {}",
                r.status,
                r.text()
            );
            assert!(!r.text().contains("secret") || r.status != 200);
        }
    }
    // The real files are still served.
    let r = get(&srv.url("/store/hosts/web1/latest"), Some(READ_WEB1));
    assert_eq!(r.status, 200, "{}", r.text());
}
