//! The JSON bodies of the appliance's HTTP API (`docs/api.md`), declared once: `appliance serve`
//! answers with these types and `restorer capture` and `restorer failback` send and read them.
//! A test checks every shape against the endpoint lines of `docs/api.md`.

use serde::{Deserialize, Serialize};

/// `POST /api/v1/uploads`: open an upload session for a host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenUpload {
    pub host: String,
}

/// The answer to [`OpenUpload`]: the session and the snapshot id reserved for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadOpened {
    pub upload: String,
    pub snapshot: String,
}

/// `POST /api/v1/uploads/{u}/missing`: which of these chunks must be uploaded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingAsk {
    pub digests: Vec<String>,
}

/// The answer to [`MissingAsk`]: the digests the store does not hold intact, in request order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Missing {
    pub missing: Vec<String>,
}

/// The answer to `PUT /api/v1/uploads/{u}/chunks/{digest}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkStored {
    pub chunk: String,
    /// Whether the chunk was stored now (201) rather than already held (200).
    pub stored: bool,
}

/// The answer to `PUT /api/v1/uploads/{u}/indexes/{n}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexStored {
    pub disk: u32,
    pub sha256: String,
}

/// The answer to `POST /api/v1/uploads/{u}/commit`: the published snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    pub host: String,
    pub snapshot: String,
}

/// `POST /api/v1/failover/{vm}/rounds`: publish a round of the VM's changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundAsk {
    /// The final round: stop the VM first (the cutover).
    #[serde(rename = "final", default)]
    pub is_final: bool,
    /// How long the VM may take to power off (final round), whole seconds; 60 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// The part of a round's answer a failback reads (the server sends the whole round summary).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundMade {
    pub round: u32,
}

/// Every error answer: one line saying what and where; a refused commit also lists up to 10 of
/// the chunks it lacks and how many there are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_count: Option<u64>,
}

impl ApiError {
    pub fn new(msg: impl Into<String>) -> ApiError {
        ApiError {
            error: msg.into(),
            missing: None,
            missing_count: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn keys<T: Serialize>(v: &T) -> BTreeSet<String> {
        match serde_json::to_value(v).expect("serialises") {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    /// The `"field"` names inside a `{...}` of a line of docs/api.md.
    fn documented(doc: &str, endpoint: &str, nth_brace: usize) -> BTreeSet<String> {
        let line = doc
            .lines()
            .find(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ") == endpoint)
            .unwrap_or_else(|| panic!("docs/api.md has no line for {endpoint}"));
        let braces: Vec<&str> = line
            .split('{')
            .skip(1)
            .map(|s| s.split('}').next().unwrap_or(""))
            .collect();
        let part = braces
            .iter()
            .filter(|b| b.contains('"'))
            .nth(nth_brace)
            .unwrap_or_else(|| panic!("{endpoint}: no body {nth_brace} in {line:?}"));
        part.split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_types_are_the_documented_shapes() {
        let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md"));
        let s = String::new;
        let cases = [
            ("POST /api/v1/uploads", 0, keys(&OpenUpload { host: s() })),
            (
                "POST /api/v1/uploads",
                1,
                keys(&UploadOpened {
                    upload: s(),
                    snapshot: s(),
                }),
            ),
            (
                "POST /api/v1/uploads/{u}/missing",
                0,
                keys(&MissingAsk { digests: vec![] }),
            ),
            (
                "POST /api/v1/uploads/{u}/missing",
                1,
                keys(&Missing { missing: vec![] }),
            ),
            (
                "POST /api/v1/uploads/{u}/commit",
                0,
                keys(&Committed {
                    host: s(),
                    snapshot: s(),
                }),
            ),
        ];
        for (endpoint, n, got) in cases {
            assert_eq!(got, documented(doc, endpoint, n), "{endpoint}, body {n}");
        }
        // The answers documented in their own blocks.
        for (example, got) in [
            (
                r#"{ "chunk": "3a7f…e1", "stored": true }"#,
                keys(&ChunkStored {
                    chunk: s(),
                    stored: true,
                }),
            ),
            (
                r#"{ "disk": 0, "sha256": "c0ffee…" }"#,
                keys(&IndexStored {
                    disk: 0,
                    sha256: s(),
                }),
            ),
        ] {
            assert!(doc.contains(example), "docs/api.md lacks {example}");
            let v: serde_json::Value =
                serde_json::from_str(&example.replace('…', "")).expect("valid JSON");
            let doc_keys: BTreeSet<String> = v.as_object().unwrap().keys().cloned().collect();
            assert_eq!(got, doc_keys, "{example}");
        }
        let refused = ApiError {
            error: s(),
            missing: Some(vec![]),
            missing_count: Some(2),
        };
        for k in keys(&refused) {
            assert!(doc.contains(&format!("\"{k}\":")), "docs/api.md lacks {k}");
        }
    }

    #[test]
    fn round_asks_read_as_the_server_reads_them() {
        let a: RoundAsk =
            serde_json::from_str(r#"{"final": true, "timeout_seconds": 30}"#).unwrap();
        assert!(a.is_final);
        assert_eq!(a.timeout_seconds, Some(30));
        let a: RoundAsk = serde_json::from_str("{}").unwrap();
        assert!(!a.is_final && a.timeout_seconds.is_none());
        assert_eq!(
            serde_json::to_string(&RoundAsk {
                is_final: true,
                timeout_seconds: None
            })
            .unwrap(),
            r#"{"final":true}"#
        );
    }
}
