//! The JSON API under `/api/v1/` (contract in `docs/api.md`): read access to hosts and
//! snapshots, and upload sessions that end in a signed snapshot.

use super::auth::Who;
use super::files::percent_decode;
use super::http::{json_bytes, BodyError, Request, Response};
use super::uploads::{load_index, IndexError, OpenError, Session};
use super::{progress, App};
use serde::Deserialize;
use serde_json::json;
use snapshot::api;
use snapshot::chunker::Held;
use snapshot::format::index::{ChunkIndex, Slot};
use snapshot::format::Digest;
use snapshot::store::check_name;
use snapshot::Manifest;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

/// Largest chunk blob accepted: a 4 MiB chunk that zstd could not shrink, plus room.
pub const CHUNK_BODY_LIMIT: u64 = (4 << 20) + (64 << 10);
/// Largest index accepted: a 32 TiB disk (8 Mi slots of 32 bytes) plus the header.
pub const INDEX_BODY_LIMIT: u64 = (256 << 20) + 64;
/// All indexes of one session together.
pub const SESSION_INDEX_LIMIT: u64 = 1 << 30;
/// Disks per snapshot.
pub const MAX_DISKS: u32 = 256;
/// Digests per `missing` request.
pub const MAX_DIGESTS: usize = 100_000;
const MISSING_BODY_LIMIT: u64 = 8 << 20;
const MANIFEST_BODY_LIMIT: u64 = 16 << 20;
const SMALL_BODY_LIMIT: u64 = 64 << 10;

type Answer = Result<Response, Response>;

fn err(status: u16, msg: impl AsRef<str>) -> Response {
    Response::error(status, msg.as_ref())
}

fn ok_json<T: serde::Serialize + ?Sized>(status: u16, v: &T) -> Answer {
    let v = serde_json::to_value(v).unwrap_or_default();
    Ok(Response::new(status)
        .bytes("application/json", json_bytes(&v))
        .header("Cache-Control", "no-store"))
}

fn internal(what: &str, e: anyhow::Error) -> Response {
    eprintln!("appliance serve: error: {what}: {e:#}");
    err(500, format!("{what}: {e:#}"))
}

/// Route `rest` (the path after `/api/v1/`).
pub fn handle(app: &App, req: &mut Request, rest: &str, who: &Who) -> Response {
    let segs: Option<Vec<String>> = rest
        .split('/')
        .map(|s| percent_decode(s).and_then(|b| String::from_utf8(b).ok()))
        .collect();
    let Some(segs) = segs else {
        return err(400, "malformed percent-encoding in the path");
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let method = req.method.clone();
    if s.first() == Some(&"failover") {
        return failover(app, req, rest, who);
    }
    let read = method == "GET" || method == "HEAD";
    let r = match (s.as_slice(), method.as_str()) {
        (["hosts"], _) if read => list_hosts(app, who),
        (["hosts", host, "snapshots"], _) if read => list_snapshots(app, who, host),
        (["hosts", host, "snapshots", id], _) if read => manifest(app, who, host, id),
        (["hosts", host, "snapshots", id, "files"], _) if read => {
            super::browse::list(app, who, host, id, &req.query)
        }
        (["hosts", host, "snapshots", id, "file"], _) if read => {
            super::browse::file(app, who, host, id, &req.query)
        }
        (["hosts", host, "snapshots", id, "export"], _) if read => {
            super::browse::export(app, who, host, id, &req.query)
        }
        (["pubkey"], _) if read => pubkey(app),
        (["progress"], _) if read => list_progress(app, who),
        (["progress", host], "POST") => report_progress(app, req, who, host),
        (["uploads"], "POST") => open_upload(app, req, who),
        (["uploads", u, "missing"], "POST") => missing(app, req, who, u),
        (["uploads", u, "chunks", hex], "PUT") => put_chunk(app, req, who, u, hex),
        (["uploads", u, "indexes", n], "PUT") => put_index(app, req, who, u, n),
        (["uploads", u, "commit"], "POST") => commit(app, req, who, u),
        (["uploads", u], "DELETE") => abort(app, who, u),
        (path, _) => Err(match allowed(path) {
            Some(allow) => err(
                405,
                format!("{method} is not allowed here (allowed: {allow})"),
            )
            .header("Allow", allow),
            None => err(404, "no such API endpoint"),
        }),
    };
    r.unwrap_or_else(|e| e)
}

/// Failover VMs and failback rounds: `appliance/src/failover/api.rs` answers. Reading a VM
/// needs read access to its host; making rounds and stopping it, upload access to its host.
fn failover(app: &App, req: &mut Request, rest: &str, who: &Who) -> Response {
    let body = match body(req, SMALL_BODY_LIMIT) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let method = if req.method == "HEAD" {
        "GET"
    } else {
        req.method.as_str()
    };
    let may = |host: &str, change: bool| {
        if change {
            who.may_upload(host)
        } else {
            who.may_read(host)
        }
    };
    let path = format!("/api/v1/{rest}");
    match crate::failover::api::handle(&app.store, method, &path, &body, &may) {
        Some((status, json)) => Response::new(status)
            .bytes("application/json", json)
            .header("Cache-Control", "no-store"),
        None => err(404, "no such API endpoint"),
    }
}

/// The methods of a known endpoint, for 405.
fn allowed(s: &[&str]) -> Option<&'static str> {
    Some(match s {
        ["hosts"]
        | ["hosts", _, "snapshots"]
        | ["hosts", _, "snapshots", _]
        | ["hosts", _, "snapshots", _, "files" | "file" | "export"]
        | ["pubkey"] => "GET, HEAD",
        ["progress"] => "GET, HEAD",
        ["uploads"] | ["uploads", _, "missing"] | ["uploads", _, "commit"] | ["progress", _] => {
            "POST"
        }
        ["uploads", _, "chunks", _] | ["uploads", _, "indexes", _] => "PUT",
        ["uploads", _] => "DELETE",
        _ => return None,
    })
}

