//! A store behind any HTTP server: `appliance serve`, nginx, `python3 -m http.server`, S3.
//! Faults (connection refused, reset, timeout, 5xx) are retried with exponential backoff for up to
//! `Options::retry_for`, so a restore survives an appliance restart or a network blip.

use super::{FetchError, Store};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Options {
    /// Bearer token sent with every request.
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (HTTPS); the built-in roots otherwise.
    pub ca: Option<PathBuf>,
    /// How long to keep retrying a request that fails with a fault.
    pub retry_for: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token: None,
            ca: None,
            retry_for: Duration::from_secs(600),
            timeout: Duration::from_secs(60),
        }
    }
}

pub struct HttpStore {
    base: String,
    agent: ureq::Agent,
    opts: Options,
    fetched: AtomicU64,
    /// Set while the server is unreachable, so a run of failures prints one line, not hundreds.
    warned: std::sync::Mutex<Option<Instant>>,
}

impl HttpStore {
    pub fn new(base: &str, opts: Options) -> Result<HttpStore> {
        Ok(HttpStore {
            base: base.trim_end_matches('/').to_string(),
            agent: agent(&opts)?,
            opts,
            fetched: AtomicU64::new(0),
            warned: std::sync::Mutex::new(None),
        })
    }

    /// Bytes received in response bodies so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// One request with the token set, retried with backoff on faults. `send` builds and sends.
    pub fn with_retry<T>(
        &self,
        what: &str,
        mut send: impl FnMut(&ureq::Agent, Option<&str>) -> std::result::Result<T, Attempt>,
    ) -> std::result::Result<T, FetchError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            let err = match send(&self.agent, self.opts.token.as_deref()) {
                Ok(v) => {
                    if let Some(since) = self.warned.lock().map(|mut w| w.take()).unwrap_or(None) {
                        eprintln!(
                            "{}: reachable again after {:.0?}",
                            self.base,
                            since.elapsed()
                        );
                    }
                    return Ok(v);
                }
                Err(Attempt::Status(404, _)) => return Err(FetchError::NotFound(what.to_string())),
                Err(Attempt::Refused(msg)) => {
                    return Err(FetchError::Other(anyhow::anyhow!("{what}: {msg}")))
                }
                Err(Attempt::Status(code, msg)) if code < 500 && code != 429 && code != 408 => {
                    return Err(FetchError::Other(anyhow::anyhow!(
                        "{what}: HTTP {code} {msg}"
                    )));
                }
                Err(e) => e,
            };
            if start.elapsed() >= self.opts.retry_for {
                return Err(FetchError::Other(anyhow::anyhow!(
                    "{what}: {} (gave up after retrying for {:.0?})",
                    describe(&err),
                    self.opts.retry_for
                )));
            }
            if let Ok(mut w) = self.warned.lock() {
                if w.is_none() {
                    eprintln!(
                        "{what}: {}; retrying for up to {:.0?}",
                        describe(&err),
                        self.opts.retry_for
                    );
                    *w = Some(Instant::now());
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path)
    }
}

/// How one attempt failed: an HTTP status (with the first line of the body), a fault (retried)
/// or a refusal that no retry can change (the server's TLS certificate, a malformed URL).
#[derive(Debug)]
pub enum Attempt {
    Status(u16, String),
    Fault(String),
    Refused(String),
}

impl From<ureq::Error> for Attempt {
    fn from(e: ureq::Error) -> Attempt {
        match e {
            ureq::Error::Status(code, r) => {
                let body = r.into_string().unwrap_or_default();
                Attempt::Status(
                    code,
                    body.lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect(),
                )
            }
            ureq::Error::Transport(t) => {
                use ureq::ErrorKind::{InsecureRequestHttpsOnly, InvalidUrl, UnknownScheme};
                if let Some(tls) = tls_error(&t) {
                    Attempt::Refused(format!(
                        "TLS: {tls} (the server's certificate must be signed by the CA given \
                         with --ca, and name the host of the URL)"
                    ))
                } else if matches!(
                    t.kind(),
                    InvalidUrl | UnknownScheme | InsecureRequestHttpsOnly
                ) {
                    Attempt::Refused(t.to_string())
                } else {
                    Attempt::Fault(t.to_string())
                }
            }
        }
    }
}

