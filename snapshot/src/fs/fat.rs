//! FAT12/16/32: the used-block map from the allocation table.
//!
//! The FAT type follows Microsoft's rule (count of data clusters: below 4085 FAT12, below 65525
//! FAT16, else FAT32). The reserved sectors, every FAT copy and the FAT12/16 root directory are
//! used; a data cluster is used when its (active) FAT entry is non-zero (FAT32 entries are 28
//! bits). Sectors past the last whole cluster, and the partition past the filesystem, are used.
//!
//! The active FAT is cross-checked first: entry 0 holds the media descriptor, every mirrored
//! copy agrees with it, and the FAT32 root directory's chain is allocated. Otherwise the
//! allocation data is damaged and the filesystem is copied whole.

mod browse;
pub use browse::{FatFiles, FatReader, Node as FatNode};

use super::{extents_from, le, Filesystem, FsKind, Part, Probe};
use crate::source::ReadAt;
use anyhow::{anyhow, bail, Result};

/// `None` when the signature is absent.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Option<anyhow::Result<Probe>> {
    let part = Part { dev, offset, len };
    let mut bs = [0u8; 512];
    if len < 512 || part.read(0, &mut bs, "FAT boot sector").is_err() {
        return None;
    }
    if !is_fat(&bs) {
        return None;
    }
    Some(map(&part, &bs))
}

/// A FAT boot sector: a jump instruction, 0x55AA, not NTFS/exFAT, and either a FAT type string
/// or a BPB that looks like one.
fn is_fat(bs: &[u8; 512]) -> bool {
    let jump = bs[0] == 0xE9 || (bs[0] == 0xEB && bs[2] == 0x90);
    if !jump || bs[510..512] != [0x55, 0xAA] {
        return false;
    }
    let oem = &bs[3..11];
    if oem == b"NTFS    " || oem == b"EXFAT   " || oem == b"FVE-FS  " {
        return false;
    }
    if bs[0x36..0x39] == *b"FAT" || bs[0x52..0x57] == *b"FAT32" {
        return true;
    }
    let bps = le::u16(bs, 0x0B);
    let spc = bs[0x0D];
    matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && le::u16(bs, 0x0E) >= 1
        && matches!(bs[0x10], 1 | 2)
        && (bs[0x15] == 0xF0 || bs[0x15] >= 0xF8)
}

/// Which FAT the boot sector announces (for reporting damage): FAT32 when its 16-bit FAT size is
/// zero, else the type string, else FAT16.
pub(crate) fn kind_hint(dev: &dyn ReadAt, offset: u64, len: u64) -> Option<FsKind> {
    let part = Part { dev, offset, len };
    let mut bs = [0u8; 512];
    part.read(0, &mut bs, "FAT boot sector").ok()?;
    if !is_fat(&bs) {
        return None;
    }
    Some(if le::u16(&bs, 0x16) == 0 {
        FsKind::Fat32
    } else if bs[0x36..0x3B] == *b"FAT12" {
        FsKind::Fat12
    } else {
        FsKind::Fat16
    })
}

struct Layout {
    kind: FsKind,
    cluster: u64,
    /// The active FAT (the one read), and where every copy starts.
    fat_start: u64,
    fats: Vec<u64>,
    /// Whether every copy is kept equal to the active one (all but FAT32 with mirroring off).
    mirrored: bool,
    media: u8,
    fat_bytes: u64,
    root_start: u64,
    root_bytes: u64,
    data_start: u64,
    clusters: u64,
    total_bytes: u64,
    root_cluster: u32,
}