fn name(n: &str, what: &str) -> Result<(), Response> {
    check_name(n, what).map_err(|e| err(400, e.to_string()))
}

fn list_hosts(app: &App, who: &Who) -> Answer {
    let hosts = app
        .store
        .hosts()
        .map_err(|e| internal("listing hosts", e))?;
    let mut out = Vec::new();
    for h in hosts {
        if check_name(&h, "host").is_err()
            || !who.may_read(&h)
            || !app.store.root().join("hosts").join(&h).is_dir()
        {
            continue;
        }
        let snapshots = match app.store.snapshots(&h) {
            Ok(v) => v,
            Err(e) => {
                // One unreadable host must not hide the others.
                eprintln!("appliance serve: error: listing snapshots of {h}: {e:#}");
                continue;
            }
        };
        out.push(json!({
            "host": h,
            "latest": latest(app, &h),
            "snapshots": snapshots.len(),
        }));
    }
    ok_json(200, &serde_json::Value::Array(out))
}

/// The id `hosts/<host>/latest` names, if it is there and sane.
fn latest(app: &App, host: &str) -> Option<String> {
    let p = app.store.root().join("hosts").join(host).join("latest");
    let id = std::fs::read_to_string(p).ok()?.trim().to_string();
    check_name(&id, "snapshot").ok().map(|_| id)
}

pub(super) fn host_access(app: &App, who: &Who, host: &str) -> Result<(), Response> {
    name(host, "host")?;
    if !who.may_read(host) {
        return Err(err(403, format!("this token may not read host {host}")));
    }
    if !app.store.root().join("hosts").join(host).is_dir() {
        return Err(err(404, format!("no host {host} in this store")));
    }
    Ok(())
}

fn list_snapshots(app: &App, who: &Who, host: &str) -> Answer {
    host_access(app, who, host)?;
    let latest = latest(app, host);
    let ids = app
        .store
        .snapshots(host)
        .map_err(|e| internal(&format!("listing snapshots of {host}"), e))?;
    let mut out = Vec::new();
    for id in ids {
        let rel = format!("hosts/{host}/snapshots/{id}/manifest.json");
        let m = std::fs::read(app.store.root().join(&rel))
            .map_err(anyhow::Error::from)
            .and_then(|b| Manifest::parse(&b, &rel));
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                // One damaged snapshot must not hide the others.
                eprintln!("appliance serve: error: {rel}: {e:#} (left out of the listing)");
                continue;
            }
        };
        out.push(json!({
            "snapshot": id,
            "created": m.created,
            "sequence": m.sequence,
            "latest": latest.as_deref() == Some(id.as_str()),
            "disks": m.disks.iter().map(|d| json!({
                "size": d.size,
                "used_bytes": d.totals.used_bytes,
                "stored_bytes": d.totals.stored_bytes,
            })).collect::<Vec<_>>(),
        }));
    }
    ok_json(200, &serde_json::Value::Array(out))
}

