//! Failback rounds (`STORE/failover/<vm>/rounds/<n>/`): the format shared by the appliance that
//! publishes them and the restorer that applies them. Layout and meaning in `docs/failback.md`.
//!
//! ```text
//! STORE/failover/<vm>/rounds/<n>/round.json   this struct, JSON
//! STORE/failover/<vm>/rounds/<n>/round.sig    ed25519 signature of round.json (as manifest.sig)
//! STORE/failover/<vm>/rounds/<n>/disk<N>.idx  the VM's disk N at freeze time: a full chunk index
//! STORE/failover/<vm>/latest                  text: the newest published round number
//! ```

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub const ROUND_VERSION: u32 = 1;

/// `round.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub version: u32,
    pub vm: String,
    /// The snapshot the VM was started from.
    pub host: String,
    pub snapshot: String,
    pub round: u32,
    /// The cutover round: the VM is stopped and this is its last state.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// RFC 3339 UTC time of the freeze.
    pub created: String,
    pub disks: Vec<RoundDisk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundDisk {
    pub number: u32,
    pub size: u64,
    /// Hex SHA-256 of `disk<N>.idx`.
    pub index_sha256: String,
    /// Slots re-read since the previous round (round 1: since the snapshot), as
    /// `[first slot, count]` runs in ascending order.
    pub changed: Vec<(u64, u64)>,
    pub changed_slots: u64,
    /// Blob bytes of the distinct data chunks among the changed slots.
    pub changed_stored_bytes: u64,
}

/// Directory of round `n` of `vm`, relative to the store root.
pub fn round_dir(vm: &str, n: u32) -> String {
    format!("failover/{vm}/rounds/{n}")
}

impl Round {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("serialises");
        v.push(b'\n');
        v
    }

    /// Parse `round.json` and check its version; `origin` names it for errors.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Round> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("{origin}: malformed round: {e}"))?;
        if v.version != ROUND_VERSION {
            bail!(
                "{origin}: round version {} is not supported (this build reads {ROUND_VERSION})",
                v.version
            );
        }
        serde_json::from_slice(bytes).map_err(|e| anyhow::anyhow!("{origin}: malformed round: {e}"))
    }
}
