//! A FAT12/16/32 volume for file-level restore: directories read from their cluster chains (the
//! FAT12/16 root from its fixed area), long names from their VFAT entries (checked against the
//! short name's checksum), short names with their lowercase flags, times as the entries store
//! them (local time without a zone: read as UTC), content by the cluster chain.

use super::{fat_entry, layout, Layout};
use crate::fs::{le, FsKind, Part};
use crate::source::ReadAt;
use anyhow::{bail, Result};

const ATTR_DIR: u8 = 0x10;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_LFN: u8 = 0x0F;
/// Largest directory read (a FAT directory holds at most 65,536 entries of 32 bytes).
const MAX_DIR: u64 = 2 << 20;

pub struct FatFiles<'a> {
    part: Part<'a>,
    l: Layout,
    fat: Vec<u8>,
}

/// A file or directory of the volume.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub dir: bool,
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: u64,
    /// First cluster (0: the FAT12/16 root directory, or an empty file).
    first: u32,
    root: bool,
}

impl Node {
    /// Unique within the volume: the first cluster (the root has its own).
    pub fn id(&self) -> u64 {
        if self.root {
            u64::MAX
        } else {
            u64::from(self.first)
        }
    }
}

impl<'a> FatFiles<'a> {
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64) -> Result<FatFiles<'a>> {
        let part = Part { dev, offset, len };
        let mut bs = [0u8; 512];
        part.read(0, &mut bs, "FAT boot sector")?;
        let l = layout(&bs, len)?;
        let fat = part.read_vec(l.fat_start, l.fat_bytes, "file allocation table")?;
        Ok(FatFiles { part, l, fat })
    }

    pub fn root(&self) -> Node {
        Node {
            name: String::new(),
            dir: true,
            size: 0,
            mtime: 0,
            first: if self.l.kind == FsKind::Fat32 {
                self.l.root_cluster
            } else {
                0
            },
            root: true,
        }
    }

    /// The clusters of the chain from `first`, at most `max_bytes` worth.
    fn chain(&self, first: u32, max_bytes: u64, what: &str) -> Result<Vec<u64>> {
        let end = match self.l.kind {
            FsKind::Fat12 => 0xFF8,
            FsKind::Fat16 => 0xFFF8,
            _ => 0x0FFF_FFF8,
        };
        let mut out = Vec::new();
        let mut c = u64::from(first);
        let limit = max_bytes.div_ceil(self.l.cluster).min(self.l.clusters);
        while c != 0 && c < end {
            if c < 2 || c >= self.l.clusters + 2 {
                bail!("{what}: its cluster chain reaches cluster {c}, outside the volume");
            }
            if out.len() as u64 >= limit {
                break;
            }
            out.push(c);
            c = u64::from(fat_entry(&self.fat, self.l.kind, c));
        }
        Ok(out)
    }

    fn cluster_at(&self, c: u64) -> u64 {
        self.l.data_start + (c - 2) * self.l.cluster
    }

    fn dir_bytes(&self, dir: &Node) -> Result<Vec<u8>> {
        let what = format!("directory {:?}", dir.name);
        if dir.root && dir.first == 0 {
            return self
                .part
                .read_vec(self.l.root_start, self.l.root_bytes, "FAT root directory");
        }
        let mut out = Vec::new();
        for c in self.chain(dir.first, MAX_DIR, &what)? {
            out.extend(
                self.part
                    .read_vec(self.cluster_at(c), self.l.cluster, &what)?,
            );
        }
        Ok(out)
    }

    /// The entries of directory `dir`, without `.`, `..` and the volume label.
    pub fn list(&self, dir: &Node) -> Result<Vec<Node>> {
        let bytes = self.dir_bytes(dir)?;
        let mut out = Vec::new();
        let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
        for e in bytes.chunks_exact(32) {
            match e[0] {
                0x00 => break,
                0xE5 => {
                    lfn.clear();
                    continue;
                }
                _ => {}
            }
            let attr = e[11];
            if attr & 0x3F == ATTR_LFN {
                let mut units = [0u16; 13];
                for (i, off) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                    .iter()
                    .enumerate()
                {
                    units[i] = le::u16(e, *off);
                }
                lfn.push((e[13], units));
                continue;
            }
            let long = std::mem::take(&mut lfn);
            if attr & ATTR_VOLUME != 0 {
                continue;
            }
            let short = short_name(e);
            if short == "." || short == ".." {
                continue;
            }
            let sum = e[..11]
                .iter()
                .fold(0u8, |s, &b| s.rotate_right(1).wrapping_add(b));
            let name = if !long.is_empty() && long.iter().all(|(c, _)| *c == sum) {
                let mut units: Vec<u16> = long.iter().rev().flat_map(|(_, u)| *u).collect();
                if let Some(end) = units.iter().position(|&u| u == 0) {
                    units.truncate(end);
                }
                String::from_utf16_lossy(&units)
            } else {
                short
            };
            let first = u32::from(le::u16(e, 0x14)) << 16 | u32::from(le::u16(e, 0x1A));
            out.push(Node {
                name,
                dir: attr & ATTR_DIR != 0,
                size: if attr & ATTR_DIR != 0 {
                    0
                } else {
                    u64::from(le::u32(e, 0x1C))
                },
                mtime: fat_time(le::u16(e, 0x18), le::u16(e, 0x16)),
                first,
                root: false,
            });
        }
        Ok(out)
    }

    /// `name` in directory `dir`, compared case-insensitively.
    pub fn child(&self, dir: &Node, name: &str) -> Result<Option<Node>> {
        let want = name.to_lowercase();
        Ok(self
            .list(dir)?
            .into_iter()
            .find(|n| n.name.to_lowercase() == want))
    }

    /// A reader of file `node`'s content.
    pub fn reader(&self, node: &Node) -> Result<FatReader<'_>> {
        if node.dir {
            bail!("{}: not a regular file", node.name);
        }
        let chain = self.chain(node.first, node.size, &node.name)?;
        if (chain.len() as u64) * self.l.cluster < node.size {
            bail!(
                "{}: its cluster chain holds {} bytes, fewer than its size {}",
                node.name,
                chain.len() as u64 * self.l.cluster,
                node.size
            );
        }
        Ok(FatReader {
            files: self,
            chain,
            size: node.size,
            pos: 0,
            name: node.name.clone(),
        })
    }
}