fn manifest(app: &App, who: &Who, host: &str, id: &str) -> Answer {
    host_access(app, who, host)?;
    let id = if id == "latest" {
        latest(app, host).ok_or_else(|| err(404, format!("host {host} has no snapshot")))?
    } else {
        name(id, "snapshot")?;
        id.to_string()
    };
    let p = app
        .store
        .root()
        .join(format!("hosts/{host}/snapshots/{id}/manifest.json"));
    match std::fs::read(&p) {
        Ok(b) => Ok(Response::new(200)
            .bytes("application/json", b)
            .header("Cache-Control", "no-cache")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(err(404, format!("no snapshot {id} of host {host}")))
        }
        Err(e) => Err(internal(&format!("reading {}", p.display()), e.into())),
    }
}

fn pubkey(app: &App) -> Answer {
    let k = app
        .store
        .public_key()
        .map_err(|e| internal("reading the public key", e))?;
    ok_json(200, &json!({ "pubkey": k.to_hex() }))
}

fn body(req: &mut Request, limit: u64) -> Result<Vec<u8>, Response> {
    req.read_body(limit).map_err(|e| match e {
        BodyError::TooLarge(l) => err(413, format!("request body larger than {l} bytes")),
        BodyError::Io(e) => err(400, format!("reading the request body: {e}")),
    })
}

fn json_body<T: for<'de> Deserialize<'de>>(req: &mut Request, limit: u64) -> Result<T, Response> {
    let b = body(req, limit)?;
    serde_json::from_slice(&b).map_err(|e| err(400, format!("malformed JSON body: {e}")))
}

/// A boot image reports how its job goes (`restorer init`): kept in memory, one per host, and
/// logged. Any token that may read the host may report for it (bounds in `serve/progress.rs`).
fn report_progress(app: &App, req: &mut Request, who: &Who, host: &str) -> Answer {
    name(host, "host")?;
    if !who.may_read(host) {
        return Err(err(
            403,
            format!("this token may not report for host {host}"),
        ));
    }
    // A host the store does not know is accepted too: a boot image started with a wrong host
    // name must be able to say so. The bounds (records of at most RECORD_LIMIT, MAX_HOSTS
    // records) hold whatever the host.
    let mut v: serde_json::Value = json_body(req, progress::RECORD_LIMIT)?;
    if !v.is_object() {
        return Err(err(400, "progress must be a JSON object"));
    }
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    eprintln!(
        "appliance serve: progress {host}: {} {}",
        text("state"),
        text("message")
    );
    v["host"] = host.into();
    v["received"] = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .into();
    app.progress.put(host, v);
    ok_json(200, &serde_json::json!({ "ok": true }))
}

fn list_progress(app: &App, who: &Who) -> Answer {
    let body = app.progress.list(&|h| who.may_read(h));
    Ok(Response::new(200)
        .bytes("application/json", body)
        .header("Cache-Control", "no-store"))
}

fn open_upload(app: &App, req: &mut Request, who: &Who) -> Answer {
    let o: api::OpenUpload = json_body(req, SMALL_BODY_LIMIT)?;
    name(&o.host, "host")?;
    if !who.may_upload(&o.host) {
        return Err(err(
            403,
            format!("this token may not upload for host {}", o.host),
        ));
    }
    match app.uploads.open(&app.store, &o.host, &who.label()) {
        Ok(s) => {
            eprintln!(
                "appliance serve: upload {} of {}/{} opened by {}",
                s.id,
                s.host,
                s.snapshot,
                who.label()
            );
            ok_json(
                201,
                &api::UploadOpened {
                    upload: s.id.clone(),
                    snapshot: s.snapshot.clone(),
                },
            )
        }
        Err(OpenError::GcRunning) => Err(err(
            503,
            "garbage collection is running on this store; retry in a minute",
        )
        .header("Retry-After", "60")),
        Err(OpenError::TooManyForToken) => Err(err(
            429,
            format!(
                "{} already has {} upload sessions open; commit or DELETE one (idle ones end after --upload-idle-timeout)",
                who.label(),
                super::uploads::MAX_SESSIONS_PER_TOKEN
            ),
        )
        .header("Retry-After", "60")),
        Err(OpenError::TooMany) => Err(err(
            503,
            format!(
                "{} upload sessions are open; retry when one has ended",
                super::uploads::MAX_SESSIONS
            ),
        )
        .header("Retry-After", "60")),
        Err(OpenError::Other(e)) => Err(internal("opening an upload session", e)),
    }
}

