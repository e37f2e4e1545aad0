//! Progress reports to the appliance (`POST /api/v1/progress/<host>`, docs/api.md): the job's
//! state and its last output line, at start, every heartbeat and at the end. Best effort: an
//! appliance that does not answer never stops the job, and one warning says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// An agent that trusts the image's appliance CA, if it has one (as the job does).
fn agent(timeout: Duration) -> Option<ureq::Agent> {
    let ca = std::path::Path::new(super::job::CA);
    let opts = snapshot::store::http::Options {
        ca: ca.exists().then(|| ca.to_path_buf()),
        timeout,
        ..Default::default()
    };
    match snapshot::store::http::agent(&opts) {
        Ok(a) => Some(a),
        Err(e) => {
            crate::say!("restorer: no progress reports: {e:#}");
            None
        }
    }
}

pub struct Reporter {
    url: String,
    token: Option<String>,
    agent: ureq::Agent,
    started: Instant,
    warned: AtomicBool,
}

impl Reporter {
    /// From the store URL (`http://HOST:PORT/store`): the API sits beside it. `None` for a store
    /// that is not behind `appliance serve` (no `/store` suffix) or without a host.
    pub fn new(
        store_url: Option<&str>,
        host: Option<&str>,
        token: Option<&str>,
    ) -> Option<Reporter> {
        let base = store_url?.trim_end_matches('/').strip_suffix("/store")?;
        Some(Reporter {
            url: format!("{base}/api/v1/progress/{}", host?),
            token: token.map(str::to_string),
            agent: agent(Duration::from_secs(5))?,
            started: Instant::now(),
            warned: AtomicBool::new(false),
        })
    }

    /// The host a failover VM was started from (`GET /api/v1/failover/<vm>`), so that a failback
    /// reports under the same host as a restore; `None` when the appliance does not say.
    pub fn vm_host(store_url: &str, vm: &str, token: Option<&str>) -> Option<String> {
        let base = store_url.trim_end_matches('/').strip_suffix("/store")?;
        let mut req = agent(Duration::from_secs(10))?.get(&format!("{base}/api/v1/failover/{vm}"));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let text = req.call().ok()?.into_string().ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("host")?.as_str().map(str::to_string)
    }

    pub fn send(&self, state: &str, message: &str) {
        let body = serde_json::json!({
            "state": state,
            "message": message,
            "seconds": self.started.elapsed().as_secs(),
        });
        let mut req = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json");
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if let Err(e) = req.send_string(&body.to_string()) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                crate::say!(
                    "restorer: progress reports to {} fail ({e}); the job goes on",
                    self.url
                );
            }
        }
    }
}
