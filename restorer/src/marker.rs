//! The in-progress marker: 64 bytes written into the held-back table area when a restore starts
//! and overwritten by the table when it ends. A rerun that finds it knows the disk holds a partial
//! restore and reads back what is already there before fetching; a first run on a blank disk
//! finds none and pays nothing for hashing. It never looks like a partition table (no 0x55AA, no
//! "EFI PART").
//!
//! ```text
//! 0   8  magic "BMRRSTOR"
//! 8   4  version (u32 LE) = 1
//! 12  4  disk number (u32 LE)
//! 16 32  SHA-256 of "<host>/<snapshot>"
//! 48 16  first 16 bytes of SHA-256 of bytes 0..48 (checksum)
//! ```

use sha2::{Digest as _, Sha256};

pub const LEN: usize = 64;
const MAGIC: &[u8; 8] = b"BMRRSTOR";
const VERSION: u32 = 1;

/// A marker found on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub disk: u32,
    snapshot: [u8; 32],
}

impl Marker {
    pub fn new(host: &str, snapshot: &str, disk: u32) -> Marker {
        Marker {
            disk,
            snapshot: Sha256::digest(format!("{host}/{snapshot}")).into(),
        }
    }

    /// Whether this marker was left by a restore of the same snapshot and disk.
    pub fn same_restore(&self, other: &Marker) -> bool {
        self == other
    }

    pub fn to_bytes(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.disk.to_le_bytes());
        b[16..48].copy_from_slice(&self.snapshot);
        let sum = Sha256::digest(&b[..48]);
        b[48..].copy_from_slice(&sum[..16]);
        b
    }

    pub fn parse(b: &[u8]) -> Option<Marker> {
        if b.len() < LEN || &b[..8] != MAGIC {
            return None;
        }
        if u32::from_le_bytes(b[8..12].try_into().ok()?) != VERSION {
            return None;
        }
        if Sha256::digest(&b[..48])[..16] != b[48..64] {
            return None;
        }
        Some(Marker {
            disk: u32::from_le_bytes(b[12..16].try_into().ok()?),
            snapshot: b[16..48].try_into().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let m = Marker::new("web1", "20261123T051900Z", 1);
        let b = m.to_bytes();
        assert_eq!(Marker::parse(&b), Some(m.clone()));
        assert!(m.same_restore(&Marker::new("web1", "20261123T051900Z", 1)));
        assert!(!m.same_restore(&Marker::new("web1", "20261123T051901Z", 1)));
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(Marker::parse(&bad), None);
        assert_eq!(Marker::parse(&[0u8; 64]), None);
    }
}
