//! Progress reports to the appliance (`POST /api/v1/progress/<host>`, docs/api.md): the job's
//! state and its last output line, at start, every heartbeat and at the end. Best effort: an
//! appliance that does not answer never stops the job, and one warning says so.

use snapshot::client::{api_beside, ApplianceClient};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A client of the API beside `store_url` that trusts the image's appliance CA, if it has one
/// (as the job does), and tries each request once within `timeout`. `None`, silently, for a store
/// that is not behind `appliance serve` (no `/store` suffix).
fn client(store_url: &str, token: Option<&str>, timeout: Duration) -> Option<ApplianceClient> {
    let api = api_beside(store_url).ok()?;
    let ca = std::path::Path::new(super::job::CA);
    let opts = snapshot::store::http::Options {
        ca: ca.exists().then(|| ca.to_path_buf()),
        token: token.map(str::to_string),
        timeout,
        retry_for: Duration::ZERO,
    };
    match ApplianceClient::new(&api, opts) {
        Ok(c) => Some(c),
        Err(e) => {
            crate::say!("restorer: no progress reports: {e:#}");
            None
        }
    }
}

pub struct Reporter {
    path: String,
    client: ApplianceClient,
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
        Some(Reporter {
            path: format!("progress/{}", host?),
            client: client(store_url?, token, Duration::from_secs(5))?,
            started: Instant::now(),
            warned: AtomicBool::new(false),
        })
    }

    /// The host a failover VM was started from (`GET /api/v1/failover/<vm>`), so that a failback
    /// reports under the same host as a restore; `None` when the appliance does not say.
    pub fn vm_host(store_url: &str, vm: &str, token: Option<&str>) -> Option<String> {
        let c = client(store_url, token, Duration::from_secs(10))?;
        let v: serde_json::Value = c.get(&format!("failover/{vm}")).ok()?;
        v.get("host")?.as_str().map(str::to_string)
    }

    pub fn send(&self, state: &str, message: &str) {
        let body = serde_json::json!({
            "state": state,
            "message": message,
            "seconds": self.started.elapsed().as_secs(),
        });
        if let Err(e) = self
            .client
            .json::<serde_json::Value>("POST", &self.path, &body)
        {
            if !self.warned.swap(true, Ordering::Relaxed) {
                crate::say!(
                    "restorer: progress reports to {} fail ({e:#}); the job goes on",
                    self.client.url(&self.path)
                );
            }
        }
    }
}
