//! Restoring onto a disk smaller than the source's.
//!
//! **Layout** ([`layout`]): each ext2/3/4 and NTFS filesystem may shrink towards its minimum
//! (estimated from its used data for the plan, measured with `resize2fs -P` and `ntfsresize
//! --info` before anything is written); the space the target has beyond those minimums is shared
//! among them in proportion to what each gives up; the partitions after the first that shrinks
//! move down, packed at 1 MiB boundaries. Partitions before it stay where they were.
//!
//! **Rebuild** ([`Rebuilt`]): before the target is touched, each partition that moves or shrinks
//! is rebuilt from the snapshot's verified chunks in a sparse file of the scratch directory (only
//! its used data takes space), checked and shrunk there by the real tool, its NTFS or FAT boot
//! sector told its new start, and mapped again by its own allocation data. In the data phase it is
//! copied to its new place by that map and read back. XFS cannot shrink: an XFS partition only
//! moves, and a layout that needs it smaller is refused.

use crate::dio::{AlignedBuf, Disk};
use crate::plan::ResizeKind;
use crate::report::bytes;
use crate::resize::run;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use snapshot::fs::{self, Found, FsKind};
use snapshot::ptable::{Partition, PartitionTable};
use snapshot::source::DiskSource;
use snapshot::store::Store;
use snapshot::{reader, ChunkIndex, Extents, Slot, CHUNK_SIZE};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

fn up(v: u64) -> u64 {
    v.div_ceil(MIB) * MIB
}

/// Where one partition goes on the smaller target.
#[derive(Debug, Clone, Serialize)]
pub struct Place {
    pub number: u32,
    pub from_offset: u64,
    pub from_size: u64,
    pub offset: u64,
    pub size: u64,
    /// The tool that shrinks its filesystem (`None`: it moves as it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shrink: Option<ResizeKind>,
    /// The smallest size its filesystem allows: estimated in a plan, measured in a restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
}

impl Place {
    pub fn moved(&self) -> bool {
        self.offset != self.from_offset
    }
    pub fn shrunk(&self) -> bool {
        self.size < self.from_size
    }
}

/// The tool that shrinks the filesystem of `p`, when it can shrink.
pub fn shrinkable(p: &Partition) -> Option<ResizeKind> {
    if p.whole.is_some() || p.md.is_some() || p.lvm.is_some() {
        return None;
    }
    match p.fs.as_ref()?.kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => Some(ResizeKind::Ext),
        FsKind::Ntfs => Some(ResizeKind::Ntfs),
        _ => None,
    }
}

/// The plan's estimate of a shrinkable filesystem's minimum: its used bytes and 5% more (the
/// tools keep room for metadata of what remains), at least 32 MiB more.
pub fn estimate(p: &Partition) -> Option<u64> {
    let used = p.fs.as_ref()?.used;
    shrinkable(p).map(|_| up(used + (used / 20).max(32 * MIB)).min(p.size))
}

/// Bytes a table needs at the disk's end (GPT: the backup entry array and header).
pub fn table_tail(table: &PartitionTable, sector: u32) -> u64 {
    let s = u64::from(sector);
    match table {
        PartitionTable::Gpt(g) => {
            (u64::from(g.entry_count) * u64::from(g.entry_size)).div_ceil(s) * s + s
        }
        _ => 0,
    }
}

/// The end of the space partitions may use on a `target_size`-byte disk with `table`.
pub fn usable_end(table: &PartitionTable, target_size: u64, sector: u32) -> u64 {
    let end = target_size.saturating_sub(table_tail(table, sector)) / MIB * MIB;
    match table {
        PartitionTable::Mbr(_) => end.min((1u64 << 32) * u64::from(sector) / MIB * MIB),
        _ => end,
    }
}

/// The smallest disk that holds a layout whose partitions end at `end`.
pub fn disk_needed(table: &PartitionTable, end: u64, sector: u32) -> u64 {
    up(end + table_tail(table, sector))
}

