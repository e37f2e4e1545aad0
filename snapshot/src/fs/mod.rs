//! Filesystem probes and used-block maps, each read from the filesystem's own allocation data:
//! ext2/3/4 block bitmaps, the NTFS `$Bitmap`, FAT tables; swap holds nothing worth keeping.

pub mod ext;
pub mod fat;
pub mod ntfs;
pub mod swap;

use crate::extents::Extents;
use crate::source::ReadAt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Ntfs,
    Fat12,
    Fat16,
    Fat32,
    Swap,
}

/// What the manifest records about a filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filesystem {
    pub kind: FsKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub block_size: u32,
    /// Bytes the filesystem spans (may be less than its partition).
    pub size: u64,
    /// Bytes of the partition that are in use (metadata included).
    pub used: u64,
}

/// A recognised filesystem and the byte ranges of its partition that must be kept.
#[derive(Debug, Clone)]
pub struct Probe {
    pub fs: Filesystem,
    /// Used ranges, relative to the partition start. Anything of the partition past the filesystem's
    /// own size (an NTFS backup boot sector, slack) is included as used.
    pub used: Extents,
}

/// Outcome of probing a partition.
#[derive(Debug)]
pub enum Found {
    /// A filesystem we understand, with its used-block map.
    Known(Probe),
    /// No filesystem we recognise: the partition is copied whole.
    Unknown,
    /// A filesystem was recognised but its metadata is damaged; `reason` says where. The
    /// partition is copied whole and the reason reported, never a guessed map.
    Damaged { kind: FsKind, reason: String },
}

type ProbeFn = fn(&dyn ReadAt, u64, u64) -> Option<anyhow::Result<Probe>>;

/// Probe the partition at `offset`/`len` of `dev`. Each probe answers `None` when its signature
/// is absent, and an error when the signature is there but the metadata does not hold together.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Found {
    let probes: [(FsKind, ProbeFn); 4] = [
        (FsKind::Ext4, ext::probe),
        (FsKind::Ntfs, ntfs::probe),
        (FsKind::Fat32, fat::probe),
        (FsKind::Swap, swap::probe),
    ];
    for (kind, p) in probes {
        match p(dev, offset, len) {
            None => continue,
            Some(Ok(probe)) => return Found::Known(probe),
            Some(Err(e)) => {
                return Found::Damaged {
                    kind,
                    reason: format!("{e:#}"),
                }
            }
        }
    }
    Found::Unknown
}
