//! Independent oracles for checking a copy of a fixture disk: which bytes of each filesystem are
//! in use (from `dumpe2fs`, the FAT read by this module, NTFS `$Bitmap` read with `ntfscat`), the
//! filesystem checkers (`e2fsck -fn`, `fsck.fat -n`, `ntfsfix -n`), and every file's SHA-256
//! after extracting it with the filesystem's own tools (`debugfs rdump`, `mcopy`, `ntfscat`).
//! None of it shares code with the `snapshot` crate it checks.

use crate::fixtures::{FileInfo, Fixture, FsKind};
use crate::util::{exec, extract, find_in_file, sha256_file};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(600);

/// Byte ranges `[start, end)`, sorted and disjoint.
pub type Ranges = Vec<(u64, u64)>;

/// Page size of the swap header kept by `mkswap`; the rest of a swap area is free.
pub const SWAP_HEADER: u64 = 4096;

fn run(cmd: &mut Command) -> Result<crate::util::Output> {
    cmd.env("LC_ALL", "C").env("MTOOLS_SKIP_CHECK", "1");
    let out = exec(cmd, TIMEOUT)?;
    if !out.success() {
        bail!("{}", out.describe());
    }
    Ok(out)
}

/// Merge touching ranges.
pub fn normalize(mut r: Ranges) -> Ranges {
    r.sort();
    let mut out: Ranges = Vec::new();
    for (s, e) in r {
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `[0, len)` minus `r`.
pub fn complement(r: &Ranges, len: u64) -> Ranges {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(s, e) in &normalize(r.clone()) {
        if s > pos {
            out.push((pos, s.min(len)));
        }
        pos = pos.max(e);
    }
    if pos < len {
        out.push((pos, len));
    }
    out.retain(|(s, e)| s < e);
    out
}

pub fn total(r: &Ranges) -> u64 {
    r.iter().map(|(s, e)| e - s).sum()
}

/// Free byte ranges of the filesystem in `img` (relative to its start), by the filesystem's own
/// allocation data. Bytes past the filesystem's end are not free.
pub fn free_ranges(kind: FsKind, img: &Path) -> Result<Ranges> {
    match kind {
        k if k.is_ext() => ext_free(img),
        k if k.is_fat() => fat_free(img),
        FsKind::Ntfs => ntfs_free(img),
        FsKind::Swap => {
            let len = std::fs::metadata(img)?.len();
            Ok(vec![(SWAP_HEADER, len)])
        }
        _ => unreachable!(),
    }
}

/// Bytes of the filesystem in `img` that are in use (its size minus its free ranges).
pub fn used_bytes(kind: FsKind, img: &Path) -> Result<u64> {
    let size = fs_size(kind, img)?;
    Ok(size - total(&free_ranges(kind, img)?).min(size))
}

/// Size in bytes the filesystem spans.
pub fn fs_size(kind: FsKind, img: &Path) -> Result<u64> {
    match kind {
        k if k.is_ext() => {
            let (bs, blocks, _) = dumpe2fs(img, true)?;
            Ok(bs * blocks)
        }
        k if k.is_fat() => Ok(fat_geometry(img)?.total_bytes),
        FsKind::Ntfs => {
            let (cs, clusters) = ntfs_geometry(img)?;
            Ok(cs * clusters)
        }
        _ => Ok(std::fs::metadata(img)?.len()),
    }
}

/// (block size, block count, free ranges in bytes); `header_only` skips the per-group lines.
fn dumpe2fs(img: &Path, header_only: bool) -> Result<(u64, u64, Ranges)> {
    let mut cmd = Command::new("dumpe2fs");
    if header_only {
        cmd.arg("-h");
    }
    let out = run(cmd.arg(img)).context("dumpe2fs")?;
    let field = |name: &str| -> Result<u64> {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("dumpe2fs printed no {name:?}"))
    };
    let bs = field("Block size:")?;
    let blocks = field("Block count:")?;
    let mut free = Vec::new();
    if !header_only {
        for line in out.stdout.lines() {
            // per-group lines are indented; the superblock's "Free blocks:" total is not
            let Some(list) = line.strip_prefix("  Free blocks: ") else {
                continue;
            };
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (a, b) = match item.split_once('-') {
                    Some((a, b)) => (a.parse::<u64>()?, b.parse::<u64>()?),
                    None => (item.parse::<u64>()?, item.parse::<u64>()?),
                };
                free.push((a * bs, (b + 1) * bs));
            }
        }
    }
    Ok((bs, blocks, normalize(free)))
}