fn layout(bs: &[u8; 512], len: u64) -> Result<Layout> {
    let bps = u64::from(le::u16(bs, 0x0B));
    if !matches!(bps, 512 | 1024 | 2048 | 4096) {
        bail!("FAT boot sector: {bps} bytes per sector is invalid");
    }
    let spc = u64::from(bs[0x0D]);
    if spc == 0 || !spc.is_power_of_two() {
        bail!("FAT boot sector: {spc} sectors per cluster is invalid");
    }
    let rsvd = u64::from(le::u16(bs, 0x0E));
    if rsvd == 0 {
        bail!("FAT boot sector: no reserved sectors");
    }
    let nfats = u64::from(bs[0x10]);
    if nfats == 0 {
        bail!("FAT boot sector: zero FATs");
    }
    let root_entries = u64::from(le::u16(bs, 0x11));
    let ts16 = u64::from(le::u16(bs, 0x13));
    let fatsz16 = u64::from(le::u16(bs, 0x16));
    let ts32 = u64::from(le::u32(bs, 0x20));
    let fatsz = if fatsz16 != 0 {
        fatsz16
    } else {
        u64::from(le::u32(bs, 0x24))
    };
    let totsec = if ts16 != 0 { ts16 } else { ts32 };
    if fatsz == 0 {
        bail!("FAT boot sector: FAT size is zero");
    }
    if totsec == 0 {
        bail!("FAT boot sector: total sector count is zero");
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let meta = rsvd + nfats * fatsz + root_sectors;
    if meta >= totsec {
        bail!(
            "FAT boot sector: reserved sectors, FATs and root directory ({meta} sectors) fill the \
             whole filesystem ({totsec} sectors)"
        );
    }
    let clusters = (totsec - meta) / spc;
    let kind = if clusters < 4085 {
        FsKind::Fat12
    } else if clusters < 65525 {
        FsKind::Fat16
    } else {
        FsKind::Fat32
    };
    if kind == FsKind::Fat32 && (fatsz16 != 0 || root_entries != 0) {
        bail!(
            "FAT boot sector: {clusters} clusters make this FAT32, but the BPB is laid out for \
             FAT12/16 (16-bit FAT size {fatsz16}, {root_entries} root entries)"
        );
    }
    if kind != FsKind::Fat32 && fatsz16 == 0 {
        bail!(
            "FAT boot sector: the BPB is laid out for FAT32, but {clusters} clusters make this \
             {kind:?} by Microsoft's rule; copied whole"
        );
    }
    if root_entries == 0 && kind != FsKind::Fat32 {
        bail!("FAT boot sector: {clusters} clusters make this FAT12/16, but there is no root directory");
    }
    let total_bytes = totsec * bps;
    if total_bytes > len {
        bail!(
            "FAT boot sector: the filesystem spans {total_bytes} bytes but the partition holds \
             only {len}: truncated image or wrong partition size"
        );
    }
    // Entries 0 and 1 are reserved; the table must hold one entry per data cluster after them.
    let needed = match kind {
        FsKind::Fat12 => ((clusters + 2) * 3).div_ceil(2),
        FsKind::Fat16 => (clusters + 2) * 2,
        _ => (clusters + 2) * 4,
    };
    let fat_bytes = fatsz * bps;
    if needed > fat_bytes {
        bail!(
            "FAT boot sector: a FAT of {fat_bytes} bytes cannot describe {clusters} clusters \
             ({needed} bytes needed)"
        );
    }
    let mut active = 0;
    let mut mirrored = true;
    if kind == FsKind::Fat32 {
        let flags = le::u16(bs, 0x28);
        if flags & 0x80 != 0 {
            mirrored = false;
            active = u64::from(flags & 0xF);
            if active >= nfats {
                bail!("FAT32 boot sector: active FAT {active} of {nfats} does not exist");
            }
        }
    }
    Ok(Layout {
        kind,
        cluster: spc * bps,
        fat_start: (rsvd + active * fatsz) * bps,
        fats: (0..nfats).map(|i| (rsvd + i * fatsz) * bps).collect(),
        mirrored,
        media: bs[0x15],
        fat_bytes: needed,
        root_start: (rsvd + nfats * fatsz) * bps,
        root_bytes: root_sectors * bps,
        data_start: meta * bps,
        clusters,
        total_bytes,
        root_cluster: le::u32(bs, 0x2C),
    })
}

/// FAT entry `n` (12, 16 or 28 bits).
fn fat_entry(fat: &[u8], kind: FsKind, n: u64) -> u32 {
    let n = n as usize;
    match kind {
        FsKind::Fat12 => {
            let v = le::u16(fat, n + n / 2);
            u32::from(if n & 1 == 1 { v >> 4 } else { v & 0xFFF })
        }
        FsKind::Fat16 => u32::from(le::u16(fat, 2 * n)),
        _ => le::u32(fat, 4 * n) & 0x0FFF_FFFF,
    }
}

/// The volume label entry of a directory (what blkid reports as LABEL), if any.
fn dir_label(dir: &[u8]) -> Option<Option<String>> {
    for e in dir.chunks_exact(32) {
        match e[0] {
            0x00 => return Some(None),
            0xE5 => continue,
            _ => {}
        }
        let attr = e[11];
        if attr & 0x0F == 0x0F || attr & 0x08 == 0 {
            continue;
        }
        return Some(trim_label(&e[0..11]));
    }
    None
}

fn trim_label(raw: &[u8]) -> Option<String> {
    if raw == b"NO NAME    " {
        return None;
    }
    let s: String = raw.iter().map(|&b| b as char).collect();
    let s = s.trim_end_matches([' ', '\0']).to_string();
    (!s.is_empty()).then_some(s)
}

fn map(part: &Part, bs: &[u8; 512]) -> Result<Probe> {
    let l = layout(bs, part.len)?;
    let fat = part.read_vec(l.fat_start, l.fat_bytes, "file allocation table")?;
    check_fat(part, &l, &fat)?;
    let mut used = vec![(0, l.data_start)];
    let mut run: Option<u64> = None;
    let cluster_off = |c: u64| l.data_start + (c - 2) * l.cluster;
    for c in 2..l.clusters + 2 {
        if fat_entry(&fat, l.kind, c) != 0 {
            run.get_or_insert(c);
        } else if let Some(s) = run.take() {
            used.push((cluster_off(s), cluster_off(c)));
        }
    }
    if let Some(s) = run {
        used.push((cluster_off(s), cluster_off(l.clusters + 2)));
    }
    // Sectors after the last whole cluster, and the partition past the filesystem.
    used.push((cluster_off(l.clusters + 2), part.len));
    let used = extents_from(used);

    let (serial_at, sig_at) = if l.kind == FsKind::Fat32 {
        (0x43, 0x42)
    } else {
        (0x27, 0x26)
    };
    let uuid = matches!(bs[sig_at], 0x28 | 0x29).then(|| {
        let v = le::u32(bs, serial_at);
        format!("{:04X}-{:04X}", v >> 16, v & 0xFFFF)
    });
    let label = if l.kind == FsKind::Fat32 {
        fat32_root_label(part, &l, &fat)
    } else {
        part.read_vec(l.root_start, l.root_bytes, "FAT root directory")
            .ok()
            .and_then(|d| dir_label(&d))
            .flatten()
    };
    Ok(Probe {
        fs: Filesystem {
            kind: l.kind,
            uuid,
            label,
            block_size: u32::try_from(l.cluster)
                .map_err(|_| anyhow!("FAT cluster size {} is too large", l.cluster))?,
            size: l.total_bytes,
            used: used.len(),
        },
        used,
    })
}

/// FAT bytes compared at a time.
const COMPARE_CHUNK: u64 = 8 << 20;

/// Cross-check the active FAT before trusting it: its entry 0 carries the boot sector's media
/// descriptor, every mirrored copy holds the same entries (a zeroed first FAT beside an intact
/// second one would otherwise lose every file), and the FAT32 root directory's cluster chain is
/// allocated. Any disagreement is damage: the filesystem is copied whole.
fn check_fat(part: &Part, l: &Layout, fat: &[u8]) -> Result<()> {
    if l.mirrored {
        // Entries 0 and 1 (media, clean-shutdown flags) may differ between copies.
        let skip: u64 = match l.kind {
            FsKind::Fat12 => 3,
            FsKind::Fat16 => 4,
            _ => 8,
        };
        for (i, &start) in l.fats.iter().enumerate() {
            if start == l.fat_start {
                continue;
            }
            let mut off = skip;
            while off < l.fat_bytes {
                let n = (l.fat_bytes - off).min(COMPARE_CHUNK);
                let other = part.read_vec(start + off, n, &format!("FAT copy {}", i + 1))?;
                let ours = fat
                    .get(off as usize..(off + n) as usize)
                    .unwrap_or_default();
                if let Some(at) = ours.iter().zip(&other).position(|(a, b)| a != b) {
                    bail!(
                        "FAT copy {} differs from the active FAT (first at byte {} of the table): \
                         one of them is damaged",
                        i + 1,
                        off + at as u64
                    );
                }
                off += n;
            }
        }
    }
    let e0 = fat_entry(fat, l.kind, 0);
    if e0 & 0xFF != u32::from(l.media) {
        bail!(
            "FAT entry 0 is 0x{e0:x}, not the media descriptor 0x{:02x} of the boot sector: the \
             file allocation table is damaged",
            l.media
        );
    }
    if l.kind == FsKind::Fat32 {
        let mut c = u64::from(l.root_cluster);
        let mut steps = 0;
        loop {
            if c < 2 || c >= l.clusters + 2 {
                bail!(
                    "FAT32 root directory: cluster {c} lies outside the {} data clusters",
                    l.clusters
                );
            }
            let next = fat_entry(fat, l.kind, c);
            if next == 0 || next == 0x0FFF_FFF7 {
                bail!(
                    "FAT32 root directory: its cluster {c} is {} in the FAT: the file allocation \
                     table is damaged",
                    if next == 0 { "free" } else { "marked bad" }
                );
            }
            if next >= 0x0FFF_FFF8 {
                break;
            }
            steps += 1;
            if steps > l.clusters {
                bail!("FAT32 root directory: its cluster chain loops");
            }
            c = u64::from(next);
        }
    }
    Ok(())
}

/// The FAT32 root directory's volume label, following the cluster chain a little way.
fn fat32_root_label(part: &Part, l: &Layout, fat: &[u8]) -> Option<String> {
    let mut c = u64::from(l.root_cluster);
    for _ in 0..100 {
        if c < 2 || c >= l.clusters + 2 {
            return None;
        }
        let d = part
            .read_vec(
                l.data_start + (c - 2) * l.cluster,
                l.cluster,
                "FAT32 root directory",
            )
            .ok()?;
        if let Some(found) = dir_label(&d) {
            return found;
        }
        c = u64::from(fat_entry(fat, l.kind, c));
    }
    None
}
