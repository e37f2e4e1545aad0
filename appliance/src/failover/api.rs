//! The failover part of the HTTP API, `/api/v1/failover/...` (reference in `docs/failback.md`).
//! `appliance serve` routes every request under that prefix here; authentication is the
//! server's business. Answers are JSON; errors are `{"error": "one line"}`.
//!
//! ```text
//! GET  /api/v1/failover                    every VM's status
//! GET  /api/v1/failover/<vm>               one VM's status
//! GET  /api/v1/failover/<vm>/rounds        rounds published so far
//! POST /api/v1/failover/<vm>/rounds        make a round; body {"final": bool, "timeout_seconds": n}
//! POST /api/v1/failover/<vm>/stop          stop the VM; body {"timeout_seconds": n, "hard": bool}
//! ```

use snapshot::store::LocalStore;
use std::time::Duration;

const PREFIX: &str = "/api/v1/failover";

/// Who may see or drive a VM: `may(host, change)` for the VM's source host; `change` is true
/// for making rounds and stopping.
pub type May<'a> = &'a dyn Fn(&str, bool) -> bool;

/// Handle a request if `path` is a failover path (`None` otherwise). Returns status and body.
/// VMs whose host `may` refuses are left out of lists and answered with 403.
pub fn handle(
    store: &LocalStore,
    method: &str,
    path: &str,
    body: &[u8],
    may: May,
) -> Option<(u16, Vec<u8>)> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path.strip_prefix(PREFIX)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    // QEMU and the qcow2 backing chain get absolute paths whatever the server's --store was.
    let absolute = match std::fs::canonicalize(store.root()).and_then(|root| {
        LocalStore::open(&root).map_err(|e| std::io::Error::other(format!("{e:#}")))
    }) {
        Ok(s) => s,
        Err(e) => return Some(error(500, &format!("opening the store: {e}"))),
    };
    let store = &absolute;
    let params: serde_json::Value = if body.iter().all(|b| b.is_ascii_whitespace()) {
        serde_json::json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Some(error(400, &format!("malformed JSON body: {e}"))),
        }
    };
    let timeout = Duration::from_secs(
        params
            .get("timeout_seconds")
            .and_then(|v| v.as_u64())
            .unwrap_or(60)
            .min(3600),
    );
    let flag = |k: &str| params.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    if let Some(vm) = parts.first() {
        if let Ok(host) = super::host_of(store, vm) {
            let change = method != "GET";
            if !may(&host, change) {
                let what = if change { "change" } else { "read" };
                return Some(error(
                    403,
                    &format!("this token may not {what} VM {vm} (host {host})"),
                ));
            }
        }
    }
    let result = match (method, parts.as_slice()) {
        ("GET", []) => super::list_all(store).map(|mut v| {
            v.retain(|s| may(&s.host, false));
            json(&v)
        }),
        ("GET", [vm]) => super::status(store, vm).map(|v| json(&v)),
        ("GET", [vm, "rounds"]) => super::status(store, vm).map(|s| json(&s.rounds)),
        ("POST", [vm, "rounds"]) => {
            let ask: snapshot::api::RoundAsk = match serde_json::from_value(params.clone()) {
                Ok(a) => a,
                Err(e) => return Some(error(400, &format!("malformed round request: {e}"))),
            };
            super::round::run(store, vm, ask.is_final, timeout).map(|r| json(&r))
        }
        ("POST", [vm, "stop"]) => super::stop(store, vm, timeout, flag("hard"))
            .map(|how| json(&serde_json::json!({ "vm": vm, "stopped": how }))),
        (_, [] | [_] | [_, "rounds"] | [_, "stop"]) => {
            return Some(error(405, &format!("{method} not allowed on {path}")))
        }
        _ => return Some(error(404, &format!("{path}: no such failover resource"))),
    };
    Some(match result {
        Ok(body) => (200, body),
        Err(e) => {
            let msg = format!("{e:#}");
            let code = if msg.contains("no failover VM named") {
                404
            } else if msg.contains("invalid vm name") {
                400
            } else if msg.contains("is failed back") {
                409
            } else {
                500
            };
            error(code, &msg)
        }
    })
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("serialises");
    b.push(b'\n');
    b
}

fn error(code: u16, msg: &str) -> (u16, Vec<u8>) {
    (code, json(&snapshot::api::ApiError::new(msg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let d = tempfile::tempdir().unwrap();
        let (store, _) = LocalStore::init(&d.path().join("s")).unwrap();
        assert!(handle(&store, "GET", "/api/v1/hosts", b"", &|_, _| true).is_none());
        assert!(handle(&store, "GET", "/api/v1/failoverx", b"", &|_, _| true).is_none());
        let (code, body) = handle(&store, "GET", "/api/v1/failover", b"", &|_, _| true).unwrap();
        assert_eq!((code, body.trim_ascii()), (200, &b"[]"[..]));
        assert_eq!(
            handle(&store, "GET", "/api/v1/failover/nope", b"", &|_, _| true)
                .unwrap()
                .0,
            404
        );
        assert_eq!(
            handle(
                &store,
                "POST",
                "/api/v1/failover/nope/rounds",
                b"{}",
                &|_, _| true
            )
            .unwrap()
            .0,
            404
        );
        assert_eq!(
            handle(
                &store,
                "POST",
                "/api/v1/failover/a/rounds",
                b"{",
                &|_, _| true
            )
            .unwrap()
            .0,
            400
        );
        assert_eq!(
            handle(&store, "DELETE", "/api/v1/failover/a", b"", &|_, _| true)
                .unwrap()
                .0,
            405
        );
        assert_eq!(
            handle(&store, "GET", "/api/v1/failover/a/b/c", b"", &|_, _| true)
                .unwrap()
                .0,
            404
        );
        assert_eq!(
            handle(&store, "GET", "/api/v1/failover/..", b"", &|_, _| true)
                .unwrap()
                .0,
            400
        );
    }
}
