//! `appliance serve`: the store's files under `/store/` (so `restorer --from
//! http://HOST:PORT/store` and any [`snapshot::store::HttpStore`] read it), boot files under
//! `/boot/`, and the JSON API under `/api/v1/` (listings and upload sessions). The HTTP contract
//! is in `docs/api.md`.
//!
//! The protocol, the connection and request limits, TLS and shutdown are in [`net`]; handlers
//! here are synchronous and see [`http::Request`] and [`http::Response`]. On SIGTERM/SIGINT the
//! server stops accepting, lets every request in progress finish, aborts the open upload
//! sessions and returns.

mod api;
mod auth;
mod browse;
mod files;
mod http;
mod net;
mod progress;
mod sys;
mod uploads;

use crate::cli::ServeArgs;
use anyhow::{bail, Context, Result};
use auth::{Auth, Who};
use files::Tree;
use http::{Request, Response};
use snapshot::store::LocalStore;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything a request handler needs.
pub struct App {
    store: LocalStore,
    boot: Option<PathBuf>,
    auth: Auth,
    uploads: uploads::Uploads,
    /// The last progress report of each host's boot image (`/api/v1/progress`), kept in memory.
    progress: progress::Reports,
}

impl App {
    fn handle(&self, req: &mut Request) -> Response {
        let path = req.path.clone();
        // Boot files are public: PXE firmware cannot present a token (docs/api.md).
        if let Some(rest) = path.strip_prefix("/boot/") {
            return self.boot_file(req, rest);
        }
        let who = match self.auth.authenticate(req.header("Authorization")) {
            Ok(w) => w,
            Err(r) => {
                let mut resp = Response::error(r.status, &r.msg);
                if r.status == 401 {
                    resp = resp.header("WWW-Authenticate", "Bearer realm=\"appliance\"");
                }
                return resp;
            }
        };
        let mut resp = if let Some(rest) = path.strip_prefix("/store/") {
            self.store_file(req, rest, &who)
        } else if let Some(rest) = path.strip_prefix("/api/v1/") {
            api::handle(self, req, rest, &who)
        } else {
            Response::error(
                404,
                "not found (store files are under /store/, the API under /api/v1/)",
            )
        };
        resp.who = who.label();
        resp
    }

    fn store_file(&self, req: &Request, rest: &str, who: &Who) -> Response {
        if let Some(r) = only_get_head(req) {
            return r;
        }
        let Some(comps) = files::components(rest) else {
            return Response::error(404, "not found");
        };
        // Signing key, tokens and locks; writers' temporary files: never served.
        if comps[0] == "private" || comps[0] == "tmp" {
            return Response::error(404, "not found");
        }
        if comps[0] == "hosts" && comps.len() >= 2 && !who.may_read(&comps[1]) {
            return Response::error(403, &format!("this token may not read host {}", comps[1]));
        }
        // Failback rounds belong to the host their VM was started from.
        if comps[0] == "failover" && comps.len() >= 2 && !who.may_read_all() {
            let vm = &comps[1];
            match crate::failover::host_of(&self.store, vm) {
                Ok(host) if who.may_read(&host) => {}
                Ok(host) => {
                    return Response::error(
                        403,
                        &format!("this token may not read VM {vm} (host {host})"),
                    )
                }
                Err(_) => return Response::error(403, &format!("this token may not read VM {vm}")),
            }
        }
        files::serve(req, self.store.root(), &comps, Tree::Store)
    }

    fn boot_file(&self, req: &Request, rest: &str) -> Response {
        if let Some(r) = only_get_head(req) {
            return r;
        }
        let Some(dir) = &self.boot else {
            return Response::error(404, "no boot files are served (start with --boot DIR)");
        };
        match files::components(rest) {
            Some(comps) => files::serve(req, dir, &comps, Tree::Boot),
            None => Response::error(404, "not found"),
        }
    }
}

fn only_get_head(req: &Request) -> Option<Response> {
    (req.method != "GET" && req.method != "HEAD").then(|| {
        Response::error(405, &format!("{} is not allowed here", req.method))
            .header("Allow", "GET, HEAD")
    })
}