fn ext_free(img: &Path) -> Result<Ranges> {
    Ok(dumpe2fs(img, false)?.2)
}

/// FAT geometry from the boot sector.
#[derive(Debug, Clone, Copy)]
pub struct FatGeometry {
    pub bits: u32,
    pub bytes_per_sector: u64,
    pub cluster_bytes: u64,
    pub fat_offset: u64,
    pub fat_bytes: u64,
    pub data_offset: u64,
    pub clusters: u64,
    pub total_bytes: u64,
}

pub fn fat_geometry(img: &Path) -> Result<FatGeometry> {
    fat_geometry_at(img, 0)
}

/// [`fat_geometry`] of the FAT starting at byte `offset` of `img` (a partition of a disk image).
pub fn fat_geometry_at(img: &Path, offset: u64) -> Result<FatGeometry> {
    let f = File::open(img)?;
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, offset)?;
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as u64;
    let bps = u16at(11);
    let spc = b[13] as u64;
    let reserved = u16at(14);
    let nfats = b[16] as u64;
    let root_entries = u16at(17);
    let total = if u16at(19) != 0 { u16at(19) } else { u32at(32) };
    let fatsz = if u16at(22) != 0 { u16at(22) } else { u32at(36) };
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || spc == 0 || nfats == 0 || fatsz == 0 {
        bail!("{}: not a FAT boot sector", img.display());
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let data_start = reserved + nfats * fatsz + root_sectors;
    let clusters = (total - data_start) / spc;
    let bits = if clusters < 4085 {
        12
    } else if clusters < 65525 {
        16
    } else {
        32
    };
    Ok(FatGeometry {
        bits,
        bytes_per_sector: bps,
        cluster_bytes: spc * bps,
        fat_offset: reserved * bps,
        fat_bytes: fatsz * bps,
        data_offset: data_start * bps,
        clusters,
        total_bytes: total * bps,
    })
}

fn fat_free(img: &Path) -> Result<Ranges> {
    let g = fat_geometry(img)?;
    let f = File::open(img)?;
    let mut fat = vec![0u8; g.fat_bytes as usize];
    f.read_exact_at(&mut fat, g.fat_offset)?;
    let mut free = Vec::new();
    for c in 2..g.clusters + 2 {
        let v = match g.bits {
            12 => {
                let o = (c + c / 2) as usize;
                let w = u16::from_le_bytes([fat[o], fat[o + 1]]) as u32;
                if c % 2 == 1 {
                    w >> 4
                } else {
                    w & 0xfff
                }
            }
            16 => u16::from_le_bytes([fat[2 * c as usize], fat[2 * c as usize + 1]]) as u32,
            _ => {
                let o = 4 * c as usize;
                u32::from_le_bytes([fat[o], fat[o + 1], fat[o + 2], fat[o + 3]]) & 0x0fff_ffff
            }
        };
        if v == 0 {
            let s = g.data_offset + (c - 2) * g.cluster_bytes;
            free.push((s, s + g.cluster_bytes));
        }
    }
    Ok(normalize(free))
}

