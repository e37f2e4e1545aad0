//! NTFS: the used-cluster map from `$Bitmap`.
//!
//! The boot sector gives the geometry and where the MFT starts. MFT record 0 (`$MFT`) gives the
//! MFT's own runlist, through which record 6 (`$Bitmap`) and record 3 (`$Volume`, for the label)
//! are read. Records are checked ("FILE", update-sequence fixups) before use; runlists are decoded
//! with sparse runs and signed LCN deltas, every run checked against the volume. The partition
//! past the last whole cluster (which holds the backup boot sector) is used.
//!
//! `$Bitmap` is cross-checked against the MFT before it is trusted: every cluster an in-use
//! record maps (the system files among them) and the boot sector must be marked used, or the
//! allocation data is damaged and the partition is copied whole.
//!
//! A volume whose `$LogFile` is not clean (Windows was running or crashed) is refused, as ntfs-3g
//! refuses to mount it: the log may hold `$Bitmap` updates the disk does not have yet, so the
//! partition is copied whole.

mod browse;
mod files;
pub use browse::{Node as NtfsNode, NtfsFiles, NtfsReader};

use super::exclude::{self, Exclusions, Hit};
use super::{bit_runs, extents_from, le, uncovered, Filesystem, FsKind, Part, Probe};
use crate::extents::Extents;
use crate::source::ReadAt;
use anyhow::{anyhow, bail, Context, Result};

const AT_VOLUME_NAME: u32 = 0x60;
const AT_DATA: u32 = 0x80;
const AT_ATTRIBUTE_LIST: u32 = 0x20;
const AT_END: u32 = 0xFFFF_FFFF;
const FIXUP_STRIDE: usize = 512;
const LOGFILE_NO_CLIENT: u16 = 0xFFFF;
const RESTART_VOLUME_IS_CLEAN: u16 = 0x0002;
/// Bitmap bytes processed per read.
const BITMAP_CHUNK: u64 = 8 << 20;

/// `None` when the signature is absent.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Option<anyhow::Result<Probe>> {
    let part = Part { dev, offset, len };
    let mut bs = [0u8; 512];
    if len < 512 || part.read(0, &mut bs, "NTFS boot sector").is_err() {
        return None;
    }
    if &bs[3..11] != b"NTFS    " {
        return None;
    }
    Some(map(&part, &bs))
}

/// The files `ex` names on the NTFS volume at `offset` of `dev`, with the structures no
/// exclusion may touch (the boot sector and every cluster of the system files in records 0-15),
/// for [`super::exclude::apply`].
pub(crate) fn excluded(
    dev: &dyn ReadAt,
    offset: u64,
    len: u64,
    ex: &Exclusions,
) -> Result<exclude::Found> {
    let part = Part { dev, offset, len };
    let mut bs = [0u8; 512];
    part.read(0, &mut bs, "NTFS boot sector")?;
    let (vol, clusters, _, _) = Volume::open(&part, &bs)?;
    let c = vol.cluster;
    let mut found = exclude::Found::default();
    let mut critical = vec![(0, c)];
    for r in 0..16u64 {
        let what = format!("MFT record {r}");
        let Ok(rec) = vol.record(r, &what) else {
            continue;
        };
        for a in attributes(&rec, &what)?.iter().filter(|a| a.non_resident) {
            for run in runlist(a, clusters, &what)? {
                if let Some(l) = run.lcn {
                    critical.push((l * c, (l + run.len) * c));
                }
            }
        }
    }
    found.critical = extents_from(critical);
    for path in &ex.paths {
        match vol.file_runs(path, clusters) {
            Ok(Some(runs)) => found.hits.push(Hit {
                path: path.clone(),
                ranges: runs
                    .iter()
                    .filter_map(|r| r.lcn.map(|l| (r.vcn * c, l * c, (l + r.len) * c)))
                    .collect(),
                verified: true,
            }),
            Ok(None) => {}
            Err(e) => found.notes.push(format!("{path} is kept whole: {e:#}")),
        }
    }
    Ok(found)
}

