//! XFS (v5 and v4): the used-block map from every allocation group's free-space B+tree by block
//! number (the bnobt), so the log, the AG headers, inode chunks and every btree count as used.
//!
//! The superblock (sector 0, big-endian) gives the geometry. In each AG the AGF (sector 1) gives
//! the bnobt root and height; the tree is walked depth first, each block checked (magic, level
//! one below its parent, record counts within the block, never visited twice, so a cyclic or
//! shared tree is damage and the walk is bounded by the AG size). Records must be ordered, not
//! overlap and lie inside the AG. The AG is used except for its free extents; the AGFL blocks are
//! not in the bnobt, so they stay used.
//!
//! Cross-checks before the map is trusted: per AG the free extents add up to `agf_freeblks`, the
//! AG header sectors and the bnobt's own blocks are not free; the AG lengths add up to
//! `sb_dblocks`; `sb_fdblocks` equals the AGF counters summed (free + AGFL + btree blocks, as the
//! kernel counts them); the internal log is not free. On any disagreement the partition is copied
//! whole with the reason. A filesystem with an external log device is refused (copied whole): its
//! journal lives on another disk that a snapshot of this partition does not hold.
//!
//! The log must be clean, as the kernel decides at mount: its newest record (the highest LSN of
//! every record header found in the log) must be an unmount record. A filesystem that was not
//! cleanly unmounted (a crash, a crash-consistent snapshot of a running system) may have
//! allocations that only the log holds, whose blocks the on-disk btrees still call free: it is
//! copied whole, as NTFS with a dirty `$LogFile` is.

mod browse;
pub use browse::{Inode as XfsInode, XfsFiles, XfsReader};

use super::{extents_from, uncovered, Filesystem, FsKind, Part, Probe};
use crate::source::ReadAt;
use anyhow::{bail, Context, Result};
use std::collections::HashSet;

const SB_MAGIC: u32 = 0x5846_5342; // "XFSB"
const AGF_MAGIC: u32 = 0x5841_4746; // "XAGF"
const AGFL_MAGIC: u32 = 0x5841_464C; // "XAFL"
const ABTB_MAGIC: u32 = 0x4142_5442; // "ABTB", v4 bnobt block
const ABTB_CRC_MAGIC: u32 = 0x4142_3342; // "AB3B", v5 bnobt block
/// Deeper than any AG btree can be (XFS computes at most 9 for 2^31-block AGs).
const MAX_LEVELS: u32 = 16;
/// `sb_features_incompat`: the metadata UUID differs from `sb_uuid`.
const INCOMPAT_META_UUID: u32 = 1 << 2;

/// Big-endian field readers (XFS is big-endian on disk); out-of-range offsets read as zero.
mod be {
    fn get<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = off.checked_add(N).and_then(|end| b.get(off..end)) {
            a.copy_from_slice(s);
        }
        a
    }
    pub fn u16(b: &[u8], off: usize) -> u16 {
        u16::from_be_bytes(get(b, off))
    }
    pub fn u32(b: &[u8], off: usize) -> u32 {
        u32::from_be_bytes(get(b, off))
    }
    pub fn u64(b: &[u8], off: usize) -> u64 {
        u64::from_be_bytes(get(b, off))
    }
    pub fn bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
        get(b, off)
    }
}

/// `None` when the signature is absent.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Option<Result<Probe>> {
    let part = Part { dev, offset, len };
    let mut sb = [0u8; 512];
    if len < 512 || part.read(0, &mut sb, "XFS superblock").is_err() {
        return None;
    }
    if be::u32(&sb, 0) != SB_MAGIC {
        return None;
    }
    Some(map(&part, &sb).context("XFS"))
}

/// The superblock fields the map needs, checked.
struct Geometry {
    v5: bool,
    bs: u64,
    sect: u64,
    dblocks: u64,
    agblocks: u64,
    agcount: u64,
    agblklog: u32,
    uuid: [u8; 16],
    meta_uuid: [u8; 16],
    logstart: u64,
    logblocks: u64,
    fdblocks: u64,
}

