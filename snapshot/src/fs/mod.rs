//! Filesystem probes and used-block maps, each read from the filesystem's own allocation data:
//! ext2/3/4 block bitmaps, the NTFS `$Bitmap`, FAT tables, the XFS free-space btrees; swap holds
//! nothing worth keeping.

pub mod exclude;
pub mod ext;
pub mod fat;
pub mod ntfs;
pub mod swap;
pub mod xfs;

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
    Xfs,
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

/// Little-endian field readers for on-disk structures. Out-of-range offsets read as zero: callers
/// size their buffers for fixed structures and check input-driven offsets with `slice::get` first.
pub(crate) mod le {
    fn get<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = off.checked_add(N).and_then(|end| b.get(off..end)) {
            a.copy_from_slice(s);
        }
        a
    }
    pub fn u16(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(get(b, off))
    }
    pub fn u32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(get(b, off))
    }
    pub fn u64(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(get(b, off))
    }
    pub fn bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        get(b, off)
    }
    pub fn put16(b: &mut [u8], off: usize, v: u16) {
        put(b, off, &v.to_le_bytes())
    }
    pub fn put32(b: &mut [u8], off: usize, v: u32) {
        put(b, off, &v.to_le_bytes())
    }
    pub fn put64(b: &mut [u8], off: usize, v: u64) {
        put(b, off, &v.to_le_bytes())
    }
    /// Writes only when the whole value fits (buffers are sized by the caller).
    pub fn put(b: &mut [u8], off: usize, v: &[u8]) {
        if let Some(s) = off.checked_add(v.len()).and_then(|end| b.get_mut(off..end)) {
            s.copy_from_slice(v);
        }
    }
}

/// Bounded reads inside one partition; errors name the structure and where it was.
pub(crate) struct Part<'a> {
    pub dev: &'a dyn ReadAt,
    pub offset: u64,
    pub len: u64,
}

impl Part<'_> {
    /// Fill `buf` from partition byte `rel`; `what` names the structure for the error.
    pub fn read(&self, rel: u64, buf: &mut [u8], what: &str) -> anyhow::Result<()> {
        let n = buf.len() as u64;
        if rel.checked_add(n).is_none_or(|end| end > self.len) {
            anyhow::bail!(
                "{what} (bytes {rel}..{}) lies past the end of the partition ({} bytes): truncated image?",
                rel.saturating_add(n),
                self.len
            );
        }
        let abs = self
            .offset
            .checked_add(rel)
            .ok_or_else(|| anyhow::anyhow!("{what}: offset overflow"))?;
        self.dev.read_at(buf, abs).map_err(|e| {
            anyhow::anyhow!("reading {what} at partition byte {rel} (disk byte {abs}): {e}")
        })
    }

    /// Read `n` bytes at `rel` into a new buffer.
    pub fn read_vec(&self, rel: u64, n: u64, what: &str) -> anyhow::Result<Vec<u8>> {
        if rel.checked_add(n).is_none_or(|end| end > self.len) {
            anyhow::bail!(
                "{what} (bytes {rel}..{}) lies past the end of the partition ({} bytes): truncated image?",
                rel.saturating_add(n),
                self.len
            );
        }
        let len =
            usize::try_from(n).map_err(|_| anyhow::anyhow!("{what}: {n} bytes is too large"))?;
        let mut v = vec![0u8; len];
        self.read(rel, &mut v, what)?;
        Ok(v)
    }
}

/// Call `emit(start, end)` for every run of set bits (least significant bit first, as ext and
/// NTFS bitmaps are laid out) among the first `nbits` bits of `bitmap`. Works a 64-bit word at a
/// time, so empty and full stretches cost almost nothing.
pub(crate) fn bit_runs(bitmap: &[u8], nbits: u64, mut emit: impl FnMut(u64, u64)) {
    let nbits = nbits.min((bitmap.len() as u64).saturating_mul(8));
    let mut open: Option<u64> = None;
    for (ci, ch) in bitmap.chunks(8).enumerate() {
        let base = ci as u64 * 64;
        if base >= nbits {
            break;
        }
        let mut w = [0u8; 8];
        if let Some(d) = w.get_mut(..ch.len()) {
            d.copy_from_slice(ch);
        }
        let mut word = u64::from_le_bytes(w);
        let valid = (nbits - base).min(64);
        if valid < 64 {
            word &= (1u64 << valid) - 1;
        }
        if word == 0 {
            if let Some(s) = open.take() {
                emit(s, base);
            }
            continue;
        }
        if word == u64::MAX {
            open.get_or_insert(base);
            continue;
        }
        let mut pos = 0u32;
        while pos < 64 {
            let rest = word >> pos;
            if let Some(s) = open {
                pos += (!rest).trailing_zeros().min(64 - pos);
                if pos < 64 {
                    emit(s, base + pos as u64);
                    open = None;
                }
            } else {
                pos += rest.trailing_zeros().min(64 - pos);
                if pos < 64 {
                    open = Some(base + pos as u64);
                }
            }
        }
    }
    if let Some(s) = open {
        emit(s, nbits);
    }
}