struct Volume<'a> {
    part: &'a Part<'a>,
    cluster: u64,
    record_size: u64,
    /// The MFT's own runlist (from record 0).
    mft_runs: Vec<Run>,
}

/// One run of a runlist: `len` clusters from `vcn`, at `lcn` (`None`: sparse).
#[derive(Debug, Clone, Copy)]
struct Run {
    vcn: u64,
    len: u64,
    lcn: Option<u64>,
}

fn geometry(bs: &[u8; 512], len: u64) -> Result<(u64, u64, u64, u64, u64)> {
    let bps = u64::from(le::u16(bs, 0x0B));
    if !(256..=4096).contains(&bps) || !bps.is_power_of_two() {
        bail!("NTFS boot sector: {bps} bytes per sector is invalid");
    }
    let spc_raw = bs[0x0D];
    let spc = if spc_raw > 0x80 {
        let shift = 256 - u32::from(spc_raw);
        if shift > 20 {
            bail!("NTFS boot sector: sectors-per-cluster code 0x{spc_raw:02x} is invalid");
        }
        1u64 << shift
    } else {
        u64::from(spc_raw)
    };
    if spc == 0 || !spc.is_power_of_two() {
        bail!("NTFS boot sector: {spc} sectors per cluster is invalid");
    }
    let cluster = bps * spc;
    if cluster > 2 << 20 {
        bail!("NTFS boot sector: cluster size {cluster} is above 2 MiB");
    }
    let total_sectors = le::u64(bs, 0x28);
    let size = total_sectors
        .checked_mul(bps)
        .ok_or_else(|| anyhow!("NTFS boot sector: {total_sectors} sectors overflows"))?;
    if size > len {
        bail!(
            "NTFS boot sector: the volume spans {size} bytes ({total_sectors} sectors of {bps}) \
             but the partition holds only {len}: truncated image or wrong partition size"
        );
    }
    let clusters = total_sectors / spc;
    let rec_raw = bs[0x40] as i8;
    let record_size = if rec_raw > 0 {
        u64::from(rec_raw as u8) * cluster
    } else {
        let shift = u32::from(rec_raw.unsigned_abs());
        if !(8..=16).contains(&shift) {
            bail!("NTFS boot sector: MFT record size code {rec_raw} is invalid");
        }
        1u64 << shift
    };
    if !(256..=65536).contains(&record_size) || !record_size.is_power_of_two() {
        bail!("NTFS boot sector: MFT record size {record_size} is invalid");
    }
    let mft_lcn = le::u64(bs, 0x30);
    if mft_lcn >= clusters {
        bail!("NTFS boot sector: MFT cluster {mft_lcn} is past the volume's {clusters} clusters");
    }
    Ok((cluster, clusters, size, record_size, mft_lcn))
}

/// Check the header of an MFT record and undo its update-sequence fixups.
fn fixup(rec: &mut [u8], what: &str) -> Result<()> {
    fixup_as(rec, b"FILE", what)
}

/// [`fixup`] for any multi-sector structure with signature `magic` (index blocks are `INDX`).
fn fixup_as(rec: &mut [u8], magic: &[u8; 4], what: &str) -> Result<()> {
    if rec.get(0..4) != Some(&magic[..]) {
        bail!(
            "{what}: no {} signature (magic {:02x?})",
            String::from_utf8_lossy(magic),
            rec.get(0..4).unwrap_or_default()
        );
    }
    let usa_ofs = usize::from(le::u16(rec, 4));
    let usa_count = usize::from(le::u16(rec, 6));
    let strides = rec.len() / FIXUP_STRIDE;
    if usa_count != strides + 1 || usa_ofs < 0x28 || usa_ofs + 2 * usa_count > rec.len() {
        bail!(
            "{what}: update sequence array (offset {usa_ofs}, {usa_count} entries) does not fit a \
             {}-byte record",
            rec.len()
        );
    }
    let usn: [u8; 2] = le::bytes(rec, usa_ofs);
    for i in 1..usa_count {
        let pos = i * FIXUP_STRIDE - 2;
        let stored: [u8; 2] = le::bytes(rec, pos);
        if stored != usn {
            bail!("{what}: update sequence mismatch at byte {pos} (torn write or damage)");
        }
        let orig: [u8; 2] = le::bytes(rec, usa_ofs + 2 * i);
        le::put(rec, pos, &orig);
    }
    Ok(())
}