/// The session `u`, if it is open and this token may use it.
fn session(app: &App, who: &Who, u: &str) -> Result<Arc<Session>, Response> {
    let s = app.uploads.get(u).ok_or_else(|| {
        err(
            404,
            format!("no upload session {u} (never opened, committed, aborted or expired)"),
        )
    })?;
    if !who.may_upload(&s.host) {
        return Err(err(
            403,
            format!("this token may not upload for host {}", s.host),
        ));
    }
    Ok(s)
}

fn missing(app: &App, req: &mut Request, who: &Who, u: &str) -> Answer {
    let _s = session(app, who, u)?;
    let ask: api::MissingAsk = json_body(req, MISSING_BODY_LIMIT)?;
    if ask.digests.len() > MAX_DIGESTS {
        return Err(err(
            400,
            format!(
                "{} digests asked; at most {MAX_DIGESTS} per request",
                ask.digests.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for h in &ask.digests {
        let d = parse_digest(h)?;
        // A chunk file that is truncated or has a damaged header is missing: the client uploads
        // it again and the upload replaces it (`put_chunk`).
        if seen.insert(d) && !matches!(app.store.chunk_held(&d), Held::Intact(_)) {
            out.push(h.clone());
        }
    }
    ok_json(200, &api::Missing { missing: out })
}

fn parse_digest(h: &str) -> Result<Digest, Response> {
    (h.len() == 64)
        .then(|| Digest::parse(h))
        .flatten()
        .ok_or_else(|| {
            err(
                400,
                format!("invalid digest {h:?} (64 hex digits expected)"),
            )
        })
}

fn put_chunk(app: &App, req: &mut Request, who: &Who, u: &str, hex: &str) -> Answer {
    let _s = session(app, who, u)?;
    let d = parse_digest(hex)?;
    let blob = body(req, CHUNK_BODY_LIMIT)?;
    snapshot::decode_chunk(&blob, &d).map_err(|e| err(400, e.to_string()))?;
    // A file already there is checked in full (the client sends a chunk only when `missing`
    // said so, so this is rare): a damaged one is replaced by the verified upload.
    let damaged = std::fs::read(app.store.chunk_file(&d))
        .ok()
        .is_some_and(|old| snapshot::decode_chunk(&old, &d).is_err());
    let new = if damaged {
        eprintln!("appliance serve: chunk {d} was damaged in the store; replaced by the upload");
        app.store
            .replace_chunk(&d, &blob)
            .map_err(|e| internal(&format!("replacing chunk {d}"), e))?;
        true
    } else {
        app.store
            .insert_chunk(&d, &blob)
            .map_err(|e| internal(&format!("storing chunk {d}"), e))?
    };
    ok_json(
        if new { 201 } else { 200 },
        &api::ChunkStored {
            chunk: d.hex(),
            stored: new,
        },
    )
}

fn put_index(app: &App, req: &mut Request, who: &Who, u: &str, n: &str) -> Answer {
    let s = session(app, who, u)?;
    let disk: u32 = n
        .parse()
        .ok()
        .filter(|d| *d < MAX_DISKS && n.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            err(
                400,
                format!("invalid disk number {n:?} (0 to {})", MAX_DISKS - 1),
            )
        })?;
    if let Some(n) = req.declared_length() {
        if n > INDEX_BODY_LIMIT {
            return Err(err(
                413,
                format!("request body larger than {INDEX_BODY_LIMIT} bytes"),
            ));
        }
    }
    let sha = s
        .store_index(disk, req, INDEX_BODY_LIMIT, SESSION_INDEX_LIMIT)
        .map_err(|e| match e {
            IndexError::TooLarge(l, what) => err(413, format!("{what} may not exceed {l} bytes")),
            IndexError::Read(e) => err(400, format!("reading the request body: {e}")),
            IndexError::Invalid(m) => err(400, m),
            IndexError::Store(e) => internal(&format!("storing the index of disk {disk}"), e),
        })?;
    ok_json(201, &api::IndexStored { disk, sha256: sha })
}

/// Clears the session's `committing` flag however the commit ends.
struct Committing<'a>(&'a Session);

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0.committing.store(false, Ordering::SeqCst);
    }
}