/// Lay `parts` (sorted by offset) out to end by `end`; `min` gives the minimum of each partition
/// that can shrink. `Err(needed)`: they do not fit even at their minimums, which end at `needed`.
pub fn layout(
    parts: &[Partition],
    end: u64,
    min: impl Fn(&Partition) -> Option<u64>,
) -> std::result::Result<Vec<Place>, u64> {
    let mins: Vec<Option<u64>> = parts
        .iter()
        .map(|p| min(p).map(|m| up(m).min(p.size)))
        .collect();
    if parts.iter().all(|p| p.offset + p.size <= end) {
        // Only the space past the last partition is missing: nothing moves.
        return Ok(parts
            .iter()
            .zip(&mins)
            .map(|(p, m)| Place {
                number: p.number,
                from_offset: p.offset,
                from_size: p.size,
                offset: p.offset,
                size: p.size,
                shrink: None,
                min: *m,
            })
            .collect());
    }
    let first = mins.iter().position(Option::is_some).unwrap_or(0);
    // Offsets for these sizes: unchanged up to the first partition that can shrink, then packed.
    let place = |sizes: &[u64]| -> Vec<u64> {
        let mut offs = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let off = if i <= first {
                p.offset
            } else {
                up(offs[i - 1] + sizes[i - 1]).min(p.offset)
            };
            offs.push(off);
        }
        offs
    };
    let ends = |sizes: &[u64]| {
        let offs = place(sizes);
        offs.iter()
            .zip(sizes)
            .map(|(o, s)| o + s)
            .max()
            .unwrap_or(0)
    };
    let least: Vec<u64> = parts
        .iter()
        .zip(&mins)
        .map(|(p, m)| m.unwrap_or(p.size))
        .collect();
    let needed = ends(&least);
    if needed > end {
        return Err(needed);
    }
    let spare = end - needed;
    let loss: Vec<u64> = parts.iter().zip(&least).map(|(p, l)| p.size - l).collect();
    let total: u64 = loss.iter().sum();
    let sizes: Vec<u64> = parts
        .iter()
        .zip(&least)
        .zip(&loss)
        .map(|((p, &l), &lost)| {
            if spare >= total {
                p.size
            } else {
                let share = (spare as u128 * lost as u128 / total.max(1) as u128) as u64;
                (l + share / MIB * MIB).min(p.size)
            }
        })
        .collect();
    let sizes = if ends(&sizes) <= end { sizes } else { least };
    let offs = place(&sizes);
    Ok(parts
        .iter()
        .enumerate()
        .map(|(i, p)| Place {
            number: p.number,
            from_offset: p.offset,
            from_size: p.size,
            offset: offs[i],
            size: sizes[i],
            shrink: mins[i].and(shrinkable(p)).filter(|_| sizes[i] < p.size),
            min: mins[i],
        })
        .collect())
}

/// A partition rebuilt in the scratch directory; the file is removed when dropped.
pub struct Rebuilt {
    pub disk: u32,
    pub place: Place,
    path: PathBuf,
    file: File,
    /// Byte ranges of the partition (relative) that hold data: the snapshot's slots at first, the
    /// shrunk filesystem's own map after [`Rebuilt::shrink`].
    used: Extents,
    /// What was done, for the summary.
    pub line: String,
}

impl Drop for Rebuilt {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bytes the scratch directory can still take.
pub fn scratch_free(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir)
        .map_err(std::io::Error::from)
        .with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.f_bavail * st.f_frsize)
}

/// Bytes of `index`'s data inside `[off, off + len)`: what rebuilding that range stores.
pub fn data_within(index: &ChunkIndex, off: u64, len: u64) -> u64 {
    index
        .slots()
        .filter(|(_, s)| matches!(s, Slot::Data(_)))
        .map(|(i, _)| {
            let (o, l) = index.span(i);
            (o + l).min(off + len).saturating_sub(o.max(off))
        })
        .sum()
}