/// An attribute found in a record: (type, name length, resident?, bytes).
struct Attr<'a> {
    kind: u32,
    name_len: u8,
    non_resident: bool,
    b: &'a [u8],
}

fn attributes<'a>(rec: &'a [u8], what: &str) -> Result<Vec<Attr<'a>>> {
    let mut out = Vec::new();
    let in_use = (le::u32(rec, 0x18) as usize).min(rec.len());
    let mut pos = usize::from(le::u16(rec, 0x14));
    loop {
        let kind = le::u32(rec, pos);
        if kind == AT_END {
            break;
        }
        let alen = le::u32(rec, pos + 4) as usize;
        let end = pos.checked_add(alen).filter(|&e| e <= in_use);
        let (Some(end), true) = (end, alen >= 0x18 && alen.is_multiple_of(8)) else {
            bail!("{what}: attribute 0x{kind:x} at byte {pos} has a bad length {alen}");
        };
        let b = rec.get(pos..end).unwrap_or_default();
        out.push(Attr {
            kind,
            name_len: b.get(9).copied().unwrap_or(0),
            non_resident: b.get(8).copied().unwrap_or(0) != 0,
            b,
        });
        pos = end;
        if out.len() > 1024 {
            bail!("{what}: too many attributes");
        }
    }
    Ok(out)
}

/// Value of a resident attribute.
fn resident_value<'a>(a: &Attr<'a>, what: &str) -> Result<&'a [u8]> {
    let vlen = le::u32(a.b, 0x10) as usize;
    let voff = usize::from(le::u16(a.b, 0x14));
    a.b.get(voff..voff.saturating_add(vlen)).ok_or_else(|| {
        anyhow!("{what}: resident value ({vlen} bytes at {voff}) overruns its attribute")
    })
}

/// Decode the mapping pairs of a non-resident attribute.
fn runlist(a: &Attr, clusters: u64, what: &str) -> Result<Vec<Run>> {
    let mut vcn = le::u64(a.b, 0x10);
    let mut pos = usize::from(le::u16(a.b, 0x20));
    let mut lcn: i64 = 0;
    let mut runs = Vec::new();
    loop {
        let h =
            *a.b.get(pos)
                .ok_or_else(|| anyhow!("{what}: runlist runs off the end of its attribute"))?;
        if h == 0 {
            break;
        }
        let (ls, os) = (usize::from(h & 0xF), usize::from(h >> 4));
        if ls == 0 || ls > 8 || os > 8 {
            bail!("{what}: runlist header 0x{h:02x} at attribute byte {pos} is invalid");
        }
        let field = |off: usize, n: usize| -> Result<[u8; 8]> {
            let s =
                a.b.get(off..off + n)
                    .ok_or_else(|| anyhow!("{what}: runlist runs off the end of its attribute"))?;
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(s);
            // Sign-extend.
            if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                v[n..].fill(0xFF);
            }
            Ok(v)
        };
        let length = i64::from_le_bytes(field(pos + 1, ls)?);
        if length <= 0 {
            bail!("{what}: run of {length} clusters at VCN {vcn}");
        }
        let length = length as u64;
        let run_lcn = if os == 0 {
            None
        } else {
            let delta = i64::from_le_bytes(field(pos + 1 + ls, os)?);
            lcn = lcn
                .checked_add(delta)
                .filter(|&l| l >= 0)
                .ok_or_else(|| anyhow!("{what}: run at VCN {vcn} has a negative cluster number"))?;
            let l = lcn as u64;
            if l.checked_add(length).is_none_or(|e| e > clusters) {
                bail!(
                    "{what}: run at VCN {vcn} (clusters {l}..+{length}) lies outside the volume's \
                     {clusters} clusters"
                );
            }
            Some(l)
        };
        runs.push(Run {
            vcn,
            len: length,
            lcn: run_lcn,
        });
        vcn = vcn
            .checked_add(length)
            .ok_or_else(|| anyhow!("{what}: VCN overflow"))?;
        pos += 1 + ls + os;
        if runs.len() > 1 << 20 {
            bail!("{what}: runlist too long");
        }
    }
    Ok(runs)
}

