//! Linux swap: nothing in it is worth keeping but its header page (signature, UUID, label), so
//! `mkswap` need not run again after a restore.
//!
//! The signature ("SWAPSPACE2", or the old "SWAP-SPACE") sits in the last 10 bytes of the first
//! page; 4 KiB pages first, then the larger page sizes some architectures use.

use super::{le, Filesystem, FsKind, Part, Probe};
use crate::extents::Extents;
use crate::source::ReadAt;
use anyhow::{bail, Result};

const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];

/// `None` when the signature is absent.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Option<anyhow::Result<Probe>> {
    let part = Part { dev, offset, len };
    for page in PAGE_SIZES {
        if len < page {
            break;
        }
        let mut sig = [0u8; 10];
        if part.read(page - 10, &mut sig, "swap signature").is_err() {
            return None;
        }
        if &sig == b"SWAPSPACE2" || &sig == b"SWAP-SPACE" {
            return Some(map(&part, page, &sig == b"SWAPSPACE2"));
        }
    }
    None
}

fn map(part: &Part, page: u64, v2: bool) -> Result<Probe> {
    let mut h = [0u8; 1024];
    part.read(1024, &mut h, "swap header")?;
    let (size, uuid, label) = if v2 {
        let version = le::u32(&h, 0);
        if version != 1 {
            bail!("swap header at byte 1024: version {version} (expected 1)");
        }
        let last_page = u64::from(le::u32(&h, 4));
        let size = last_page
            .checked_add(1)
            .and_then(|n| n.checked_mul(page))
            .unwrap_or(u64::MAX);
        if size > part.len {
            bail!(
                "swap header at byte 1024: last page {last_page} ({size} bytes of {page}-byte \
                 pages) lies past the end of the partition ({} bytes): truncated?",
                part.len
            );
        }
        let u: [u8; 16] = le::bytes(&h, 12);
        let uuid = (u != [0; 16]).then(|| {
            format!(
                "{}-{}-{}-{}-{}",
                hex::encode(&u[0..4]),
                hex::encode(&u[4..6]),
                hex::encode(&u[6..8]),
                hex::encode(&u[8..10]),
                hex::encode(&u[10..16])
            )
        });
        let l: [u8; 16] = le::bytes(&h, 28);
        let n = l.iter().position(|&b| b == 0).unwrap_or(l.len());
        let label = String::from_utf8_lossy(l.get(..n).unwrap_or_default()).into_owned();
        (size, uuid, (!label.is_empty()).then_some(label))
    } else {
        (part.len / page * page, None, None)
    };
    let mut used = Extents::new();
    used.add(0, page);
    used.add(size, part.len);
    Ok(Probe {
        fs: Filesystem {
            kind: FsKind::Swap,
            uuid,
            label,
            block_size: page as u32,
            size,
            used: used.len(),
        },
        used,
    })
}