fn geometry(sb: &[u8; 512], len: u64) -> Result<Geometry> {
    let version = be::u16(sb, 100) & 0xf;
    let v5 = match version {
        5 => true,
        4 => false,
        v => bail!("superblock version {v} is not 4 or 5"),
    };
    let bs = u64::from(be::u32(sb, 4));
    let sect = u64::from(be::u16(sb, 102));
    if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
        bail!("superblock block size {bs} is not a power of two from 512 to 65536");
    }
    if !(512..=32768).contains(&sect) || !sect.is_power_of_two() || sect > bs {
        bail!("superblock sector size {sect} is not a power of two from 512 to the block size");
    }
    if u64::from(sb[120]) != u64::from(bs.trailing_zeros()) {
        bail!(
            "superblock blocklog {} disagrees with block size {bs}",
            sb[120]
        );
    }
    let dblocks = be::u64(sb, 8);
    let agblocks = u64::from(be::u32(sb, 84));
    let agcount = u64::from(be::u32(sb, 88));
    let agblklog = u32::from(sb[124]);
    if agblocks < 8 || agcount == 0 || agblklog > 31 || agblocks > 1u64 << agblklog {
        bail!("superblock AG geometry is impossible ({agcount} AGs of {agblocks} blocks, agblklog {agblklog})");
    }
    let span = agblocks * agcount;
    if dblocks == 0 || dblocks > span || dblocks <= span - agblocks {
        bail!("superblock says {dblocks} blocks, which {agcount} AGs of {agblocks} blocks cannot hold");
    }
    let size = dblocks
        .checked_mul(bs)
        .filter(|&s| s <= len)
        .with_context(|| {
            format!("the filesystem ({dblocks} blocks of {bs} bytes) is larger than its partition ({len} bytes): truncated image?")
        })?;
    let _ = size;
    let uuid = be::bytes::<16>(sb, 32);
    let incompat = if v5 { be::u32(sb, 216) } else { 0 };
    let meta_uuid = if incompat & INCOMPAT_META_UUID != 0 {
        be::bytes::<16>(sb, 248)
    } else {
        uuid
    };
    Ok(Geometry {
        v5,
        bs,
        sect,
        dblocks,
        agblocks,
        agcount,
        agblklog,
        uuid,
        meta_uuid,
        logstart: be::u64(sb, 48),
        logblocks: u64::from(be::u32(sb, 96)),
        fdblocks: be::u64(sb, 144),
    })
}

/// What one AG contributed.
struct AgCounts {
    free: u64,
    flcount: u64,
    btreeblks: u64,
}