/// (cluster size, cluster count) from the NTFS boot sector.
fn ntfs_geometry(img: &Path) -> Result<(u64, u64)> {
    let f = File::open(img)?;
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 0)?;
    if &b[3..11] != b"NTFS    " {
        bail!("{}: not an NTFS boot sector", img.display());
    }
    let bps = u16::from_le_bytes([b[11], b[12]]) as u64;
    let spc = b[13];
    let sectors_per_cluster = if spc > 0x80 {
        1u64 << (256 - spc as u32)
    } else {
        spc as u64
    };
    let total_sectors = u64::from_le_bytes(b[0x28..0x30].try_into().expect("8 bytes"));
    let cs = bps * sectors_per_cluster;
    Ok((cs, total_sectors * bps / cs))
}

fn ntfs_free(img: &Path) -> Result<Ranges> {
    let (cs, clusters) = ntfs_geometry(img)?;
    let out = run(Command::new("ntfscat").args(["-f", "-i", "6"]).arg(img))
        .context("reading $Bitmap with ntfscat")?;
    let bitmap = out.stdout_bytes;
    if (bitmap.len() as u64) * 8 < clusters {
        bail!(
            "$Bitmap has {} bits for {clusters} clusters",
            bitmap.len() * 8
        );
    }
    let mut free = Vec::new();
    for c in 0..clusters {
        if bitmap[(c / 8) as usize] & (1 << (c % 8)) == 0 {
            free.push((c * cs, (c + 1) * cs));
        }
    }
    Ok(normalize(free))
}

/// Run the filesystem's checker in no-change mode.
pub fn fsck(kind: FsKind, img: &Path) -> Result<()> {
    let r = match kind {
        k if k.is_ext() => run(Command::new("e2fsck").arg("-fn").arg(img)),
        k if k.is_fat() => run(Command::new("fsck.fat").arg("-n").arg(img)),
        FsKind::Ntfs => run(Command::new("ntfsfix").arg("-n").arg(img)),
        _ => return Ok(()),
    };
    r.map(|_| ())
        .with_context(|| format!("{} check failed", kind.name()))
}

