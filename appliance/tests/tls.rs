//! `appliance serve` over HTTPS with the store's own CA (`appliance init`), a plain port beside it
//! that serves only the boot files, a certificate reissued by `appliance tls` and loaded on
//! SIGHUP, and clients that do not trust the CA refused.

mod common;

use common::http::Server;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_appliance");

fn appliance(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn init(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    let out = appliance(&["init", "--store", store.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    store
}

/// A client that trusts only `ca`.
fn client(ca: &Path) -> ureq::Agent {
    let pem = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(cfg))
        .timeout(Duration::from_secs(10))
        .build()
}

/// Status, or the transport error's text.
fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, String), String> {
    match agent.get(url).call() {
        Ok(r) => Ok((r.status(), r.into_string().unwrap_or_default())),
        Err(ureq::Error::Status(s, r)) => Ok((s, r.into_string().unwrap_or_default())),
        Err(e) => Err(format!("{e:#}")),
    }
}

#[test]
fn https_with_the_stores_ca_boot_port_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let store = init(dir.path());
    let tls = store.join("private/tls");
    let ca = tls.join("ca.pem");
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(tls.join(f).exists(), "init made no {f}");
    }
    let other = init(&dir.path().join("other"));
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(boot.join("pxe")).unwrap();
    std::fs::write(boot.join("pxe/boot.ipxe"), "#!ipxe\n").unwrap();

    let s = store.to_str().unwrap();
    // Without a certificate --tls says how to make one.
    let bare = init(&dir.path().join("bare"));
    std::fs::remove_dir_all(bare.join("private/tls")).unwrap();
    let out = appliance(&[
        "serve",
        "--tls",
        "--store",
        bare.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("appliance tls"),
        "{err}"
    );

    let srv = Server::start(
        &store,
        &[
            "--tls",
            "--tls-listen",
            "127.0.0.1:0",
            "--boot",
            boot.to_str().unwrap(),
        ],
    );
    assert!(
        srv.base.starts_with("https://127.0.0.1:"),
        "{}",
        srv.listening
    );
    let plain = srv
        .listening
        .split(", ")
        .find_map(|p| p.strip_prefix("http://"))
        .and_then(|p| p.split(' ').next())
        .unwrap_or_else(|| panic!("no plain port in {}", srv.listening))
        .to_string();
    let port = srv.addr().rsplit(':').next().unwrap().to_string();

    // Trusted through the store's CA, by address and by name.
    let ours = client(&ca);
    assert_eq!(get(&ours, &srv.url("/api/v1/hosts")).unwrap().0, 200);
    let by_name = format!("https://localhost:{port}/store/store.json");
    assert_eq!(get(&ours, &by_name).unwrap().0, 200);
    assert_eq!(get(&ours, &srv.url("/boot/pxe/boot.ipxe")).unwrap().0, 200);

    // Another store's CA: refused in the handshake.
    let theirs = client(&other.join("private/tls/ca.pem"));
    let e = get(&theirs, &srv.url("/api/v1/hosts")).unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    srv.wait_log("TLS handshake failed");

    // The plain port: boot files only; the store and the API point at HTTPS.
    let agent = ureq::AgentBuilder::new().build();
    let (st, body) = get(&agent, &format!("http://{plain}/store/store.json")).unwrap();
    assert_eq!(st, 403, "{body}");
    assert!(body.contains(&srv.base), "{body}");
    let (st, _) = get(&agent, &format!("http://{plain}/api/v1/hosts")).unwrap();
    assert_eq!(st, 403);
    let (st, body) = get(&agent, &format!("http://{plain}/boot/pxe/boot.ipxe")).unwrap();
    assert_eq!((st, body.as_str()), (200, "#!ipxe\n"));

    // Reissued for the address only and loaded on SIGHUP: `localhost` no longer matches.
    let out = appliance(&["tls", "--store", s, "--name", "127.0.0.1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    srv.signal("-HUP");
    srv.wait_log("TLS certificate reloaded");
    let fresh = client(&ca);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(&fresh, &by_name) {
            Err(e) if e.to_lowercase().contains("certificate") => break,
            other => assert!(Instant::now() < deadline, "still accepted: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(&fresh, &srv.url("/api/v1/hosts")).unwrap().0, 200);

    // A broken certificate file on SIGHUP: the old one stays in use.
    std::fs::write(tls.join("server.pem"), "garbage").unwrap();
    srv.signal("-HUP");
    srv.wait_log("still serving the previous certificate");
    assert_eq!(get(&fresh, &srv.url("/api/v1/hosts")).unwrap().0, 200);
}