pub fn run(a: &ServeArgs) -> Result<()> {
    if a.max_connections == 0 || a.max_connections > 65536 {
        bail!("--max-connections must be between 1 and 65536");
    }
    if a.max_requests == 0 || a.max_requests > 4096 {
        bail!("--max-requests must be between 1 and 4096");
    }
    let store = LocalStore::open(&a.store)?;
    store
        .public_key()
        .context("the store has no readable public key (was it made by `appliance init`?)")?;
    if let Some(b) = &a.boot {
        if !b.is_dir() {
            bail!("--boot {}: not a directory", b.display());
        }
    }
    let certs = match (&a.tls_cert, &a.tls_key, a.tls) {
        (Some(c), Some(k), _) => Some(crate::tls::Certs::load(c, k)?),
        (_, _, true) => {
            let d = crate::tls::dir(store.root());
            let (c, k) = (d.join("server.pem"), d.join("server.key"));
            if !c.exists() {
                bail!(
                    "--tls: the store has no certificate ({} is missing); make one with `appliance tls --store {}`",
                    c.display(),
                    a.store.display()
                );
            }
            Some(crate::tls::Certs::load(&c, &k)?)
        }
        _ => None,
    };
    sys::raise_open_files_limit(a.max_connections as u64 * 2 + 256);
    let tokens = store.root().join("private").join("tokens.json");
    let auth = Auth::load(&tokens)?;
    let bind = |at: &str| -> Result<(TcpListener, std::net::SocketAddr)> {
        let l = TcpListener::bind(at).with_context(|| format!("listening on {at}"))?;
        let addr = l.local_addr().context("reading the listening address")?;
        Ok((l, addr))
    };
    if a.tls_listen.is_some() && certs.is_none() {
        bail!("--tls-listen needs --tls or --tls-cert/--tls-key");
    }
    let (listener, addr) = bind(&a.listen)?;
    let mut ports = Vec::new();
    let mut urls = Vec::new();
    match &a.tls_listen {
        Some(t) => {
            let (tl, taddr) = bind(t)?;
            let https = format!("https://{taddr}");
            urls.push(format!("{https} (store, API and boot files)"));
            urls.push(format!("http://{addr} (boot files only, for PXE firmware)"));
            ports.push(net::Port {
                listener: tl,
                tls: true,
                boot_only: None,
            });
            ports.push(net::Port {
                listener,
                tls: false,
                boot_only: Some(https),
            });
        }
        None => {
            let scheme = if certs.is_some() { "https" } else { "http" };
            urls.push(format!("{scheme}://{addr}"));
            ports.push(net::Port {
                listener,
                tls: certs.is_some(),
                boot_only: None,
            });
        }
    }
    let app = Arc::new(App {
        store,
        boot: a.boot.clone(),
        auth,
        uploads: uploads::Uploads::new(a.upload_idle_timeout),
        progress: Default::default(),
    });

    println!("appliance serve: listening on {}", urls.join(", "));
    println!(
        "  store:   {} (files under /store/, API under /api/v1/)",
        app.store.root().display()
    );
    match &app.boot {
        Some(b) => println!("  boot:    {} (under /boot/, no token needed)", b.display()),
        None => println!("  boot:    none"),
    }
    println!("  tokens:  {}", app.auth.describe());
    if let Some(c) = &certs {
        println!("  tls:     {c:?}, reloaded on SIGHUP");
    }
    println!(
        "  limits:  {} connections, {} requests at once; upload sessions end after {} idle",
        a.max_connections,
        a.max_requests,
        humantime::format_duration(a.upload_idle_timeout)
    );
    if app.auth.is_open() {
        eprintln!(
            "WARNING: no {}: anyone who can reach {addr} may read every snapshot and upload new ones; use this only on a trusted network",
            tokens.display()
        );
    } else if certs.is_none() {
        eprintln!(
            "WARNING: plain HTTP: tokens cross the network in clear; serve with --tls on an untrusted network"
        );
    }

    let limits = net::Limits {
        max_connections: a.max_connections,
        max_requests: a.max_requests,
        head: Duration::from_secs(20),
        io: Duration::from_secs(60),
    };
    // Sweep idle upload sessions on a tick.
    let every =
        (a.upload_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let sweeper = app.clone();
    let stopped = net::serve(app.clone(), ports, certs, limits, every, move || {
        sweeper.uploads.expire()
    })?;
    let aborted = app.uploads.abort_all();
    eprintln!(
        "appliance serve: {}: stopped after {:.1?} of draining; {aborted} open upload sessions aborted",
        stopped.signal, stopped.drained
    );
    Ok(())
}