impl Volume<'_> {
    /// Read `len` bytes at byte `off` of a stream described by `runs` (sparse runs read as zero).
    fn read_stream(&self, runs: &[Run], off: u64, out: &mut [u8], what: &str) -> Result<()> {
        let mut done = 0usize;
        while done < out.len() {
            let pos = off + done as u64;
            let vcn = pos / self.cluster;
            let run = runs
                .iter()
                .find(|r| r.vcn <= vcn && vcn < r.vcn + r.len)
                .ok_or_else(|| {
                    anyhow!("{what}: byte {pos} of the stream is not mapped by its runlist")
                })?;
            let run_end = (run.vcn + run.len).saturating_mul(self.cluster);
            let n = usize::try_from(run_end - pos)
                .unwrap_or(usize::MAX)
                .min(out.len() - done);
            let dst = &mut out[done..done + n];
            match run.lcn {
                None => dst.fill(0),
                Some(l) => {
                    let at = l * self.cluster + (pos - run.vcn * self.cluster);
                    self.part.read(at, dst, what)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn record(&self, n: u64, what: &str) -> Result<Vec<u8>> {
        let mut rec = vec![0u8; self.record_size as usize];
        self.read_stream(&self.mft_runs, n * self.record_size, &mut rec, what)?;
        fixup(&mut rec, what)?;
        if le::u16(&rec, 0x16) & 1 == 0 {
            bail!("{what}: record is not in use");
        }
        Ok(rec)
    }
}

/// The runlist of the unnamed `$DATA` of a record, with its data size.
fn data_runs(rec: &[u8], clusters: u64, what: &str) -> Result<(Vec<Run>, u64)> {
    let attrs = attributes(rec, what)?;
    let mut runs: Vec<Run> = Vec::new();
    let mut size = None;
    for a in attrs
        .iter()
        .filter(|a| a.kind == AT_DATA && a.name_len == 0)
    {
        if !a.non_resident {
            bail!("{what}: $DATA is resident");
        }
        if le::u64(a.b, 0x10) == 0 {
            size = Some(le::u64(a.b, 0x30).min(le::u64(a.b, 0x38)));
        }
        runs.extend(runlist(a, clusters, what)?);
    }
    let Some(size) = size else {
        if attrs.iter().any(|a| a.kind == AT_ATTRIBUTE_LIST) {
            bail!("{what}: $DATA lives in extension records (attribute list); not supported");
        }
        bail!("{what}: no unnamed $DATA attribute");
    };
    Ok((runs, size))
}

impl<'a> Volume<'a> {
    /// The volume of boot sector `bs`, with the MFT's runlist read from its record 0. Returns the
    /// volume, its cluster count, its size in bytes and the MFT's size.
    fn open(part: &'a Part<'a>, bs: &[u8; 512]) -> Result<(Volume<'a>, u64, u64, u64)> {
        let (cluster, clusters, size, record_size, mft_lcn) = geometry(bs, part.len)?;
        let mut vol = Volume {
            part,
            cluster,
            record_size,
            mft_runs: vec![Run {
                vcn: 0,
                len: record_size.div_ceil(cluster),
                lcn: Some(mft_lcn),
            }],
        };
        let rec0 = vol
            .record(0, &format!("MFT record 0 ($MFT) at cluster {mft_lcn}"))
            .context("NTFS")?;
        let (mft_runs, mft_size) =
            data_runs(&rec0, clusters, "MFT record 0 ($MFT)").context("NTFS")?;
        vol.mft_runs = mft_runs;
        Ok((vol, clusters, size, mft_size))
    }
}

fn map(part: &Part, bs: &[u8; 512]) -> Result<Probe> {
    let (vol, clusters, size, mft_size) = Volume::open(part, bs)?;
    let cluster = vol.cluster;
    let rec2 = vol.record(2, "MFT record 2 ($LogFile)").context("NTFS")?;
    let (log_runs, log_size) =
        data_runs(&rec2, clusters, "MFT record 2 ($LogFile)").context("NTFS")?;
    check_logfile(&vol, &log_runs, log_size).context("NTFS $LogFile")?;
    let rec6 = vol.record(6, "MFT record 6 ($Bitmap)").context("NTFS")?;
    let (bm_runs, bm_size) =
        data_runs(&rec6, clusters, "MFT record 6 ($Bitmap)").context("NTFS")?;
    let bm_bytes = clusters.div_ceil(8);
    if bm_size < bm_bytes {
        bail!(
            "NTFS: $Bitmap holds {bm_size} bytes, too few for {clusters} clusters ({bm_bytes} bytes)"
        );
    }
    let mut used: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    let mut buf = Vec::new();
    while off < bm_bytes {
        let n = (bm_bytes - off).min(BITMAP_CHUNK);
        buf.resize(n as usize, 0);
        vol.read_stream(&bm_runs, off, &mut buf, "NTFS $Bitmap")?;
        let base = off * 8;
        let nbits = (clusters - base).min(n * 8);
        bit_runs(&buf, nbits, |s, e| {
            used.push(((base + s) * cluster, (base + e) * cluster));
        });
        off += n;
    }
    let mut used = extents_from(used);
    check_allocation(&vol, &used, clusters, mft_size).context("NTFS")?;
    // Past the last whole cluster: the rest of the volume and the backup boot sector.
    used.add(clusters * cluster, part.len);
    let label = vol
        .record(3, "MFT record 3 ($Volume)")
        .ok()
        .and_then(|rec| volume_label(&rec));
    Ok(Probe {
        fs: Filesystem {
            kind: FsKind::Ntfs,
            uuid: Some(format!("{:016X}", le::u64(bs, 0x48))),
            label,
            block_size: cluster as u32,
            size,
            used: used.len(),
        },
        used,
    })
}

/// Names of the system files in the first MFT records.
const SYSTEM_FILES: [&str; 12] = [
    "$MFT",
    "$MFTMirr",
    "$LogFile",
    "$Volume",
    "$AttrDef",
    "root directory",
    "$Bitmap",
    "$Boot",
    "$BadClus",
    "$Secure",
    "$UpCase",
    "$Extend",
];

/// MFT bytes read at a time by [`check_allocation`].
const MFT_CHUNK: u64 = 4 << 20;

/// Cross-check `$Bitmap` (as `used`, bytes of the volume) against the MFT: every cluster that an
/// in-use record's non-resident attribute maps (the system files `$MFT`, `$MFTMirr`, `$LogFile`,
/// `$Bitmap`, `$Boot` among them), and the boot sector, must be marked used. A zeroed or partly
/// cleared `$Bitmap` would otherwise drop files from the map silently: it is damage, and the
/// volume is copied whole.
fn check_allocation(vol: &Volume, used: &Extents, clusters: u64, mft_size: u64) -> Result<()> {
    let (c, rs) = (vol.cluster, vol.record_size);
    let records = mft_size / rs;
    let per = (MFT_CHUNK / rs).max(1);
    let mut buf = Vec::new();
    let mut n = 0;
    while n < records {
        let k = per.min(records - n);
        buf.resize((k * rs) as usize, 0);
        vol.read_stream(&vol.mft_runs, n * rs, &mut buf, "$MFT")?;
        for (i, rec) in buf.chunks_exact_mut(rs as usize).enumerate() {
            let r = n + i as u64;
            // Free and never-used records hold nothing that needs clusters.
            if rec.get(0..4) != Some(&b"FILE"[..]) || le::u16(rec, 0x16) & 1 == 0 {
                continue;
            }
            let what = match SYSTEM_FILES.get(r as usize) {
                Some(name) => format!("MFT record {r} ({name})"),
                None => format!("MFT record {r}"),
            };
            fixup(rec, &what)?;
            for a in attributes(rec, &what)?.iter().filter(|a| a.non_resident) {
                for run in runlist(a, clusters, &what)? {
                    let Some(l) = run.lcn else { continue };
                    if let Some((first, missing)) = uncovered(used, l * c, (l + run.len) * c) {
                        bail!(
                            "$Bitmap marks {} of the {} clusters of {what} free (from cluster {}): \
                             the allocation data is damaged",
                            missing.div_ceil(c),
                            run.len,
                            first / c
                        );
                    }
                }
            }
        }
        n += k;
    }
    if uncovered(used, 0, c).is_some() {
        bail!("$Bitmap marks cluster 0 (the boot sector) free: the allocation data is damaged");
    }
    Ok(())
}

fn is_restart_page(p: &[u8]) -> bool {
    matches!(p.get(0..4), Some(b"RSTR") | Some(b"CHKD"))
}

/// Refuse a log that is neither empty nor marked clean (what ntfs-3g checks before mounting).
fn check_logfile(vol: &Volume, runs: &[Run], size: u64) -> Result<()> {
    // The two restart pages: at 0 and at the system page size (4096 when the first is unreadable).
    let mut first = vec![0u8; 4096.min(size) as usize];
    vol.read_stream(runs, 0, &mut first, "$LogFile restart page")?;
    if first.iter().all(|&b| b == 0xFF) {
        return Ok(()); // Empty: freshly formatted or reset by ntfsfix.
    }
    let page_size = match le::u32(&first, 0x10) {
        p @ 512..=65536 if p.is_power_of_two() && is_restart_page(&first) => u64::from(p),
        _ => 4096,
    };
    let mut best: Option<(u64, u16, u16)> = None; // (current LSN, in-use list, flags)
    for off in [0, page_size] {
        if off + page_size > size {
            continue;
        }
        let mut page = vec![0u8; page_size as usize];
        vol.read_stream(runs, off, &mut page, "$LogFile restart page")?;
        if !is_restart_page(&page) || restart_fixup(&mut page).is_err() {
            continue;
        }
        let ra = usize::from(le::u16(&page, 0x18));
        if ra + 16 > page.len() {
            continue;
        }
        let lsn = le::u64(&page, ra);
        if best.is_none_or(|b| lsn >= b.0) {
            best = Some((lsn, le::u16(&page, ra + 12), le::u16(&page, ra + 14)));
        }
    }
    let Some((_, in_use, flags)) = best else {
        bail!("no valid restart page: the log is damaged; copied whole");
    };
    if in_use != LOGFILE_NO_CLIENT && flags & RESTART_VOLUME_IS_CLEAN == 0 {
        bail!(
            "the volume was not cleanly unmounted (Windows was running, crashed or hibernated): \
             its $Bitmap may miss clusters only the log records; copied whole"
        );
    }
    Ok(())
}

/// Update-sequence fixups of a restart page (same scheme as MFT records, other magic).
fn restart_fixup(page: &mut [u8]) -> Result<()> {
    let usa_ofs = usize::from(le::u16(page, 4));
    let usa_count = usize::from(le::u16(page, 6));
    if usa_count != page.len() / FIXUP_STRIDE + 1 || usa_ofs + 2 * usa_count > page.len() {
        bail!("bad update sequence array");
    }
    let usn: [u8; 2] = le::bytes(page, usa_ofs);
    for i in 1..usa_count {
        let pos = i * FIXUP_STRIDE - 2;
        if le::bytes::<2>(page, pos) != usn {
            bail!("update sequence mismatch");
        }
        let orig: [u8; 2] = le::bytes(page, usa_ofs + 2 * i);
        le::put(page, pos, &orig);
    }
    Ok(())
}

fn volume_label(rec: &[u8]) -> Option<String> {
    let attrs = attributes(rec, "$Volume").ok()?;
    let a = attrs
        .iter()
        .find(|a| a.kind == AT_VOLUME_NAME && !a.non_resident)?;
    let v = resident_value(a, "$Volume name").ok()?;
    let units: Vec<u16> = v
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let s = String::from_utf16_lossy(&units);
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr_with_runs(pairs: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x40];
        le::put32(&mut b, 0, AT_DATA);
        b[8] = 1;
        le::put16(&mut b, 0x20, 0x40);
        b.extend_from_slice(pairs);
        b.resize(b.len().div_ceil(8) * 8, 0);
        let n = b.len() as u32;
        le::put32(&mut b, 4, n);
        b
    }

    fn runs(pairs: &[u8], clusters: u64) -> Result<Vec<(u64, u64, Option<u64>)>> {
        let b = attr_with_runs(pairs);
        let a = Attr {
            kind: AT_DATA,
            name_len: 0,
            non_resident: true,
            b: &b,
        };
        Ok(runlist(&a, clusters, "test")?
            .into_iter()
            .map(|r| (r.vcn, r.len, r.lcn))
            .collect())
    }

    #[test]
    fn runlist_sparse_and_negative_deltas() {
        let pairs = [
            0x21, 0x10, 0x00, 0x01, // 16 clusters at 256
            0x11, 0x08, 0xF0, // 8 clusters at 256 - 16 = 240
            0x01, 0x04, // 4 sparse clusters
            0x11, 0x02, 0x20, // 2 clusters at 240 + 32 = 272
            0x00,
        ];
        assert_eq!(
            runs(&pairs, 1000).unwrap(),
            vec![
                (0, 16, Some(256)),
                (16, 8, Some(240)),
                (24, 4, None),
                (28, 2, Some(272))
            ]
        );
        // Outside the volume, negative LCN, truncated, bad header: errors.
        assert!(runs(&pairs, 260).is_err());
        assert!(runs(&[0x11, 0x01, 0x80, 0x00], 1000).is_err());
        assert!(runs(&[0x88, 1, 2, 3, 4, 5, 6, 7], 1000).is_err());
        assert!(runs(&[0x90, 0x00], 1000).is_err());
        assert!(runs(&[0x11, 0x00, 0x05, 0x00], 1000).is_err());
    }

    #[test]
    fn cluster_and_record_size_encodings() {
        let mut bs = [0u8; 512];
        bs[3..11].copy_from_slice(b"NTFS    ");
        le::put16(&mut bs, 0x0B, 512);
        bs[0x0D] = 0xF4; // 2^12 sectors per cluster
        le::put64(&mut bs, 0x28, 1 << 24);
        le::put64(&mut bs, 0x30, 2);
        bs[0x40] = 0xF6; // -10: 1024-byte records
        let (cluster, clusters, size, rec, lcn) = geometry(&bs, 1 << 33).unwrap();
        assert_eq!(
            (cluster, clusters, size, rec, lcn),
            (2 << 20, 4096, 1 << 33, 1024, 2)
        );
        bs[0x0D] = 8;
        bs[0x40] = 1; // one cluster per record
        let (cluster, _, _, rec, _) = geometry(&bs, 1 << 33).unwrap();
        assert_eq!((cluster, rec), (4096, 4096));
        bs[0x40] = 0x80;
        assert!(geometry(&bs, 1 << 33).is_err());
        assert!(geometry(&bs, 1 << 20).is_err());
    }
}
