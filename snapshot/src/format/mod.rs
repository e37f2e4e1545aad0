//! Byte formats of the store (specified in `docs/formats.md`): chunk blobs, chunk indexes and
//! `store.json`.

pub mod blob;
pub mod index;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::sync::OnceLock;

/// Chunk size of every store of format version 1: 4 MiB, aligned to disk offset 0.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// SHA-256 of a chunk's uncompressed bytes: its address in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn parse(s: &str) -> Option<Digest> {
        let mut d = [0u8; 32];
        hex::decode_to_slice(s, &mut d).ok()?;
        Some(Digest(d))
    }

    /// Path of the chunk blob relative to the store root.
    pub fn chunk_path(&self) -> String {
        let h = self.hex();
        format!("chunks/{}/{}", &h[..4], h)
    }

    /// Digest of an all-zero chunk of `len` bytes (cached for the full chunk size).
    pub fn zeros(len: u64) -> Digest {
        static FULL: OnceLock<Digest> = OnceLock::new();
        if len == CHUNK_SIZE {
            *FULL.get_or_init(|| Digest::of(&vec![0u8; CHUNK_SIZE as usize]))
        } else {
            Digest::of(&vec![0u8; len as usize])
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// `STORE/store.json`: what kind of store this is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreInfo {
    pub format: String,
    pub version: u32,
    pub chunk_size: u64,
}

pub const STORE_FORMAT: &str = "bmr-store";
pub const STORE_VERSION: u32 = 1;

impl StoreInfo {
    pub fn new() -> StoreInfo {
        StoreInfo {
            format: STORE_FORMAT.into(),
            version: STORE_VERSION,
            chunk_size: CHUNK_SIZE,
        }
    }

    /// Parse and check `store.json`; `origin` names where it came from for the error.
    pub fn parse(bytes: &[u8], origin: &str) -> anyhow::Result<StoreInfo> {
        let info: StoreInfo = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("{origin}: malformed store.json: {e}"))?;
        if info.format != STORE_FORMAT {
            anyhow::bail!("{origin}: not a snapshot store (format {:?})", info.format);
        }
        if info.version != STORE_VERSION {
            anyhow::bail!(
                "{origin}: store format version {} is not supported (this build reads {})",
                info.version,
                STORE_VERSION
            );
        }
        if info.chunk_size != CHUNK_SIZE {
            anyhow::bail!("{origin}: chunk size {} is not supported", info.chunk_size);
        }
        Ok(info)
    }
}

impl Default for StoreInfo {
    fn default() -> Self {
        Self::new()
    }
}
