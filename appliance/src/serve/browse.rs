//! File-level restore over the API (`docs/api.md`, *Files*): list a directory, take out one file,
//! or a tree as tar, from any snapshot the token may read, through the chunks (see
//! `snapshot::browse`). Files and archives are streamed as they are read.

use super::auth::Who;
use super::files::percent_decode;
use super::http::{json_bytes, Body, Response};
use super::App;
use crate::files::{browse, export_tar, Pick};
use snapshot::browse::Browser;
use snapshot::store::{open_snapshot, LocalStore, Snapshot};
use std::io::Write;

type Answer = Result<Response, Response>;

fn err(status: u16, msg: impl AsRef<str>) -> Response {
    Response::error(status, msg.as_ref())
}

/// The query's `disk`, `partition` and `path` (default `/`).
struct Query {
    pick: Pick,
    path: String,
}

fn query(q: &str) -> Result<Query, Response> {
    let mut out = Query {
        pick: Pick {
            disk: 0,
            partition: None,
            lv: None,
        },
        path: "/".into(),
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(&v.replace('+', " "))
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| err(400, format!("query parameter {k}: malformed encoding")))?;
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| err(400, format!("query parameter {k}={v}: not a number")))
        };
        match k {
            "disk" => out.pick.disk = number(&v)?,
            "partition" => out.pick.partition = Some(number(&v)?),
            "lv" => out.pick.lv = Some(v),
            "path" => out.path = v,
            other => return Err(err(400, format!("unknown query parameter {other:?}"))),
        }
    }
    snapshot::browse::components(&out.path).map_err(|e| err(400, format!("{e:#}")))?;
    Ok(out)
}

/// The snapshot, checked against the store's key.
fn open(app: &App, host: &str, id: &str) -> Result<Snapshot, Response> {
    let key = app
        .store
        .public_key()
        .map_err(|e| err(500, format!("the store's public key: {e:#}")))?;
    let id = (id != "latest").then_some(id);
    open_snapshot(&app.store, host, id, Some(&key)).map_err(|e| err(404, format!("{e:#}")))
}

/// Run `f` with the browser of the filesystem `q` names.
fn with_browser<R>(
    store: &LocalStore,
    snap: &Snapshot,
    q: &Query,
    f: impl FnOnce(&Browser) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    browse(store, snap, &q.pick, f)
}

/// 404 for a path that is not there, 400 for the rest of what the request got wrong.
fn status_of(e: &anyhow::Error) -> u16 {
    let m = format!("{e:#}");
    if m.contains("no such file") {
        404
    } else {
        400
    }
}

pub fn list(app: &App, who: &Who, host: &str, id: &str, q: &str) -> Answer {
    super::api::host_access(app, who, host)?;
    let q = query(q)?;
    let snap = open(app, host, id)?;
    let entries = with_browser(&app.store, &snap, &q, |b| b.list(&q.path))
        .map_err(|e| err(status_of(&e), format!("{e:#}")))?;
    let v = serde_json::to_value(&entries).map_err(|e| err(500, e.to_string()))?;
    Ok(Response::new(200)
        .bytes("application/json", json_bytes(&v))
        .header("Cache-Control", "no-store"))
}

pub fn file(app: &App, who: &Who, host: &str, id: &str, q: &str) -> Answer {
    super::api::host_access(app, who, host)?;
    let q = query(q)?;
    let snap = open(app, host, id)?;
    let e = with_browser(&app.store, &snap, &q, |b| b.stat(&q.path))
        .map_err(|e| err(status_of(&e), format!("{e:#}")))?;
    if e.kind != snapshot::browse::Kind::File {
        return Err(err(400, format!("{}: not a regular file", e.path)));
    }
    let root = app.store.root().to_path_buf();
    let name = e.name.replace(['"', '\\'], "_");
    let write = Box::new(move |w: &mut dyn Write| -> std::io::Result<u64> {
        let store = LocalStore::open(&root).map_err(std::io::Error::other)?;
        let mut sent = 0;
        with_browser(&store, &snap, &q, |b| {
            b.open_file(&q.path, &mut |_, r| {
                sent = std::io::copy(r, w)?;
                Ok(())
            })
        })
        .map_err(std::io::Error::other)?;
        Ok(sent)
    });
    let mut r = Response::new(200)
        .header("Content-Type", "application/octet-stream")
        .header(
            "Content-Disposition",
            format!("attachment; filename=\"{name}\""),
        )
        .header("Cache-Control", "no-store");
    r.body = Body::stream(Some(e.size), write);
    Ok(r)
}

pub fn export(app: &App, who: &Who, host: &str, id: &str, q: &str) -> Answer {
    super::api::host_access(app, who, host)?;
    let q = query(q)?;
    let snap = open(app, host, id)?;
    let e = with_browser(&app.store, &snap, &q, |b| b.stat(&q.path))
        .map_err(|e| err(status_of(&e), format!("{e:#}")))?;
    let root = app.store.root().to_path_buf();
    let name = if e.name.is_empty() {
        "root".to_string()
    } else {
        e.name.replace(['"', '\\'], "_")
    };
    let write = Box::new(move |w: &mut dyn Write| -> std::io::Result<u64> {
        let store = LocalStore::open(&root).map_err(std::io::Error::other)?;
        let mut counted = Counted { w, n: 0 };
        with_browser(&store, &snap, &q, |b| export_tar(b, &q.path, &mut counted))
            .map_err(std::io::Error::other)?;
        Ok(counted.n)
    });
    let mut r = Response::new(200)
        .header("Content-Type", "application/x-tar")
        .header(
            "Content-Disposition",
            format!("attachment; filename=\"{name}.tar\""),
        )
        .header("Cache-Control", "no-store");
    r.body = Body::stream(None, write);
    Ok(r)
}

/// A writer that counts what passes.
struct Counted<'w> {
    w: &'w mut dyn Write,
    n: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}