/// Sort and merge byte ranges into [`Extents`] (adding in ascending order keeps that linear).
pub(crate) fn extents_from(mut v: Vec<(u64, u64)>) -> Extents {
    v.sort_unstable();
    let mut e = Extents::new();
    for (s, end) in v {
        e.add(s, end);
    }
    e
}

/// The first byte of `[start, end)` that `used` leaves out, and how many bytes it leaves out;
/// `None` when `used` covers it all. Cross-checks of allocation data against the structures a
/// filesystem cannot live without use it.
pub(crate) fn uncovered(used: &Extents, start: u64, end: u64) -> Option<(u64, u64)> {
    let (mut first, mut at, mut missing) = (None, start, 0);
    for (s, e) in used.within(start, end) {
        if s > at {
            first.get_or_insert(at);
            missing += s - at;
        }
        at = at.max(e);
    }
    if at < end {
        first.get_or_insert(at);
        missing += end - at;
    }
    first.map(|f| (f, missing))
}

type ProbeFn = fn(&dyn ReadAt, u64, u64) -> Option<anyhow::Result<Probe>>;

/// Probe the partition at `offset`/`len` of `dev`. Each probe answers `None` when its signature
/// is absent, and an error when the signature is there but the metadata does not hold together.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Found {
    let probes: [(FsKind, ProbeFn); 5] = [
        (FsKind::Ext4, ext::probe),
        (FsKind::Ntfs, ntfs::probe),
        (FsKind::Xfs, xfs::probe),
        (FsKind::Fat32, fat::probe),
        (FsKind::Swap, swap::probe),
    ];
    for (kind, p) in probes {
        match p(dev, offset, len) {
            None => continue,
            Some(Ok(probe)) => return Found::Known(probe),
            Some(Err(e)) => {
                let kind = match kind {
                    FsKind::Ext4 => ext::kind_hint(dev, offset, len),
                    FsKind::Fat32 => fat::kind_hint(dev, offset, len),
                    _ => None,
                }
                .unwrap_or(kind);
                return Found::Damaged {
                    kind,
                    reason: format!("{e:#}"),
                };
            }
        }
    }
    Found::Unknown
}

/// [`probe`], then the files `ex` names (paging, hibernation and swap files) taken out of the
/// used-block map as [`exclude`] says. Returns the outcome, the files excluded, and a note for
/// every file named but kept (or exclusions not applied), one line each.
pub fn probe_excluding(
    dev: &dyn ReadAt,
    offset: u64,
    len: u64,
    ex: &exclude::Exclusions,
) -> (Found, Vec<exclude::Excluded>, Vec<String>) {
    let mut found = probe(dev, offset, len);
    let Found::Known(p) = &mut found else {
        return (found, Vec::new(), Vec::new());
    };
    if ex.paths.is_empty() && !ex.fstab_swap {
        return (found, Vec::new(), Vec::new());
    }
    let files = match p.fs.kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => ext::excluded(dev, offset, len, ex),
        FsKind::Ntfs => ntfs::excluded(dev, offset, len, ex),
        _ => return (found, Vec::new(), Vec::new()),
    };
    let (excluded, notes) = match files {
        Ok(f) => exclude::apply(p, f),
        Err(e) => (
            Vec::new(),
            vec![format!(
                "exclusions not applied (the filesystem kept as mapped): {e:#}"
            )],
        ),
    };
    (found, excluded, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(bm: &[u8], nbits: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for i in 0..nbits.min(bm.len() as u64 * 8) {
            if bm[(i / 8) as usize] >> (i % 8) & 1 == 1 {
                match v.last_mut() {
                    Some(l) if l.1 == i => l.1 = i + 1,
                    _ => v.push((i, i + 1)),
                }
            }
        }
        v
    }

    #[test]
    fn uncovered_finds_the_first_gap() {
        let mut e = Extents::new();
        e.add(10, 20);
        e.add(30, 40);
        assert_eq!(uncovered(&e, 10, 20), None);
        assert_eq!(uncovered(&e, 12, 15), None);
        assert_eq!(uncovered(&e, 5, 20), Some((5, 5)));
        assert_eq!(uncovered(&e, 15, 35), Some((20, 10)));
        assert_eq!(uncovered(&e, 35, 50), Some((40, 10)));
        assert_eq!(uncovered(&Extents::new(), 0, 8), Some((0, 8)));
    }

    #[test]
    fn bit_runs_matches_naive() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 64, 100] {
            for density in 0..4 {
                let bm: Vec<u8> = (0..len)
                    .map(|i| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        match density {
                            0 => seed as u8,
                            1 => 0xff,
                            2 => (seed as u8) & (seed >> 8) as u8,
                            _ => {
                                if i % 10 < 5 {
                                    0xff
                                } else {
                                    0
                                }
                            }
                        }
                    })
                    .collect();
                for nbits in [
                    0u64,
                    1,
                    5,
                    63,
                    64,
                    65,
                    len as u64 * 8,
                    len as u64 * 8 - len.min(1) as u64 * 3,
                ] {
                    let mut got = Vec::new();
                    bit_runs(&bm, nbits, |s, e| got.push((s, e)));
                    assert_eq!(
                        got,
                        naive(&bm, nbits),
                        "len {len} density {density} nbits {nbits}"
                    );
                }
            }
        }
    }
}
