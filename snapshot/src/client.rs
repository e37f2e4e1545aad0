//! The one client of the appliance's JSON API (`/api/v1`, docs/api.md): `restorer capture`,
//! `restorer failback` and the boot image's progress reports all go through it, so each request
//! carries the token, trusts the CA and follows the timeouts and retry policy of one
//! [`Options`] (a best-effort caller sets `retry_for` to zero: one attempt).

use crate::store::http::{Attempt, HttpStore, Options};
use crate::store::FetchError;
use anyhow::{anyhow, bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::io::Read;

/// Answers larger than this are cut (every JSON answer of the API is far smaller).
const ANSWER_LIMIT: u64 = 16 << 20;

pub struct ApplianceClient {
    http: HttpStore,
}

impl ApplianceClient {
    /// A client of the API at `api_base` (`http://HOST:PORT/api/v1`).
    pub fn new(api_base: &str, opts: Options) -> Result<ApplianceClient> {
        Ok(ApplianceClient {
            http: HttpStore::new(api_base, opts)?,
        })
    }

    /// A client of the API beside the store at `store_url` (`http://HOST:PORT/store`).
    pub fn beside(store_url: &str, opts: Options) -> Result<ApplianceClient> {
        ApplianceClient::new(&api_beside(store_url)?, opts)
    }

    /// The URL of `path` below the API base.
    pub fn url(&self, path: &str) -> String {
        self.http.url(path)
    }

    /// Send `body` with `method` to `path`, retried on faults as the options say; returns the
    /// status and the answer. A 404 is [`FetchError::NotFound`]; other refusals name the status.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        ctype: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), FetchError> {
        let url = self.url(path);
        self.http
            .with_retry(&format!("{method} {url}"), |agent, token| {
                let mut req = agent.request(method, &url).set("Content-Type", ctype);
                if let Some(t) = token {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
                let resp = if body.is_empty() && (method == "DELETE" || method == "GET") {
                    req.call()
                } else {
                    req.send_bytes(body)
                }
                .map_err(Attempt::from)?;
                let status = resp.status();
                let mut out = Vec::new();
                resp.into_reader()
                    .take(ANSWER_LIMIT)
                    .read_to_end(&mut out)?;
                Ok((status, out))
            })
    }

    /// Send `v` as JSON and read the answer as `T`.
    pub fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        v: &impl Serialize,
    ) -> Result<T> {
        let body = serde_json::to_vec(v).context("encoding the request")?;
        self.answer(method, path, &body)
    }

    /// `GET` `path` and read the answer as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer("GET", path, &[])
    }

    fn answer<T: DeserializeOwned>(&self, method: &str, path: &str, body: &[u8]) -> Result<T> {
        let (_, out) = self
            .call(method, path, "application/json", body)
            .map_err(|e| anyhow!("{e}"))?;
        serde_json::from_slice(&out)
            .with_context(|| format!("{method} {}: unexpected answer", self.url(path)))
    }
}

/// `http://HOST:PORT/store` -> `http://HOST:PORT/api/v1`.
pub fn api_beside(store_url: &str) -> Result<String> {
    let base = store_url.trim_end_matches('/');
    match base.strip_suffix("/store") {
        Some(root) => Ok(format!("{root}/api/v1")),
        None => bail!("{store_url} does not end in /store: the API's address cannot be derived"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_base_from_store_url() {
        assert_eq!(
            api_beside("http://10.0.0.1:8080/store/").unwrap(),
            "http://10.0.0.1:8080/api/v1"
        );
        assert!(api_beside("http://h/other").is_err());
    }
}