/// The TLS error under a transport error, if that is what it is (rustls reports through
/// `io::Error`, whose `source()` skips the wrapped error: `get_ref` reaches it).
fn tls_error(t: &ureq::Transport) -> Option<rustls::Error> {
    let mut e: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(err) = e {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r.clone());
            }
        }
        e = err.source();
    }
    None
}

impl From<std::io::Error> for Attempt {
    fn from(e: std::io::Error) -> Attempt {
        Attempt::Fault(format!("reading the response: {e}"))
    }
}

fn describe(e: &Attempt) -> String {
    match e {
        Attempt::Status(code, msg) => format!("HTTP {code} {msg}"),
        Attempt::Fault(m) | Attempt::Refused(m) => m.clone(),
    }
}

impl Store for HttpStore {
    fn read_with(
        &self,
        path: &str,
        max: u64,
        sink: &mut super::Sink<'_>,
    ) -> std::result::Result<(), FetchError> {
        let url = self.url(path);
        let n = self.with_retry(&url, |agent, token| {
            let mut req = agent.get(&url);
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let resp = req.call()?;
            let too_large = |n: String| {
                Attempt::Refused(format!(
                    "the server sent {n} bytes, more than the {max} a file of this kind may hold"
                ))
            };
            let declared = resp
                .header("Content-Length")
                .and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(n) = declared.filter(|n| *n > max) {
                return Err(too_large(n.to_string()));
            }
            // The hint, from Content-Length (bounded by `max`): a 32 MiB index is read into one
            // allocation, not grown by doubling.
            let mut body = resp.into_reader().take(max.saturating_add(1));
            let n = sink(&mut body, declared.unwrap_or(0).min(max))?;
            if n > max {
                return Err(too_large(format!("at least {n}")));
            }
            Ok(n)
        })?;
        self.fetched.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn location(&self) -> String {
        self.base.clone()
    }

    /// `appliance serve` lists snapshots at `/api/v1/hosts/<host>/snapshots` next to `/store`;
    /// any other server (no such base, 404) cannot list.
    fn list_snapshots(
        &self,
        host: &str,
    ) -> std::result::Result<Option<Vec<super::Listed>>, FetchError> {
        let Some(root) = self.base.strip_suffix("/store") else {
            return Ok(None);
        };
        let url = format!("{root}/api/v1/hosts/{host}/snapshots");
        let body = match self.with_retry(&url, |agent, token| {
            let mut req = agent.get(&url);
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let mut body = Vec::new();
            req.call()?
                .into_reader()
                .take(super::SMALL_FILE_MAX * 4)
                .read_to_end(&mut body)?;
            Ok(body)
        }) {
            Ok(b) => b,
            Err(FetchError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let v: Vec<serde_json::Value> = serde_json::from_slice(&body)
            .map_err(|e| anyhow::anyhow!("{url}: malformed snapshot listing: {e}"))?;
        Ok(Some(
            v.iter()
                .filter_map(|s| {
                    let id = s.get("snapshot")?.as_str()?.to_string();
                    let order = s.get("created").and_then(|c| c.as_str()).map(|c| {
                        let seq = s.get("sequence").and_then(|q| q.as_u64()).unwrap_or(0);
                        (seq, c.to_string())
                    });
                    Some(super::Listed { id, order })
                })
                .collect(),
        ))
    }
}

/// An HTTP agent with the timeout and the CA of `opts` (without `ca`, the built-in web roots).
pub fn agent(opts: &Options) -> Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new()
        .timeout(opts.timeout)
        .max_idle_connections_per_host(64);
    if let Some(ca) = &opts.ca {
        b = b.tls_config(Arc::new(tls_config(ca)?));
    }
    Ok(b.build())
}

fn tls_config(ca: &std::path::Path) -> Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca).with_context(|| format!("reading CA file {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.with_context(|| format!("{}: malformed PEM", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: unusable certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate found", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