fn map(part: &Part, sb: &[u8; 512]) -> Result<Probe> {
    let g = geometry(sb, part.len)?;
    if g.logstart == 0 {
        bail!(
            "the log is on an external device (sb_logstart 0): a snapshot of this partition \
             cannot hold it; the partition is copied whole"
        );
    }
    let mut used: Vec<(u64, u64)> = Vec::new();
    let mut free_all: Vec<(u64, u64)> = Vec::new();
    let (mut total, mut sum_fd) = (0u64, 0u64);
    for ag in 0..g.agcount {
        let mut free = Vec::new();
        let c = walk_ag(part, &g, ag, &mut free).with_context(|| format!("AG {ag}"))?;
        sum_fd += c.free + c.flcount + c.btreeblks;
        let base = ag * g.agblocks * g.bs;
        free_all.extend(
            free.iter()
                .map(|&(s, e)| (base + s * g.bs, base + e * g.bs)),
        );
        total += ag_length(&g, ag);
    }
    if total != g.dblocks {
        bail!(
            "the AG lengths add up to {total} blocks, the superblock says {}",
            g.dblocks
        );
    }
    if sum_fd != g.fdblocks {
        bail!(
            "the superblock counts {} free blocks, the AGFs {sum_fd} (free + free list + btree \
             blocks): the counters disagree (not cleanly unmounted?)",
            g.fdblocks
        );
    }
    // Used = the filesystem minus the free extents (which are sorted: AGs in order, each sorted).
    let fs_end = g.dblocks * g.bs;
    let mut at = 0;
    for (s, e) in free_all {
        if s > at {
            used.push((at, s));
        }
        at = e;
    }
    used.push((at, fs_end));
    let mut used = extents_from(used);
    // The internal log.
    let log_ag = g.logstart >> g.agblklog;
    let log_agbno = g.logstart & ((1u64 << g.agblklog) - 1);
    let log_start = log_ag
        .checked_mul(g.agblocks)
        .and_then(|b| b.checked_add(log_agbno))
        .filter(|&b| log_ag < g.agcount && b + g.logblocks <= g.dblocks && g.logblocks > 0)
        .with_context(|| {
            format!(
                "the internal log (block {}, {} blocks) lies outside the filesystem",
                g.logstart, g.logblocks
            )
        })?;
    check_log_clean(part, log_start * g.bs, g.logblocks * g.bs)?;
    if let Some((first, missing)) =
        uncovered(&used, log_start * g.bs, (log_start + g.logblocks) * g.bs)
    {
        bail!(
            "the free-space btree marks {} blocks of the internal log free (from block {}): the \
             allocation data is damaged",
            missing / g.bs,
            first / g.bs
        );
    }
    // Slack past the filesystem.
    used.add(fs_end, part.len);
    Ok(Probe {
        fs: Filesystem {
            kind: FsKind::Xfs,
            uuid: Some(uuid_string(&g.uuid)),
            label: label(sb),
            block_size: g.bs as u32,
            size: fs_end,
            used: used.len(),
        },
        used,
    })
}

const LOG_MAGIC: u32 = 0xFEED_BABE;
const BB: u64 = 512;
/// `oh_flags`: the operation is an unmount record.
const XLOG_UNMOUNT_TRANS: u8 = 0x20;
/// Log bytes read at a time while looking for record headers.
const LOG_CHUNK: u64 = 4 << 20;

/// Refuse a log whose newest record is not an unmount record. Every 512-byte block of the log is
/// looked at; a record header is one with the magic, a known version and an LSN that names its
/// own block.
fn check_log_clean(part: &Part, start: u64, len: u64) -> Result<()> {
    let bbs = len / BB;
    // (lsn, block, version, h_size, num_logops) of the newest header.
    let mut newest: Option<(u64, u64, u32, u32, u32)> = None;
    let mut buf = Vec::new();
    let mut at = 0u64;
    while at < len {
        let n = LOG_CHUNK.min(len - at);
        buf.resize(n as usize, 0);
        part.read(start + at, &mut buf, "XFS log")?;
        for (i, h) in buf.chunks_exact(BB as usize).enumerate() {
            if be::u32(h, 0) != LOG_MAGIC {
                continue;
            }
            let block = at / BB + i as u64;
            let (version, lsn) = (be::u32(h, 8), be::u64(h, 16));
            if !(1..=2).contains(&version) || lsn & 0xFFFF_FFFF != block || lsn >> 32 == 0 {
                continue;
            }
            if newest.is_none_or(|(l, ..)| lsn > l) {
                newest = Some((lsn, block, version, be::u32(h, 320), be::u32(h, 40)));
            }
        }
        at += n;
    }
    let Some((lsn, block, version, h_size, ops)) = newest else {
        bail!("the log holds no record header: it cannot be shown clean; copied whole");
    };
    // The first data block follows the header and, for v2 logs with records over 32 KiB, its
    // extended header blocks.
    let hblks = if version == 2 && h_size > 32 << 10 {
        u64::from(h_size).div_ceil(32 << 10)
    } else {
        1
    };
    let mut op = [0u8; 12];
    part.read(
        start + ((block + hblks) % bbs.max(1)) * BB,
        &mut op,
        "XFS log operation header",
    )?;
    if ops != 1 || op[9] & XLOG_UNMOUNT_TRANS == 0 {
        bail!(
            "the log is not clean (its newest record, cycle {} block {block}, is not an unmount              record): the filesystem was not cleanly unmounted and the log may hold allocations              the free-space btrees do not; copied whole (mount and unmount it, or run              xfs_repair, to map it)",
            lsn >> 32
        );
    }
    Ok(())
}

