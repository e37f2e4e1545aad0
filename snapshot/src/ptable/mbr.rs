//! MBR with extended/logical partitions: parse with every field needed to write the table again,
//! and write it again for a target disk of another size or sector size.
//!
//! The extended chain (types 0x05/0x0f/0x85) is walked with EBR-relative addressing: an EBR's
//! first entry is relative to the EBR itself, its link entry relative to the extended partition's
//! start. Loops, out-of-container EBRs and overlapping partitions are refused.

use super::gpt::chs;
use super::Partition;
use crate::fs::le;
use crate::source::ReadAt;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Most logical partitions we follow before calling the chain a loop.
const MAX_LOGICALS: usize = 256;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mbr {
    pub disk_signature: u32,
    /// Primary entries (including an extended container) and logical partitions.
    pub partitions: Vec<MbrPartition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MbrPartition {
    /// 1-4 primary, 5+ logical (Linux numbering).
    pub number: u32,
    pub bootable: bool,
    /// Partition type byte (0x83 Linux, 0x07 NTFS, 0x0e FAT16 LBA, 0x05/0x0f extended...).
    pub kind: u8,
    pub first_lba: u64,
    pub sectors: u64,
    /// For logical partitions: LBA of the EBR that describes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebr_lba: Option<u64>,
    /// The entry's CHS start and end (6 bytes, hex) when they differ from the standard 255/63
    /// geometry computation, so the table is written back exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chs: Option<String>,
}

impl MbrPartition {
    pub fn is_extended(&self) -> bool {
        is_extended(self.kind)
    }

    fn end(&self) -> u64 {
        self.first_lba.saturating_add(self.sectors)
    }
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// One raw 16-byte entry.
struct Entry {
    status: u8,
    chs: [u8; 6],
    kind: u8,
    start: u32,
    sectors: u32,
}

fn entry(b: &[u8], i: usize) -> Entry {
    let o = 446 + 16 * i;
    let c1: [u8; 3] = le::bytes(b, o + 1);
    let c2: [u8; 3] = le::bytes(b, o + 5);
    Entry {
        status: b.get(o).copied().unwrap_or(0),
        chs: [c1[0], c1[1], c1[2], c2[0], c2[1], c2[2]],
        kind: b.get(o + 4).copied().unwrap_or(0),
        start: le::u32(b, o + 8),
        sectors: le::u32(b, o + 12),
    }
}

/// The raw CHS bytes when they are not what [`chs`] computes for this entry's LBAs.
fn raw_chs(e: &Entry, abs_start: u64) -> Option<String> {
    let end = abs_start + u64::from(e.sectors).saturating_sub(1);
    let mut c = [0u8; 6];
    c[..3].copy_from_slice(&chs(abs_start));
    c[3..].copy_from_slice(&chs(end));
    (c != e.chs).then(|| hex::encode(e.chs))
}

fn encode_entry(
    out: &mut [u8],
    bootable: bool,
    kind: u8,
    abs: u64,
    rel: u64,
    sectors: u64,
    raw: Option<&str>,
) -> Result<()> {
    let start = u32::try_from(rel)
        .map_err(|_| anyhow!("start LBA {rel} does not fit an MBR entry (2 TiB limit)"))?;
    let n = u32::try_from(sectors).map_err(|_| {
        anyhow!("size of {sectors} sectors does not fit an MBR entry (2 TiB limit)")
    })?;
    let mut c = [0u8; 6];
    match raw {
        Some(h) => hex::decode_to_slice(h, &mut c)
            .map_err(|_| anyhow!("chs field {h:?} is not 6 bytes of hex"))?,
        None => {
            c[..3].copy_from_slice(&chs(abs));
            c[3..].copy_from_slice(&chs(abs + sectors.saturating_sub(1)));
        }
    }
    le::put(out, 0, &[if bootable { 0x80 } else { 0 }]);
    le::put(out, 1, &c[..3]);
    le::put(out, 4, &[kind]);
    le::put(out, 5, &c[3..]);
    le::put32(out, 8, start);
    le::put32(out, 12, n);
    Ok(())
}

fn read_sector0(dev: &dyn ReadAt) -> Result<Option<[u8; 512]>> {
    if dev.size() < 512 {
        return Ok(None);
    }
    let mut b = [0u8; 512];
    dev.read_at(&mut b, 0).context("reading sector 0")?;
    Ok(Some(b))
}

fn has_signature(b: &[u8]) -> bool {
    b.get(510..512) == Some(&[0x55, 0xAA][..])
}

/// Whether sector 0 holds a protective (or hybrid) MBR: 0x55AA and an 0xEE entry.
pub fn is_protective(dev: &dyn ReadAt) -> Result<bool> {
    Ok(match read_sector0(dev)? {
        Some(b) => has_signature(&b) && (0..4).any(|i| entry(&b, i).kind == 0xEE),
        None => false,
    })
}

/// A filesystem boot sector rather than a partition table (a disk formatted without one).
fn looks_like_boot_sector(b: &[u8]) -> bool {
    let oem = b.get(3..11).unwrap_or_default();
    oem == b"NTFS    "
        || oem == b"EXFAT   "
        || b.get(0x36..0x39) == Some(&b"FAT"[..])
        || b.get(0x52..0x57) == Some(&b"FAT32"[..])
}

/// Overlap check over `[first, end)` LBA ranges, naming both sides.
fn check_overlaps(items: &mut [(u64, u64, String)]) -> Result<()> {
    items.sort_unstable();
    for w in items.windows(2) {
        if let [a, b] = w {
            if b.0 < a.1 {
                bail!(
                    "MBR {} (LBA {}..{}) and {} (LBA {}..{}) overlap",
                    a.2,
                    a.0,
                    a.1,
                    b.2,
                    b.0,
                    b.1
                );
            }
        }
    }
    Ok(())
}

impl Mbr {
    /// `Ok(None)` when sector 0 has no 0x55AA signature, is a protective MBR, or is a
    /// filesystem's boot sector rather than a partition table.
    pub fn read(dev: &dyn ReadAt, sector: u32) -> Result<Option<Mbr>> {
        if !matches!(sector, 512 | 4096) {
            bail!("unsupported logical sector size {sector} (512 or 4096)");
        }
        let ss = u64::from(sector);
        let disk_lbas = dev.size() / ss;
        let Some(b) = read_sector0(dev)? else {
            return Ok(None);
        };
        if !has_signature(&b) {
            return Ok(None);
        }
        let entries: Vec<Entry> = (0..4).map(|i| entry(&b, i)).collect();
        if entries.iter().any(|e| e.kind == 0xEE) {
            return Ok(None);
        }
        let status_ok = entries.iter().all(|e| e.status == 0 || e.status == 0x80);
        let empty = entries.iter().all(|e| e.sectors == 0);
        if looks_like_boot_sector(&b) && (!status_ok || empty) {
            return Ok(None);
        }
        if !status_ok {
            // Not a partition table (Linux applies the same rule).
            return Ok(None);
        }
        let mut parts = Vec::new();
        let mut ext: Option<(u32, u64, u64)> = None;
        for (i, e) in entries.iter().enumerate() {
            if e.sectors == 0 {
                continue;
            }
            let number = i as u32 + 1;
            let first = u64::from(e.start);
            let end = first + u64::from(e.sectors);
            if first == 0 || end > disk_lbas {
                bail!(
                    "MBR partition {number} (LBA {first}..{end}) lies outside the disk \
                     (sector 0 is the MBR; the disk has {disk_lbas} {sector}-byte sectors)"
                );
            }
            if is_extended(e.kind) {
                if let Some((n, _, _)) = ext {
                    bail!("MBR has two extended partitions ({n} and {number})");
                }
                ext = Some((number, first, end));
            }
            parts.push(MbrPartition {
                number,
                bootable: e.status == 0x80,
                kind: e.kind,
                first_lba: first,
                sectors: u64::from(e.sectors),
                ebr_lba: None,
                chs: raw_chs(e, first),
            });
        }
        let mut primaries: Vec<(u64, u64, String)> = parts
            .iter()
            .map(|p| (p.first_lba, p.end(), format!("partition {}", p.number)))
            .collect();
        check_overlaps(&mut primaries)?;
        if let Some((ext_no, ext_start, ext_end)) = ext {
            let logicals = walk_chain(dev, ss, ext_no, ext_start, ext_end)?;
            let mut within: Vec<(u64, u64, String)> = Vec::new();
            for l in &logicals {
                within.push((l.first_lba, l.end(), format!("partition {}", l.number)));
                if let Some(e) = l.ebr_lba {
                    // An EBR may not sit inside a logical partition.
                    within.push((e, e + 1, format!("EBR of partition {}", l.number)));
                }
            }
            check_overlaps(&mut within)?;
            parts.extend(logicals);
        }
        Ok(Some(Mbr {
            disk_signature: le::u32(&b, 440),
            partitions: parts,
        }))
    }

    pub fn partitions(&self, sector: u32) -> Vec<Partition> {
        let ss = u64::from(sector);
        self.partitions
            .iter()
            .filter(|p| !p.is_extended())
            .map(|p| Partition {
                number: p.number,
                offset: p.first_lba.saturating_mul(ss),
                size: p.sectors.saturating_mul(ss),
                fs: None,
                whole: None,
                excluded: Vec::new(),
                lvm: None,
                md: None,
            })
            .collect()
    }

    fn extended(&self) -> Option<&MbrPartition> {
        self.partitions
            .iter()
            .find(|p| p.number <= 4 && p.is_extended())
    }

    fn logicals(&self) -> Vec<&MbrPartition> {
        let mut l: Vec<&MbrPartition> = self.partitions.iter().filter(|p| p.number > 4).collect();
        l.sort_by_key(|p| p.number);
        l
    }

    /// This table laid out for a target disk of `target_size` bytes with `target_sector`-byte
    /// sectors (the source had `src_sector`). LBAs are converted to target units (an error names
    /// a partition or EBR that is not a whole number of target sectors); with `grow_last` the
    /// partition that ends last (and its extended container, for a logical) grows to the end of
    /// the disk, aligned down to 1 MiB and capped at the 2^32-sector MBR limit. A value that does
    /// not fit 32 bits, or a target too small, is an error naming the size needed.
    pub fn for_target(
        &self,
        src_sector: u32,
        target_size: u64,
        target_sector: u32,
        grow_last: bool,
    ) -> Result<Mbr> {
        for s in [src_sector, target_sector] {
            if !matches!(s, 512 | 4096) {
                bail!("unsupported logical sector size {s} (512 or 4096)");
            }
        }
        let src = u64::from(src_sector);
        let ts = u64::from(target_sector);
        let conv = |lba: u64, what: &str| -> Result<u64> {
            let bytes = lba
                .checked_mul(src)
                .ok_or_else(|| anyhow!("{what}: LBA {lba} overflows"))?;
            if !bytes.is_multiple_of(ts) {
                bail!("{what}: byte offset {bytes} is not a multiple of the target's {ts}-byte sectors");
            }
            Ok(bytes / ts)
        };
        let same = src_sector == target_sector;
        let mut parts = Vec::with_capacity(self.partitions.len());
        for p in &self.partitions {
            let what = format!("MBR partition {} (type 0x{:02x})", p.number, p.kind);
            let first = conv(p.first_lba, &what)?;
            let end = conv(p.end(), &format!("end of {what}"))?;
            let ebr_lba = match p.ebr_lba {
                Some(e) => Some(conv(e, &format!("EBR of {what}"))?),
                None => None,
            };
            parts.push(MbrPartition {
                first_lba: first,
                sectors: end - first,
                ebr_lba,
                chs: if same { p.chs.clone() } else { None },
                ..p.clone()
            });
        }
        let disk_lbas = target_size / ts;
        let max_end = parts.iter().map(MbrPartition::end).max().unwrap_or(1);
        if max_end > disk_lbas {
            let who = parts
                .iter()
                .filter(|p| p.end() == max_end)
                .map(|p| p.number.to_string())
                .collect::<Vec<_>>()
                .join(" and ");
            bail!(
                "the target disk ({target_size} bytes) is too small: MBR partition {who} ends at byte \
                 {}, so at least that many bytes are needed",
                max_end.saturating_mul(ts)
            );
        }
        if grow_last {
            // The entry (primary or extended container) that ends last.
            let limit = disk_lbas.min(1u64 << 32);
            let new_end = (limit * ts) / MIB * MIB / ts;
            // On a tie the extended container wins: growing it is what makes room for its last logical.
            if let Some(top) = parts
                .iter()
                .max_by_key(|p| (p.end(), p.is_extended()))
                .map(|p| p.number)
            {
                let grow = |p: &mut MbrPartition| {
                    if new_end > p.end() {
                        p.sectors = new_end - p.first_lba;
                        p.chs = None;
                    }
                };
                let top_is_ext = parts.iter().any(|p| p.number == top && p.is_extended());
                if top_is_ext {
                    let last_logical = parts
                        .iter()
                        .filter(|p| p.number > 4)
                        .max_by_key(|p| p.end())
                        .map(|p| p.number);
                    for p in parts.iter_mut() {
                        if p.number == top || Some(p.number) == last_logical {
                            grow(p);
                        }
                    }
                } else {
                    for p in parts.iter_mut().filter(|p| p.number == top) {
                        grow(p);
                    }
                }
            }
        }
        for p in &parts {
            if p.first_lba > u64::from(u32::MAX) || p.sectors > u64::from(u32::MAX) {
                bail!(
                    "MBR partition {} (LBA {}, {} sectors) does not fit an MBR on the target \
                     (2^32-sector limit; use GPT)",
                    p.number,
                    p.first_lba,
                    p.sectors
                );
            }
        }
        let m = Mbr {
            disk_signature: self.disk_signature,
            partitions: parts,
        };
        m.to_disk(target_sector).context("MBR for the target")?;
        Ok(m)
    }

    /// Byte patches `(offset, bytes)` that write this table with `sector`-byte sectors: the disk
    /// signature (bytes 440..444) and the four entries plus 0x55AA (446..512) of sector 0, and
    /// for every EBR its two entries plus 0x55AA (bytes 446..512 of the EBR sector).
    pub fn to_disk(&self, sector: u32) -> Result<Vec<(u64, Vec<u8>)>> {
        if !matches!(sector, 512 | 4096) {
            bail!("unsupported logical sector size {sector} (512 or 4096)");
        }
        let ss = u64::from(sector);
        let mut out = Vec::new();
        out.push((440, self.disk_signature.to_le_bytes().to_vec()));
        let mut s0 = [0u8; 66];
        s0[64] = 0x55;
        s0[65] = 0xAA;
        let mut seen = HashSet::new();
        for p in self.partitions.iter().filter(|p| p.number <= 4) {
            if p.number == 0 || !seen.insert(p.number) {
                bail!("MBR partition number {} is invalid or used twice", p.number);
            }
            let i = (p.number - 1) as usize;
            let slot = s0
                .get_mut(16 * i..16 * i + 16)
                .ok_or_else(|| anyhow!("MBR partition {}: no such slot", p.number))?;
            encode_entry(
                slot,
                p.bootable,
                p.kind,
                p.first_lba,
                p.first_lba,
                p.sectors,
                p.chs.as_deref(),
            )
            .with_context(|| format!("MBR partition {}", p.number))?;
        }
        out.push((446, s0.to_vec()));
        let logicals = self.logicals();
        if logicals.is_empty() {
            return Ok(out);
        }
        let ext = self
            .extended()
            .ok_or_else(|| anyhow!("MBR has logical partitions but no extended partition"))?;
        let (ext_start, ext_end) = (ext.first_lba, ext.end());
        // The chain: (EBR LBA, logical it describes). An extended partition whose first EBR
        // describes nothing starts with an empty EBR at its first sector.
        let mut chain: Vec<(u64, Option<&MbrPartition>)> = Vec::new();
        if logicals.first().and_then(|l| l.ebr_lba) != Some(ext_start) {
            chain.push((ext_start, None));
        }
        for l in &logicals {
            let e = l
                .ebr_lba
                .ok_or_else(|| anyhow!("logical partition {} has no EBR position", l.number))?;
            if e < ext_start || e >= l.first_lba || l.end() > ext_end {
                bail!(
                    "logical partition {} (LBA {}..{}, EBR at {e}) does not fit its extended \
                     partition (LBA {ext_start}..{ext_end})",
                    l.number,
                    l.first_lba,
                    l.end()
                );
            }
            if chain.last().is_some_and(|(prev, _)| *prev >= e) {
                bail!(
                    "logical partition {}: EBRs are not in ascending order",
                    l.number
                );
            }
            chain.push((e, Some(l)));
        }
        for (i, (ebr, l)) in chain.iter().enumerate() {
            let mut t = [0u8; 66];
            t[64] = 0x55;
            t[65] = 0xAA;
            if let Some(l) = l {
                encode_entry(
                    &mut t[0..16],
                    l.bootable,
                    l.kind,
                    l.first_lba,
                    l.first_lba - ebr,
                    l.sectors,
                    l.chs.as_deref(),
                )
                .with_context(|| format!("logical partition {}", l.number))?;
            }
            if let Some((next, Some(nl))) = chain.get(i + 1) {
                encode_entry(
                    &mut t[16..32],
                    false,
                    0x05,
                    *next,
                    next - ext_start,
                    nl.end() - next,
                    None,
                )
                .with_context(|| format!("EBR link to logical partition {}", nl.number))?;
            }
            let off = ebr
                .checked_mul(ss)
                .and_then(|o| o.checked_add(446))
                .ok_or_else(|| anyhow!("EBR LBA {ebr} overflows"))?;
            out.push((off, t.to_vec()));
        }
        Ok(out)
    }

    /// Byte ranges holding this table: sector 0 and every EBR sector.
    pub fn table_regions(&self, sector: u32) -> Vec<(u64, u64)> {
        let ss = u64::from(sector);
        // Sector 0: disk signature, entries and boot signature; the boot code before is data.
        let mut v = vec![(440, 512)];
        if let Some(e) = self.extended() {
            v.push((
                e.first_lba.saturating_mul(ss),
                e.first_lba.saturating_add(1).saturating_mul(ss),
            ));
        }
        for l in self.logicals() {
            if let Some(e) = l.ebr_lba {
                v.push((e.saturating_mul(ss), e.saturating_add(1).saturating_mul(ss)));
            }
        }
        super::merge_ranges(v)
    }
}

/// Follow the EBR chain of the extended partition `[ext_start, ext_end)`.
fn walk_chain(
    dev: &dyn ReadAt,
    ss: u64,
    ext_no: u32,
    ext_start: u64,
    ext_end: u64,
) -> Result<Vec<MbrPartition>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut this = ext_start;
    let mut number = 5u32;
    loop {
        if !seen.insert(this) {
            bail!("extended partition {ext_no}: the EBR chain loops back to LBA {this}");
        }
        if seen.len() > MAX_LOGICALS {
            bail!("extended partition {ext_no}: more than {MAX_LOGICALS} EBRs in the chain");
        }
        if this < ext_start || this >= ext_end {
            bail!(
                "extended partition {ext_no}: EBR at LBA {this} lies outside it (LBA {ext_start}..{ext_end})"
            );
        }
        let mut b = [0u8; 512];
        let off = this
            .checked_mul(ss)
            .ok_or_else(|| anyhow!("EBR LBA {this} overflows"))?;
        dev.read_at(&mut b, off)
            .with_context(|| format!("reading the EBR at LBA {this} (byte {off})"))?;
        if !has_signature(&b) {
            if this == ext_start && b.iter().all(|&x| x == 0) {
                // An extended partition with no logical partitions yet.
                break;
            }
            bail!("extended partition {ext_no}: the EBR at LBA {this} has no 0x55AA signature");
        }
        let es: Vec<Entry> = (0..4).map(|i| entry(&b, i)).collect();
        if let Some(d) = es.iter().find(|e| e.sectors != 0 && !is_extended(e.kind)) {
            let first = this
                .checked_add(u64::from(d.start))
                .ok_or_else(|| anyhow!("logical partition {number}: LBA overflows"))?;
            let end = first + u64::from(d.sectors);
            if d.start == 0 || end > ext_end {
                bail!(
                    "logical partition {number} (LBA {first}..{end}, EBR at LBA {this}) lies outside \
                     its extended partition {ext_no} (LBA {ext_start}..{ext_end})"
                );
            }
            out.push(MbrPartition {
                number,
                bootable: d.status == 0x80,
                kind: d.kind,
                first_lba: first,
                sectors: u64::from(d.sectors),
                ebr_lba: Some(this),
                chs: raw_chs(d, first),
            });
            number += 1;
        }
        match es.iter().find(|e| e.sectors != 0 && is_extended(e.kind)) {
            Some(link) => {
                this = ext_start
                    .checked_add(u64::from(link.start))
                    .ok_or_else(|| anyhow!("EBR link LBA overflows"))?;
            }
            None => break,
        }
    }
    Ok(out)
}