/// Extract every file of `files` from the filesystem in `img` with the filesystem's own tools
/// and compare its SHA-256. Returns one line per problem.
pub fn check_files(
    kind: FsKind,
    img: &Path,
    files: &[FileInfo],
    scratch: &Path,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let out_dir = scratch.join("files");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    match kind {
        k if k.is_ext() => {
            run(Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", out_dir.display()))
                .arg(img))
            .context("debugfs rdump")?;
        }
        k if k.is_fat() => {
            run(Command::new("mcopy")
                .args(["-s", "-n", "-m", "-i"])
                .arg(img)
                .arg("::*")
                .arg(&out_dir))
            .context("mcopy -s")?;
        }
        FsKind::Ntfs => {
            for f in files {
                let dest = out_dir.join(&f.path);
                match run(Command::new("ntfscat").arg(img).arg(format!("/{}", f.path))) {
                    Ok(o) => std::fs::write(&dest, &o.stdout_bytes)?,
                    Err(e) => problems.push(format!("{}: ntfscat failed: {e:#}", f.path)),
                }
            }
        }
        _ => return Ok(problems),
    }
    for f in files {
        let p = out_dir.join(&f.path);
        if !p.exists() {
            if !problems.iter().any(|l| l.starts_with(&f.path)) {
                problems.push(format!("{}: missing", f.path));
            }
            continue;
        }
        let sha = sha256_file(&p)?;
        if sha != f.sha256 {
            problems.push(format!(
                "{}: SHA-256 {sha}, expected {} ({} bytes)",
                f.path, f.sha256, f.size
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok(problems)
}

/// What must hold of a read-back copy.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Free blocks of the filesystems must read as zeros (only the deleted file's pattern is
    /// checked; other free blocks were never written).
    pub deleted_absent: bool,
    /// Swap pages after the header must read as zeros.
    pub swap_zeroed: bool,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            deleted_absent: true,
            swap_zeroed: true,
        }
    }
}

/// Compare `copy` (a disk read back from a snapshot) with the fixture `source` image:
/// - bytes outside the data partitions (tables, gaps, free space) identical;
/// - in each filesystem, every byte its allocation data marks used identical;
/// - each filesystem passes its checker on the copy, and every file has its SHA-256;
/// - the deleted file's pattern is gone, swap pages after the header are zeros.
///
/// `Ok(())` or every problem found, one per line.
pub fn compare_disk(
    fx: &Fixture,
    source: &Path,
    copy: &Path,
    scratch: &Path,
    expect: Expect,
) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let mut problems: Vec<String> = Vec::new();
    let copy_len = std::fs::metadata(copy)?.len();
    if copy_len != fx.size {
        problems.push(format!("copy is {copy_len} bytes, the disk {}", fx.size));
    }
    // Ranges (disk offsets) that must be identical, each with a description.
    let mut must: Vec<(u64, u64, String)> = Vec::new();
    let data_parts: Vec<_> = fx.partitions.iter().filter(|p| !p.extended).collect();
    let outside = complement(
        &data_parts
            .iter()
            .map(|p| (p.offset, p.offset + p.size))
            .collect(),
        fx.size,
    );
    for (s, e) in outside {
        must.push((s, e, "outside the partitions".into()));
    }
    for p in &data_parts {
        let Some(kind) = p.fs else {
            must.push((
                p.offset,
                p.offset + p.size,
                format!("partition {} (no filesystem)", p.number),
            ));
            continue;
        };
        let src_part = scratch.join(format!("src-part{}.img", p.number));
        extract(source, p.offset, p.size, &src_part)?;
        let free = free_ranges(kind, &src_part)
            .with_context(|| format!("free blocks of partition {} of the source", p.number))?;
        for (s, e) in complement(&free, p.size) {
            must.push((
                p.offset + s,
                p.offset + e,
                format!("partition {} ({}) used data", p.number, kind.name()),
            ));
        }
        if kind == FsKind::Swap && expect.swap_zeroed {
            let f = File::open(copy)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = SWAP_HEADER;
            while off < p.size {
                let n = ((p.size - off) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], p.offset + off)?;
                if !crate::util::is_zero(&buf[..n]) {
                    let i = buf[..n].iter().position(|&b| b != 0).unwrap_or(0);
                    problems.push(format!(
                        "swap partition {}: non-zero byte at partition offset {} (swap pages must not be stored)",
                        p.number,
                        off + i as u64
                    ));
                    break;
                }
                off += n as u64;
            }
        }
        if let Some(d) = fx.deleted.as_ref().filter(|d| d.partition == p.number) {
            if find_in_file(&src_part, d.marker.as_bytes())?.is_none() {
                problems.push(format!(
                    "fixture problem: the source partition {} no longer holds the deleted file's pattern",
                    p.number
                ));
            }
        }
        let _ = std::fs::remove_file(&src_part);
    }
    problems.extend(compare_ranges(source, copy, &must)?);
    for p in &data_parts {
        let Some(kind) = p.fs else { continue };
        if kind == FsKind::Swap {
            continue;
        }
        let part = scratch.join(format!("copy-part{}.img", p.number));
        extract(copy, p.offset, p.size, &part)?;
        if let Err(e) = fsck(kind, &part) {
            problems.push(format!("partition {} ({}): {e:#}", p.number, kind.name()));
        }
        for line in check_files(kind, &part, &p.files, scratch)? {
            problems.push(format!("partition {} ({}): {line}", p.number, kind.name()));
        }
        let _ = std::fs::remove_file(&part);
    }
    if let (Some(d), true) = (&fx.deleted, expect.deleted_absent) {
        if let Some(off) = find_in_file(copy, d.marker.as_bytes())? {
            problems.push(format!(
                "the deleted file's pattern {:?} is in the copy at disk offset {off}: free blocks were stored",
                d.marker
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )
    }
}

/// Compare `a` and `b` over `ranges` (disk offsets); one line per range with a difference (at
/// most 20), naming its first differing offset.
pub fn compare_ranges(a: &Path, b: &Path, ranges: &[(u64, u64, String)]) -> Result<Vec<String>> {
    let fa = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let fb = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    let mut problems = Vec::new();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for (s, e, what) in ranges {
        let mut off = *s;
        while off < *e {
            let n = ((e - off) as usize).min(ba.len());
            if off + n as u64 > la || off + n as u64 > lb {
                problems.push(format!("{what}: range {s}..{e} is past the end of a file"));
                break;
            }
            fa.read_exact_at(&mut ba[..n], off)?;
            fb.read_exact_at(&mut bb[..n], off)?;
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).expect("a difference");
                let diff = (0..n).filter(|&i| ba[i] != bb[i]).count();
                problems.push(format!(
                    "{what}: differs at disk offset {} ({diff} bytes differ in the MiB from there; source {:#04x}, copy {:#04x})",
                    off + i as u64,
                    ba[i],
                    bb[i]
                ));
                break;
            }
            off += n as u64;
        }
        if problems.len() >= 20 {
            problems.push("(more differences not listed)".into());
            break;
        }
    }
    Ok(problems)
}