fn commit(app: &App, req: &mut Request, who: &Who, u: &str) -> Answer {
    let s = session(app, who, u)?;
    if s.committing.swap(true, Ordering::SeqCst) {
        return Err(err(409, "a commit of this upload is already in progress"));
    }
    let _guard = Committing(&s);
    let bytes = body(req, MANIFEST_BODY_LIMIT)?;
    let mut m = Manifest::parse(&bytes, "manifest").map_err(|e| err(400, format!("{e:#}")))?;
    m.host = s.host.clone();
    m.snapshot = s.snapshot.clone();
    m.created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    if m.disks.is_empty() {
        return Err(err(400, "the manifest lists no disks"));
    }
    {
        let uploaded = s.lock_indexes();
        for d in &m.disks {
            let n = d.number;
            let Some(i) = uploaded.get(&n) else {
                return Err(err(400, format!("no index was uploaded for disk {n}")));
            };
            if !i.sha256.eq_ignore_ascii_case(&d.index_sha256) {
                return Err(err(
                    400,
                    format!(
                        "disk {n}: the uploaded index hashes to {}, the manifest says {}",
                        i.sha256, d.index_sha256
                    ),
                ));
            }
            if i.disk_size != d.size {
                return Err(err(
                    400,
                    format!(
                        "disk {n}: the index covers {} bytes, the manifest says {}",
                        i.disk_size, d.size
                    ),
                ));
            }
        }
    }
    // One commit at a time has its indexes in memory (module doc of uploads.rs).
    let _gate = app
        .uploads
        .commit_gate
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut indexes: Vec<ChunkIndex> = Vec::new();
    for d in &m.disks {
        let uploaded = s.lock_indexes();
        let i = uploaded
            .get(&d.number)
            .ok_or_else(|| err(409, "the indexes of this upload changed during the commit"))?;
        if !i.sha256.eq_ignore_ascii_case(&d.index_sha256) {
            return Err(err(
                409,
                "the indexes of this upload changed during the commit",
            ));
        }
        let idx = load_index(i, &format!("disk{}.idx", d.number))
            .map_err(|e| internal("reading an uploaded index", e))?;
        indexes.push(idx);
    }
    let mut seen = HashSet::new();
    let mut absent = Vec::new();
    let mut absent_count = 0u64;
    for idx in &indexes {
        for (_, slot) in idx.slots() {
            if let Slot::Data(d) = slot {
                if seen.insert(d) && !matches!(app.store.chunk_held(&d), Held::Intact(_)) {
                    absent_count += 1;
                    if absent.len() < 10 {
                        absent.push(d.hex());
                    }
                }
            }
        }
    }
    if absent_count > 0 {
        let body = api::ApiError {
            error: format!(
                "{absent_count} chunks the indexes reference are not in the store (upload them, then commit again)"
            ),
            missing: Some(absent),
            missing_count: Some(absent_count),
        };
        let body = serde_json::to_value(&body).unwrap_or_default();
        return Err(Response::new(409).bytes("application/json", json_bytes(&body)));
    }
    app.store
        .commit_reserved(&s.reservation, &m, &indexes)
        .map_err(|e| internal(&format!("committing {}/{}", m.host, m.snapshot), e))?;
    app.uploads.remove(&s.id, "committed");
    ok_json(
        201,
        &api::Committed {
            host: m.host,
            snapshot: m.snapshot,
        },
    )
}

fn abort(app: &App, who: &Who, u: &str) -> Answer {
    let s = session(app, who, u)?;
    app.uploads.remove(&s.id, "aborted by the client");
    Ok(Response::new(204))
}
