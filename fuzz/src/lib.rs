//! Shared pieces of the fuzz targets (docs/fuzzing.md).
//!
//! Disk-shaped inputs (partition tables, filesystems, qcow2) use a small *sparse image* format so
//! that a seed of a few KiB can stand for a 64 MiB filesystem or a 4 TiB disk: everything not
//! covered by a segment reads as zeros.
//!
//! ```text
//! 0  8  virtual size (u64 LE; clamped to the target's maximum)
//! then, until the input ends, segments:
//!    8  offset (u64 LE)
//!    4  length (u32 LE; cut to what the input still holds)
//!    .. bytes (later segments overlay earlier ones; bytes past the virtual size are dropped)
//! ```

use snapshot::ReadAt;

pub struct Sparse<'a> {
    size: u64,
    segments: Vec<(u64, &'a [u8])>,
}

impl<'a> Sparse<'a> {
    /// Decode `data`; `max_size` bounds the virtual size (what a probe may be asked to scan).
    pub fn parse(data: &'a [u8], max_size: u64) -> Sparse<'a> {
        let mut size = 0;
        let mut segments = Vec::new();
        if data.len() >= 8 {
            size = u64::from_le_bytes(data[..8].try_into().unwrap()).min(max_size);
            let mut rest = &data[8..];
            while rest.len() >= 12 {
                let off = u64::from_le_bytes(rest[..8].try_into().unwrap());
                let len = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
                let len = len.min(rest.len() - 12);
                let bytes = &rest[12..12 + len];
                rest = &rest[12 + len..];
                if off < size {
                    let keep = (size - off).min(bytes.len() as u64) as usize;
                    segments.push((off, &bytes[..keep]));
                }
            }
        }
        Sparse { size, segments }
    }

    /// Encode an image (for the seed generator): `runs` are (offset, bytes).
    pub fn encode(size: u64, runs: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut out = size.to_le_bytes().to_vec();
        for (off, bytes) in runs {
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    /// The image as a flat buffer, when it is small enough to hold (qcow2 writes it to a file).
    pub fn write_to(&self, f: &std::fs::File) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        f.set_len(0)?;
        f.set_len(self.size)?;
        for (off, b) in &self.segments {
            f.write_all_at(b, *off)?;
        }
        Ok(())
    }
}

impl ReadAt for Sparse<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past end")
            })?;
        buf.fill(0);
        for &(off, b) in &self.segments {
            let s_end = off + b.len() as u64;
            let (lo, hi) = (off.max(offset), s_end.min(end));
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&b[(lo - off) as usize..(hi - off) as usize]);
            }
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// Largest virtual size of a filesystem image: big enough for real layouts, small enough that a
/// probe scanning all of its bitmaps stays in the milliseconds.
pub const MAX_FS_SIZE: u64 = 1 << 30;
/// Largest virtual disk for partition tables (they read headers and entry arrays only).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// The checks every filesystem target makes on a probe that succeeded: the used-block map lies
/// inside the partition and the filesystem is no bigger than it.
pub fn check_probe(p: &snapshot::fs::Probe, len: u64) {
    assert!(
        p.fs.size <= len,
        "filesystem of {} bytes in a {len}-byte partition",
        p.fs.size
    );
    let mut last = 0;
    for &(s, e) in p.used.ranges() {
        assert!(s < e && e <= len, "used range {s}..{e} outside 0..{len}");
        assert!(s >= last, "used ranges out of order");
        last = e;
    }
}

/// Run one filesystem probe the way ingest does (`fs::probe`, which falls back to the kind hints
/// on an error, then the exclusions' lookups) and check its result.
pub fn fuzz_fs(
    data: &[u8],
    probe: fn(&dyn ReadAt, u64, u64) -> Option<anyhow::Result<snapshot::fs::Probe>>,
) {
    let img = Sparse::parse(data, MAX_FS_SIZE);
    let len = img.size();
    match probe(&img, 0, len) {
        Some(Ok(p)) => {
            check_probe(&p, len);
            // The exclusions' path lookups (ext inodes/extents/directories, NTFS indexes) on the
            // same hostile bytes: they may only take blocks out of the map.
            let mut ex = snapshot::fs::exclude::Exclusions::default();
            ex.paths.push("/var/lib/swap/file".into());
            let (found, _, _) = snapshot::fs::probe_excluding(&img, 0, len, &ex);
            if let snapshot::fs::Found::Known(q) = found {
                check_probe(&q, len);
                assert!(q.used.len() <= p.used.len(), "exclusions added used bytes");
            }
        }
        Some(Err(e)) => {
            let _ = format!("{e:#}");
            // The kind hint path ingest takes on a damaged filesystem.
            if let snapshot::fs::Found::Known(p) = snapshot::fs::probe(&img, 0, len) {
                check_probe(&p, len);
            }
        }
        None => {}
    }
}

/// Everything a restorer does with a table read from a hostile disk: its partitions (which must
/// lie on the disk), its regions, and the table laid out for targets of the same, a larger and a
/// smaller size and written out. Errors are fine; panics are not.
pub fn exercise_table(t: &snapshot::ptable::PartitionTable, sector: u32, size: u64) {
    for p in t.partitions(sector) {
        assert!(
            p.offset.checked_add(p.size).is_some_and(|e| e <= size),
            "partition {} at {}+{} past the end of a {size}-byte disk",
            p.number,
            p.offset,
            p.size
        );
    }
    let _ = t.table_regions(size, sector);
    let _ = t.to_disk(size, sector);
    for (target, ts) in [
        (size, sector),
        (size.saturating_mul(2), sector),
        (size / 2, sector),
        (size, 4096),
        (size.saturating_add(1 << 20), 512),
    ] {
        for grow in [false, true] {
            if let Ok(n) = t.for_target(sector, target, ts, grow) {
                for p in n.partitions(ts) {
                    assert!(
                        p.offset.checked_add(p.size).is_some_and(|e| e <= target),
                        "laid-out partition {} at {}+{} past the end of a {target}-byte target",
                        p.number,
                        p.offset,
                        p.size
                    );
                }
                let _ = n.table_regions(target, ts);
                let _ = n.to_disk(target, ts);
            }
        }
    }
}