/// The 8.3 name, lowercased where the entry's flags say (as Windows NT stores `readme.txt`).
fn short_name(e: &[u8]) -> String {
    let mut base = String::from_utf8_lossy(&e[0..8]).trim_end().to_string();
    let mut ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
    if e[0] == 0x05 {
        base.replace_range(0..1, "\u{e5}");
    }
    if e[12] & 0x08 != 0 {
        base = base.to_lowercase();
    }
    if e[12] & 0x10 != 0 {
        ext = ext.to_lowercase();
    }
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// A FAT date and time as seconds since the Unix epoch (read as UTC).
fn fat_time(date: u16, time: u16) -> u64 {
    let (y, m, d) = (
        i64::from(date >> 9) + 1980,
        i64::from((date >> 5) & 0xF).clamp(1, 12),
        i64::from(date & 0x1F).max(1),
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3F) * 60
        + i64::from(time & 0x1F) * 2;
    (days * 86_400 + secs).max(0) as u64
}

/// The content of one file, read cluster by cluster.
pub struct FatReader<'f> {
    files: &'f FatFiles<'f>,
    chain: Vec<u64>,
    size: u64,
    pos: u64,
    name: String,
}

impl std::io::Read for FatReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let cs = self.files.l.cluster;
        let (i, within) = ((self.pos / cs) as usize, self.pos % cs);
        let n = (cs - within)
            .min(self.size - self.pos)
            .min(buf.len() as u64) as usize;
        let at = self.files.cluster_at(self.chain[i]) + within;
        self.files
            .part
            .read(at, &mut buf[..n], &self.name)
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fat_times() {
        // 2017-07-14 02:40:00 UTC is 1500000000.
        let date = (2017 - 1980) << 9 | 7 << 5 | 14;
        let time = 2 << 11 | 40 << 5;
        assert_eq!(super::fat_time(date, time), 1_500_000_000);
    }
}