fn ag_length(g: &Geometry, ag: u64) -> u64 {
    if ag + 1 == g.agcount {
        g.dblocks - ag * g.agblocks
    } else {
        g.agblocks
    }
}

/// Read AG `ag`'s AGF and AGFL, walk its bnobt into `free` (AG block ranges, sorted) and check
/// them against each other.
fn walk_ag(part: &Part, g: &Geometry, ag: u64, free: &mut Vec<(u64, u64)>) -> Result<AgCounts> {
    let base = ag * g.agblocks * g.bs;
    let want_len = ag_length(g, ag);
    let agf = part.read_vec(base + g.sect, g.sect, "AGF")?;
    if be::u32(&agf, 0) != AGF_MAGIC {
        bail!("AGF (sector 1) has no XAGF magic");
    }
    if u64::from(be::u32(&agf, 8)) != ag {
        bail!("AGF says it belongs to AG {}", be::u32(&agf, 8));
    }
    let length = u64::from(be::u32(&agf, 12));
    if length != want_len {
        bail!("AGF length {length} blocks, the superblock geometry gives {want_len}");
    }
    if g.v5 && be::bytes::<16>(&agf, 64) != g.meta_uuid {
        bail!("AGF UUID is not the filesystem's");
    }
    let root = u64::from(be::u32(&agf, 16));
    let levels = be::u32(&agf, 28);
    let flfirst = u64::from(be::u32(&agf, 40));
    let fllast = u64::from(be::u32(&agf, 44));
    let flcount = u64::from(be::u32(&agf, 48));
    let freeblks = u64::from(be::u32(&agf, 52));
    let btreeblks = u64::from(be::u32(&agf, 60));
    if levels == 0 || levels > MAX_LEVELS {
        bail!("AGF free-space btree height {levels} is impossible");
    }
    if root == 0 || root >= length {
        bail!("AGF free-space btree root {root} lies outside the AG ({length} blocks)");
    }

    // The bnobt, depth first, left to right: records come out in block order.
    let hdr = if g.v5 { 56 } else { 16 };
    let magic = if g.v5 { ABTB_CRC_MAGIC } else { ABTB_MAGIC };
    let per_leaf = (g.bs as usize - hdr) / 8;
    let per_node = (g.bs as usize - hdr) / 12;
    let mut seen = HashSet::new();
    let mut tree_blocks = Vec::new();
    let mut stack = vec![(root, levels - 1)];
    let (mut sum, mut at) = (0u64, 0u64);
    while let Some((bno, level)) = stack.pop() {
        if bno == 0 || bno >= length {
            bail!("free-space btree points to block {bno}, outside the AG ({length} blocks)");
        }
        if !seen.insert(bno) {
            bail!("free-space btree reaches block {bno} twice (a cycle or shared block)");
        }
        tree_blocks.push(bno);
        let what = format!("free-space btree block {bno}");
        let b = part.read_vec(base + bno * g.bs, g.bs, &what)?;
        if be::u32(&b, 0) != magic {
            bail!(
                "{what}: magic {:#010x}, expected {magic:#010x}",
                be::u32(&b, 0)
            );
        }
        if u32::from(be::u16(&b, 4)) != level {
            bail!("{what}: level {}, expected {level}", be::u16(&b, 4));
        }
        let n = usize::from(be::u16(&b, 6));
        if level == 0 {
            if n > per_leaf {
                bail!("{what}: {n} records, a block holds at most {per_leaf}");
            }
            for i in 0..n {
                let s = u64::from(be::u32(&b, hdr + 8 * i));
                let c = u64::from(be::u32(&b, hdr + 8 * i + 4));
                if c == 0 || s + c > length {
                    bail!("{what}: free extent {s}+{c} is empty or runs past the AG ({length} blocks)");
                }
                if s < at {
                    bail!("{what}: free extent {s}+{c} is out of order or overlaps the one before");
                }
                at = s + c;
                sum += c;
                match free.last_mut() {
                    Some(l) if l.1 == s => l.1 = s + c,
                    _ => free.push((s, s + c)),
                }
            }
        } else {
            if n == 0 || n > per_node {
                bail!("{what}: {n} pointers, a node holds 1 to {per_node}");
            }
            let ptrs = hdr + 8 * per_node;
            // Pushed in reverse so the leftmost child is walked first.
            for i in (0..n).rev() {
                stack.push((u64::from(be::u32(&b, ptrs + 4 * i)), level - 1));
            }
        }
    }
    if sum != freeblks {
        bail!(
            "the free-space btree holds {sum} free blocks, the AGF says {freeblks}: the \
             allocation data is damaged"
        );
    }
    let used = {
        let mut u = Vec::new();
        let mut at = 0;
        for &(s, e) in free.iter() {
            if s > at {
                u.push((at * g.bs, s * g.bs));
            }
            at = e;
        }
        u.push((at * g.bs, length * g.bs));
        extents_from(u)
    };
    // Superblock, AGF, AGI, AGFL: the first four sectors.
    if uncovered(&used, 0, 4 * g.sect).is_some() {
        bail!(
            "the free-space btree marks the AG header sectors free: the allocation data is damaged"
        );
    }
    for bno in tree_blocks {
        if uncovered(&used, bno * g.bs, (bno + 1) * g.bs).is_some() {
            bail!("the free-space btree marks its own block {bno} free: the allocation data is damaged");
        }
    }
    // The free list: its blocks hold btree blocks-to-be and must not be in the bnobt.
    let agfl = part.read_vec(base + 3 * g.sect, g.sect, "AGFL")?;
    let fl_hdr = if g.v5 {
        if be::u32(&agfl, 0) != AGFL_MAGIC {
            bail!("AGFL (sector 3) has no XAFL magic");
        }
        36
    } else {
        0
    };
    let fl_size = (g.sect as usize - fl_hdr) as u64 / 4;
    if flcount > fl_size || (flcount > 0 && (flfirst >= fl_size || fllast >= fl_size)) {
        bail!("AGF free list ({flcount} blocks from slot {flfirst} to {fllast}) does not fit the AGFL ({fl_size} slots)");
    }
    if flcount > 0 && (fllast + fl_size - flfirst) % fl_size + 1 != flcount {
        bail!("AGF free list slots {flfirst} to {fllast} do not hold {flcount} blocks");
    }
    for k in 0..flcount {
        let slot = ((flfirst + k) % fl_size) as usize;
        let bno = u64::from(be::u32(&agfl, fl_hdr + 4 * slot));
        if bno >= length {
            bail!("AGFL block {bno} lies outside the AG ({length} blocks)");
        }
        if uncovered(&used, bno * g.bs, (bno + 1) * g.bs).is_some() {
            bail!(
                "AGFL block {bno} is also in the free-space btree: the allocation data is damaged"
            );
        }
    }
    Ok(AgCounts {
        free: sum,
        flcount,
        btreeblks,
    })
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn label(sb: &[u8; 512]) -> Option<String> {
    let raw = &sb[108..120];
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]).into_owned();
    (!s.is_empty()).then_some(s)
}