impl Rebuilt {
    /// Rebuild partition `p` of disk `disk` from the snapshot in `dir`: its data chunks fetched
    /// (verified) and written at their place, everything else a hole.
    pub fn fetch(
        store: &dyn Store,
        index: &ChunkIndex,
        disk: u32,
        p: &Partition,
        place: Place,
        dir: &Path,
        threads: usize,
    ) -> Result<Rebuilt> {
        let path = dir.join(format!(
            "bmr-shrink-{}-disk{disk}-part{}.img",
            std::process::id(),
            p.number
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut r = Rebuilt {
            disk,
            place,
            path,
            file,
            used: Extents::new(),
            line: String::new(),
        };
        r.file
            .set_len(p.size)
            .with_context(|| format!("sizing {}", r.path.display()))?;
        let (s, e) = (p.offset, p.offset + p.size);
        let inside = |i: usize| {
            let (o, l) = index.span(i);
            o < e && o + l > s
        };
        for (i, slot) in index.slots() {
            if slot != Slot::Unused && inside(i) {
                let (o, l) = index.span(i);
                r.used.add(o.max(s) - s, (o + l).min(e) - s);
            }
        }
        let jobs = reader::plan_fetches(index, inside);
        let (file, path) = (&r.file, &r.path);
        reader::fetch_chunks(store, &jobs, threads, &|slots, data| {
            for &i in slots {
                let (o, l) = index.span(i);
                let (a, b) = (o.max(s), (o + l).min(e));
                file.write_all_at(&data[(a - o) as usize..(b - o) as usize], a - s)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        })
        .with_context(|| {
            format!(
                "disk {disk}: rebuilding partition {} from the snapshot",
                p.number
            )
        })?;
        Ok(r)
    }

    /// The smallest size (bytes) the filesystem can shrink to, by its own tool.
    pub fn measure(&self, kind: ResizeKind, block_size: u32) -> Result<u64> {
        match kind {
            ResizeKind::Ext => {
                self.fsck()?;
                let out = output(Command::new("resize2fs").arg("-P").arg(&self.path))?;
                let blocks = after(&out, "minimum size of the filesystem:")
                    .context("resize2fs -P printed no minimum size")?;
                Ok(blocks * u64::from(block_size))
            }
            ResizeKind::Ntfs => {
                let out = output(
                    Command::new("ntfsresize")
                        .args(["--info", "--force", "--no-progress-bar"])
                        .arg(&self.path),
                )?;
                // The volume keeps one more sector for the backup boot sector; a cluster of room.
                after(&out, "You might resize at")
                    .map(|b| b + 64 * 1024)
                    .context("ntfsresize --info printed no size to resize at")
            }
            _ => bail!("{} does not shrink", kind.tool()),
        }
    }

    fn fsck(&self) -> Result<()> {
        // 0: clean, 1: errors fixed, 2: fixed, reboot advised (a live snapshot's journal replayed).
        run(Command::new("e2fsck").arg("-fp").arg(&self.path), |c| {
            c <= 2
        })
    }

    /// Shrink the filesystem to its planned size, tell a moved boot sector where it starts now
    /// (`sector`-byte sectors), and map the result by its own allocation data.
    pub fn shrink(&mut self, sector: u32) -> Result<()> {
        let pl = self.place.clone();
        let n = pl.number;
        let t0 = std::time::Instant::now();
        if let Some(kind) = pl.shrink {
            let path = &self.path;
            let shrunk = match kind {
                ResizeKind::Ext => self.fsck().and_then(|()| {
                    run(
                        Command::new("resize2fs")
                            .arg(path)
                            .arg(format!("{}K", pl.size / 1024)),
                        |c| c == 0,
                    )
                }),
                ResizeKind::Ntfs => run(
                    Command::new("ntfsresize")
                        .args(["--force", "--no-progress-bar", "--size"])
                        .arg(pl.size.to_string())
                        .arg(path),
                    |c| c == 0,
                ),
                _ => Err(anyhow::anyhow!("{} does not shrink", kind.tool())),
            };
            shrunk.with_context(|| format!("disk {}: shrinking partition {n}", self.disk))?;
            self.file
                .set_len(pl.size)
                .with_context(|| format!("truncating {}", self.path.display()))?;
        }
        if pl.moved() {
            self.set_hidden_sectors(pl.offset / u64::from(sector))?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let dev = DiskSource::open(&self.path)?;
        let what = match (pl.shrink, pl.moved()) {
            (Some(k), true) => format!(
                "shrunk from {} to {} ({}, {secs:.1}s) and moved to {}",
                bytes(pl.from_size),
                bytes(pl.size),
                k.tool(),
                bytes(pl.offset)
            ),
            (Some(k), false) => format!(
                "shrunk from {} to {} ({}, {secs:.1}s)",
                bytes(pl.from_size),
                bytes(pl.size),
                k.tool()
            ),
            (None, _) => format!(
                "moved from {} to {}",
                bytes(pl.from_offset),
                bytes(pl.offset)
            ),
        };
        if pl.shrink.is_some() {
            self.used = match fs::probe(&dev, 0, pl.size) {
                Found::Known(p) => p.used,
                // The tool's result is not ours to guess: copied whole.
                _ => Extents::whole(0, pl.size),
            };
        }
        self.line = format!("partition {n}: {what}");
        Ok(())
    }

    /// NTFS and FAT boot sectors record the partition's first sector ("hidden sectors", offset
    /// 0x1C); Windows' boot loader reads it. NTFS keeps a backup in the partition's last sector,
    /// FAT32 at the sector its BPB names.
    fn set_hidden_sectors(&self, lba: u64) -> Result<()> {
        let mut boot = [0u8; 512];
        self.file
            .read_exact_at(&mut boot, 0)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let ntfs = &boot[3..11] == b"NTFS    ";
        let fat32 = &boot[82..87] == b"FAT32";
        let fat = fat32 || &boot[54..57] == b"FAT";
        if !(ntfs || fat) {
            return Ok(());
        }
        let Ok(lba32) = u32::try_from(lba) else {
            bail!(
                "partition {}: start sector {lba} does not fit its boot sector's 32 bits",
                self.place.number
            );
        };
        let bps = u64::from(u16::from_le_bytes([boot[11], boot[12]])).max(512);
        let mut at = vec![0u64];
        if ntfs {
            // The backup sits in the last sector of the partition.
            let len = self
                .file
                .metadata()
                .with_context(|| format!("reading {}", self.path.display()))?
                .len();
            at.push(len.saturating_sub(bps));
        } else if fat32 {
            at.push(u64::from(u16::from_le_bytes([boot[0x32], boot[0x33]])) * bps);
        }
        for off in at {
            let mut s = [0u8; 512];
            if self.file.read_exact_at(&mut s, off).is_err() || s[3..11] != boot[3..11] {
                continue;
            }
            s[0x1C..0x20].copy_from_slice(&lba32.to_le_bytes());
            self.file
                .write_all_at(&s, off)
                .with_context(|| format!("writing {}", self.path.display()))?;
        }
        Ok(())
    }

    /// Copy the used ranges to their place on `disk`, then read them back and compare.
    pub fn write(&self, disk: &Disk) -> Result<u64> {
        let base = self.place.offset;
        let mut buf = AlignedBuf::new(CHUNK_SIZE as usize + 8192);
        let mut back = AlignedBuf::new(CHUNK_SIZE as usize + 8192);
        let mut written = 0;
        for pass in [false, true] {
            for &(s, e) in self.used.ranges() {
                let mut pos = s;
                while pos < e {
                    let n = (e - pos).min(CHUNK_SIZE);
                    let (ws, wl) = disk.widen(base + pos, n);
                    let rel = ws
                        .checked_sub(base)
                        .context("partition start not aligned")?;
                    let b = &mut buf[..wl as usize];
                    b.fill(0);
                    let have = self.place.size.saturating_sub(rel).min(wl) as usize;
                    self.file
                        .read_exact_at(&mut b[..have], rel)
                        .with_context(|| format!("reading {}", self.path.display()))?;
                    if pass {
                        let t = &mut back[..wl as usize];
                        disk.read_at(t, ws)?;
                        if t != &b[..] {
                            bail!(
                                "partition {}: reading back {} at byte {ws} differs from what was written",
                                self.place.number,
                                bytes(wl)
                            );
                        }
                    } else {
                        disk.write_at(b, ws)?;
                        written += wl;
                    }
                    pos += n;
                }
            }
            if !pass {
                disk.sync()?;
            }
        }
        Ok(written)
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let name = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {name}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .chain(text.lines())
            .map(str::trim)
            .rfind(|l| !l.is_empty());
        bail!("{name} failed: {}", last.unwrap_or(""));
    }
    Ok(text)
}

/// The number after `key` on the line that holds it.
fn after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::fs::Filesystem;

    fn part(number: u32, offset: u64, size: u64, fs: Option<(FsKind, u64)>) -> Partition {
        Partition {
            number,
            offset,
            size,
            fs: fs.map(|(kind, used)| Filesystem {
                kind,
                uuid: None,
                label: None,
                block_size: 4096,
                size,
                used,
            }),
            whole: None,
            excluded: Vec::new(),
            lvm: None,
            md: None,
        }
    }

    const G: u64 = 1 << 30;

    fn disk() -> Vec<Partition> {
        vec![
            part(1, MIB, 256 * MIB, Some((FsKind::Fat32, 10 * MIB))),
            part(2, 257 * MIB, 10 * G, Some((FsKind::Ext4, 2 * G))),
            part(3, 257 * MIB + 10 * G, 9 * G, Some((FsKind::Ntfs, G))),
        ]
    }

    #[test]
    fn shares_the_spare_and_packs_what_follows() {
        let p = disk();
        let end = 8 * G - MIB;
        let l = layout(&p, end, estimate).expect("fits");
        assert_eq!(
            (l[0].offset, l[0].size, l[0].shrink),
            (MIB, 256 * MIB, None)
        );
        assert_eq!(l[1].offset, 257 * MIB);
        assert_eq!(l[1].shrink, Some(ResizeKind::Ext));
        assert_eq!(l[2].offset, l[1].offset + l[1].size);
        assert_eq!(l[2].shrink, Some(ResizeKind::Ntfs));
        assert!(l[1].size > 2 * G && l[2].size > G);
        let last = l[2].offset + l[2].size;
        assert!(last <= end && end - last < 4 * MIB, "{last} vs {end}");
        for pl in &l {
            assert_eq!(pl.offset % MIB, 0);
            assert_eq!(pl.size % MIB, 0);
        }
    }

    #[test]
    fn refuses_with_the_size_needed() {
        let needed = layout(&disk(), 2 * G, estimate).expect_err("too small");
        assert!(needed > 3 * G && needed < 4 * G, "{needed}");
    }

    #[test]
    fn keeps_sizes_when_packing_is_enough() {
        let mut p = disk();
        p[2].offset += 5 * G; // a 5 GiB gap before the last partition
        let l = layout(&p, 20 * G, estimate).expect("fits");
        assert!(l.iter().all(|pl| !pl.shrunk()));
        assert_eq!(l[2].offset, 257 * MIB + 10 * G);
    }

    #[test]
    fn nothing_moves_when_the_partitions_fit() {
        let l = layout(&disk(), 20 * G, estimate).expect("fits");
        assert!(l.iter().all(|pl| !pl.moved() && !pl.shrunk()));
    }

    #[test]
    fn xfs_only_moves() {
        let mut p = disk();
        p[2].fs.as_mut().expect("fs").kind = FsKind::Xfs;
        let l = layout(&p, 12 * G, estimate).expect("fits");
        assert_eq!(l[2].size, 9 * G);
        assert!(l[2].moved() && l[2].shrink.is_none());
        assert!(layout(&p, 9 * G, estimate).is_err());
    }

    #[test]
    fn reads_tool_output() {
        let t = "Estimated minimum size of the filesystem: 18070\n";
        assert_eq!(after(t, "minimum size of the filesystem:"), Some(18070));
        let n = "You might resize at 108531712 bytes or 109 MB (freeing 521 MB).";
        assert_eq!(after(n, "You might resize at"), Some(108531712));
        assert_eq!(after("nothing", "You might resize at"), None);
    }
}
