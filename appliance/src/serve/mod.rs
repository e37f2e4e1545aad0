//! `appliance serve`: the store's files under `/store/` (so `restorer --from
//! http://HOST:PORT/store` and any [`snapshot::store::HttpStore`] read it), boot files under
//! `/boot/`, and the JSON API under `/api/v1/` (listings and upload sessions). The HTTP contract
//! is in `docs/api.md`.
//!
//! Threads: `--max-connections` workers each accept a connection and serve its requests until it
//! closes or idles out; more connections wait in the kernel's accept queue. A signal thread
//! receives SIGTERM/SIGINT (blocked everywhere else); the main thread then stops the listener,
//! lets every request in progress finish, aborts the open upload sessions and returns.

mod api;
mod auth;
mod browse;
mod files;
mod http;
mod progress;
mod sys;
mod uploads;

use crate::cli::ServeArgs;
use anyhow::{bail, Context, Result};
use auth::{Auth, Who};
use files::Tree;
use http::{Request, Response, Timeouts};
use snapshot::store::LocalStore;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    if a.max_connections == 0 || a.max_connections > 4096 {
        bail!("--max-connections must be between 1 and 4096");
    }
    // Before any thread exists, so that every thread inherits the blocked mask.
    let wait_signal =
        sys::block_termination_signals().context("blocking SIGTERM and SIGINT for sigwait")?;
    let store = LocalStore::open(&a.store)?;
    store
        .public_key()
        .context("the store has no readable public key (was it made by `appliance init`?)")?;
    if let Some(b) = &a.boot {
        if !b.is_dir() {
            bail!("--boot {}: not a directory", b.display());
        }
    }
    let tokens = store.root().join("private").join("tokens.json");
    let auth = Auth::load(&tokens)?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    let app = Arc::new(App {
        store,
        boot: a.boot.clone(),
        auth,
        uploads: uploads::Uploads::new(a.upload_idle_timeout),
        progress: Default::default(),
    });

    println!("appliance serve: listening on http://{addr}");
    println!(
        "  store:   {} (files under /store/, API under /api/v1/)",
        app.store.root().display()
    );
    match &app.boot {
        Some(b) => println!("  boot:    {} (under /boot/, no token needed)", b.display()),
        None => println!("  boot:    none"),
    }
    println!("  tokens:  {}", app.auth.describe());
    println!(
        "  workers: {}; upload sessions end after {} idle",
        a.max_connections,
        humantime::format_duration(a.upload_idle_timeout)
    );
    if app.auth.is_open() {
        eprintln!(
            "WARNING: no {}: anyone who can reach {addr} may read every snapshot and upload new ones; use this only on a trusted network",
            tokens.display()
        );
    }

    let (sig_tx, sig_rx) = crossbeam_channel::bounded::<i32>(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first = true;
            loop {
                match wait_signal() {
                    Ok(sig) if first => {
                        first = false;
                        let _ = sig_tx.send(sig);
                    }
                    Ok(_) => {
                        eprintln!("appliance serve: second signal: exiting at once");
                        std::process::exit(1);
                    }
                    Err(e) => {
                        eprintln!("appliance serve: error: waiting for signals: {e}");
                        return;
                    }
                }
            }
        })
        .context("starting the signal thread")?;

    let stop = Arc::new(AtomicBool::new(false));
    let listener = Arc::new(listener);
    let timeouts = Timeouts::default();
    let mut workers = Vec::new();
    for i in 0..a.max_connections {
        let (app, stop, listener, t) = (
            app.clone(),
            stop.clone(),
            listener.clone(),
            timeouts.clone(),
        );
        let w = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || worker(&app, &listener, &stop, &t))
            .context("starting worker threads")?;
        workers.push(w);
    }

    // Sweep idle upload sessions while waiting for a signal.
    let tick =
        (a.upload_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let signal = loop {
        match sig_rx.recv_timeout(tick) {
            Ok(sig) => break Some(sig),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => app.uploads.expire(),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break None,
        }
    };
    let name = match signal {
        Some(libc::SIGTERM) => "SIGTERM",
        Some(libc::SIGINT) => "SIGINT",
        _ => "signal thread ended",
    };
    eprintln!(
        "appliance serve: {name}: not accepting connections; finishing the requests in progress"
    );
    stop.store(true, Ordering::SeqCst);
    // Shutting the listening socket down wakes every worker blocked in accept() (EINVAL) and
    // refuses new connections at once. std has no shutdown() for listeners, so this goes
    // through a TcpStream on a duplicate of the same socket.
    match listener.try_clone() {
        Ok(l) => {
            let _ = TcpStream::from(OwnedFd::from(l)).shutdown(Shutdown::Read);
        }
        Err(e) => eprintln!("appliance serve: error: closing the listener: {e}"),
    }
    let started = Instant::now();
    for w in workers {
        let _ = w.join();
    }
    let aborted = app.uploads.abort_all();
    eprintln!(
        "appliance serve: stopped after {:.1?} of draining; {aborted} open upload sessions aborted",
        started.elapsed()
    );
    if signal.is_none() {
        bail!("stopped because the signal thread failed");
    }
    Ok(())
}

fn worker(app: &App, listener: &TcpListener, stop: &AtomicBool, t: &Timeouts) {
    let mut last_error: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    http::serve_connection(stream, peer, t, stop, &|req| app.handle(req))
                }));
                if served.is_err() {
                    eprintln!(
                        "appliance serve: internal error: a handler panicked; the connection from {peer} was closed"
                    );
                }
            }
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) {
                    continue;
                }
                // E.g. EMFILE: out of file descriptors. Say so at most once a minute, back off
                // a little and keep serving.
                let quiet = matches!(last_error, Some(t) if t.elapsed() < Duration::from_secs(60));
                if !quiet {
                    eprintln!("appliance serve: error: accepting a connection: {e}");
                    last_error = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