/// Write to `dst` what a perfect snapshot of the fixture reads back as: the source image with every
/// free block of its filesystems and every swap page after the header zeroed (a sparse file).
pub fn ideal_copy(fx: &Fixture, dst: &Path, scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    crate::util::sparse_copy(&fx.image, dst)?;
    let out = std::fs::OpenOptions::new().write(true).open(dst)?;
    let zeros = vec![0u8; 1 << 20];
    for p in fx.partitions.iter().filter(|p| !p.extended) {
        let Some(kind) = p.fs else { continue };
        let part = scratch.join(format!("ideal-part{}.img", p.number));
        extract(&fx.image, p.offset, p.size, &part)?;
        for (s, e) in free_ranges(kind, &part)? {
            let mut off = s;
            while off < e {
                let n = ((e - off) as usize).min(zeros.len());
                out.write_all_at(&zeros[..n], p.offset + off)?;
                off += n as u64;
            }
        }
        let _ = std::fs::remove_file(&part);
    }
    out.sync_all()?;
    Ok(())
}

/// Free space of each filesystem (by the source's own allocation data) that does not read as
/// zeros in `copy`: `(partition, non-zero bytes counted in 512-byte sectors, free bytes)` for
/// every ext/FAT/NTFS partition. A snapshot zeroes free blocks, so all counts should be 0.
pub fn free_not_zeroed(
    fx: &Fixture,
    source: &Path,
    copy: &Path,
    scratch: &Path,
) -> Result<Vec<(u32, u64, u64)>> {
    std::fs::create_dir_all(scratch)?;
    let f = File::open(copy).with_context(|| format!("opening {}", copy.display()))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in fx.partitions.iter().filter(|p| !p.extended) {
        let Some(kind) = p.fs.filter(|k| *k != FsKind::Swap) else {
            continue;
        };
        let part = scratch.join(format!("free-part{}.img", p.number));
        extract(source, p.offset, p.size, &part)?;
        let free = free_ranges(kind, &part)?;
        let _ = std::fs::remove_file(&part);
        let mut nonzero = 0u64;
        for &(s, e) in &free {
            let mut off = s;
            while off < e {
                let n = ((e - off) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], p.offset + off)?;
                if !crate::util::is_zero(&buf[..n]) {
                    nonzero += buf[..n]
                        .chunks(512)
                        .filter(|c| !crate::util::is_zero(c))
                        .map(|c| c.len() as u64)
                        .sum::<u64>();
                }
                off += n as u64;
            }
        }
        out.push((p.number, nonzero, total(&free)));
    }
    Ok(out)
}
