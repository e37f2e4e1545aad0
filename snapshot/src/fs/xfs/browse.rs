//! An XFS volume (v4 and v5) for file-level restore: inodes found from their numbers (AG, block,
//! slot), directories in every on-disk form (short form in the inode; block, leaf and node
//! directories by their data blocks), file content by the data fork's extents (in the inode or
//! in a block-map btree), unwritten extents and holes as zeros, times with or without `bigtime`.

use super::{be, geometry, Geometry};
use crate::fs::Part;
use crate::source::ReadAt;
use anyhow::{bail, Context, Result};

const INODE_MAGIC: u16 = 0x494E; // "IN"
const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;
const S_IFMT: u16 = 0xF000;
const S_IFREG: u16 = 0x8000;
const S_IFDIR: u16 = 0x4000;
const S_IFLNK: u16 = 0xA000;
/// Directory data lives below this byte offset of the directory (leaf and free index above).
const DIR_LEAF_OFFSET: u64 = 32 << 30;
const BIGTIME_EPOCH_OFFSET: i64 = 1 << 31;
/// Extents of one file before it is refused.
const MAX_EXTENTS: usize = 1 << 20;
/// Largest directory read.
const MAX_DIR: u64 = 256 << 20;

pub struct XfsFiles<'a> {
    part: Part<'a>,
    g: Geometry,
    root: u64,
    inode_size: u64,
    inopblog: u32,
    dir_block: u64,
    ftype: bool,
}

/// An inode as a listing needs it.
#[derive(Clone)]
pub struct Inode {
    pub number: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds since the Unix epoch (0 before it).
    pub mtime: u64,
    format: u8,
    /// The data fork's bytes.
    fork: Vec<u8>,
    nextents: u64,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

/// `len` blocks from file block `off` at filesystem byte `at`.
#[derive(Clone, Copy)]
struct Extent {
    off: u64,
    len: u64,
    at: u64,
    unwritten: bool,
}

impl<'a> XfsFiles<'a> {
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64) -> Result<XfsFiles<'a>> {
        let part = Part { dev, offset, len };
        let mut sb = [0u8; 512];
        part.read(0, &mut sb, "XFS superblock")?;
        if be::u32(&sb, 0) != super::SB_MAGIC {
            bail!("no XFS superblock at byte {offset}");
        }
        let g = geometry(&sb, len)?;
        let inode_size = u64::from(be::u16(&sb, 104));
        let inopblog = u32::from(sb[123]);
        if !(256..=2048).contains(&inode_size) || inopblog > 8 {
            bail!("XFS superblock: inode size {inode_size} or inodes per block log {inopblog} is invalid");
        }
        // v5: the incompat ftype bit; v4: features2's ftype bit.
        let ftype = if g.v5 {
            be::u32(&sb, 216) & 1 != 0
        } else {
            be::u32(&sb, 200) & 0x200 != 0
        };
        Ok(XfsFiles {
            root: be::u64(&sb, 56),
            dir_block: g.bs << sb[192].min(16),
            inode_size,
            inopblog,
            ftype,
            part,
            g,
        })
    }

    pub fn root(&self) -> Result<Inode> {
        self.inode(self.root)
    }

    /// Filesystem block number (AG in the high bits) to a byte offset.
    fn fsb(&self, fsb: u64) -> Result<u64> {
        let ag = fsb >> self.g.agblklog;
        let agb = fsb & ((1u64 << self.g.agblklog) - 1);
        if ag >= self.g.agcount || agb >= self.g.agblocks {
            bail!("block {fsb} (AG {ag}, block {agb}) lies outside the filesystem");
        }
        Ok((ag * self.g.agblocks + agb) * self.g.bs)
    }

    pub fn inode(&self, n: u64) -> Result<Inode> {
        let what = format!("inode {n}");
        let shift = self.g.agblklog + self.inopblog;
        let ag = n >> shift;
        let agb = (n >> self.inopblog) & ((1u64 << self.g.agblklog) - 1);
        let slot = n & ((1u64 << self.inopblog) - 1);
        if ag >= self.g.agcount || agb >= self.g.agblocks {
            bail!("{what} lies outside the filesystem");
        }
        let at = (ag * self.g.agblocks + agb) * self.g.bs + slot * self.inode_size;
        let raw = self.part.read_vec(at, self.inode_size, &what)?;
        if be::u16(&raw, 0) != INODE_MAGIC {
            bail!("{what}: no inode magic (damaged, or not an inode number)");
        }
        let version = raw[4];
        let core = if version >= 3 { 176 } else { 100 };
        let forkoff = usize::from(raw[82]) * 8;
        let fork_len = if forkoff != 0 {
            forkoff
        } else {
            raw.len() - core
        };
        let fork = raw
            .get(core..core + fork_len)
            .with_context(|| format!("{what}: data fork past the inode"))?
            .to_vec();
        let bigtime = version >= 3 && be::u64(&raw, 120) & (1 << 3) != 0;
        let mtime = if bigtime {
            (be::u64(&raw, 40) / 1_000_000_000) as i64 - BIGTIME_EPOCH_OFFSET
        } else {
            i64::from(be::u32(&raw, 40) as i32)
        };
        Ok(Inode {
            number: n,
            mode: be::u16(&raw, 2),
            uid: be::u32(&raw, 8),
            gid: be::u32(&raw, 12),
            size: be::u64(&raw, 56),
            mtime: mtime.max(0) as u64,
            format: raw[5],
            nextents: u64::from(be::u32(&raw, 76)),
            fork,
        })
    }

    /// The data fork's extents, in file order.
    fn extents(&self, ino: &Inode) -> Result<Vec<Extent>> {
        let what = format!("inode {}", ino.number);
        let mut out = Vec::new();
        match ino.format {
            FMT_EXTENTS => {
                let n = ino.nextents as usize;
                if n * 16 > ino.fork.len() {
                    bail!("{what}: {n} extents do not fit its data fork");
                }
                self.records(&ino.fork[..n * 16], &mut out, &what)?;
            }
            FMT_BTREE => {
                let level = be::u16(&ino.fork, 0);
                let nrecs = usize::from(be::u16(&ino.fork, 2));
                let maxrecs = (ino.fork.len() - 4) / 16;
                if level == 0 || nrecs > maxrecs {
                    bail!("{what}: block map root is damaged");
                }
                for i in 0..nrecs {
                    let ptr = be::u64(&ino.fork, 4 + maxrecs * 8 + i * 8);
                    self.bmbt(ptr, level - 1, &mut out, &what)?;
                }
            }
            FMT_LOCAL => {}
            f => bail!("{what}: data fork format {f} is not read"),
        }
        out.sort_by_key(|e| e.off);
        Ok(out)
    }

    fn bmbt(&self, fsb: u64, level: u16, out: &mut Vec<Extent>, what: &str) -> Result<()> {
        let block = self.part.read_vec(self.fsb(fsb)?, self.g.bs, what)?;
        let hdr = if self.g.v5 { 72 } else { 24 };
        if be::u16(&block, 4) != level {
            bail!("{what}: block map block {fsb} is at the wrong level");
        }
        let nrecs = usize::from(be::u16(&block, 6));
        let maxrecs = (block.len() - hdr) / 16;
        if nrecs > maxrecs {
            bail!("{what}: block map block {fsb} claims {nrecs} records");
        }
        if level == 0 {
            return self.records(&block[hdr..hdr + nrecs * 16], out, what);
        }
        for i in 0..nrecs {
            let ptr = be::u64(&block, hdr + maxrecs * 8 + i * 8);
            self.bmbt(ptr, level - 1, out, what)?;
        }
        Ok(())
    }

    fn records(&self, raw: &[u8], out: &mut Vec<Extent>, what: &str) -> Result<()> {
        for r in raw.chunks_exact(16) {
            let (hi, lo) = (be::u64(r, 0), be::u64(r, 8));
            let len = lo & ((1 << 21) - 1);
            let start = (hi & ((1 << 9) - 1)) << 43 | lo >> 21;
            if len == 0 {
                continue;
            }
            if out.len() >= MAX_EXTENTS {
                bail!("{what}: more than {MAX_EXTENTS} extents");
            }
            out.push(Extent {
                off: (hi >> 9) & ((1 << 54) - 1),
                len,
                at: self.fsb(start)?,
                unwritten: hi >> 63 != 0,
            });
        }
        Ok(())
    }

    /// Bytes `[off, off + buf.len())` of the file with `exts` (holes, unwritten: zeros).
    fn read_file(&self, exts: &[Extent], off: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let bs = self.g.bs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let b = pos / bs;
            let i = exts.partition_point(|e| e.off + e.len <= b);
            let (n, src) = match exts.get(i) {
                Some(e) if e.off <= b => {
                    let end = (e.off + e.len) * bs;
                    let n = ((end - pos) as usize).min(buf.len() - done);
                    (n, (!e.unwritten).then(|| e.at + (pos - e.off * bs)))
                }
                next => {
                    let end = next.map_or(u64::MAX, |e| e.off * bs);
                    (((end - pos) as usize).min(buf.len() - done), None)
                }
            };
            match src {
                Some(at) => self.part.read(at, &mut buf[done..done + n], what)?,
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// The entries of directory `dir` but `.` and `..`: (name, inode number).
    pub fn entries(&self, dir: &Inode) -> Result<Vec<(Vec<u8>, u64)>> {
        let what = format!("directory inode {}", dir.number);
        if !dir.is_dir() {
            bail!("{what}: not a directory");
        }
        let mut out = Vec::new();
        if dir.format == FMT_LOCAL {
            let f = &dir.fork;
            let count = usize::from(f[0]);
            let i8 = f[1] != 0;
            let inum = if i8 { 8 } else { 4 };
            let mut pos = 2 + inum;
            for _ in 0..count {
                let namelen = usize::from(
                    *f.get(pos)
                        .with_context(|| format!("{what}: short form runs past its fork"))?,
                );
                let name = f
                    .get(pos + 3..pos + 3 + namelen)
                    .with_context(|| format!("{what}: short form runs past its fork"))?
                    .to_vec();
                let p = pos + 3 + namelen + usize::from(self.ftype);
                let ino = if i8 {
                    be::u64(f, p)
                } else {
                    u64::from(be::u32(f, p))
                };
                out.push((name, ino));
                pos = p + inum;
            }
            return Ok(out);
        }
        let exts = self.extents(dir)?;
        let dbs = self.dir_block;
        let data_end = (dir.size.min(DIR_LEAF_OFFSET)).min(MAX_DIR);
        let mut block = vec![0u8; dbs as usize];
        for e in exts.iter().filter(|e| e.off * self.g.bs < data_end) {
            let (start, end) = (
                e.off * self.g.bs,
                ((e.off + e.len) * self.g.bs).min(data_end),
            );
            let mut at = start.div_ceil(dbs) * dbs;
            while at + dbs <= end {
                self.read_file(&exts, at, &mut block, &what)?;
                self.dir_block_entries(&block, &mut out, &what)?;
                at += dbs;
            }
        }
        Ok(out)
    }

    fn dir_block_entries(&self, b: &[u8], out: &mut Vec<(Vec<u8>, u64)>, what: &str) -> Result<()> {
        let magic = be::u32(b, 0);
        let (hdr, single) = match magic {
            0x5844_3244 => (16, false), // XD2D
            0x5844_3242 => (16, true),  // XD2B
            0x5844_4433 => (64, false), // XDD3
            0x5844_4233 => (64, true),  // XDB3
            m => bail!("{what}: directory block magic {m:#x} is not a data block"),
        };
        let mut end = b.len();
        if single {
            // A single-block directory keeps its leaf entries and a tail at the block's end.
            let count = be::u32(b, b.len() - 8) as usize;
            end = b
                .len()
                .checked_sub(8 + count * 8)
                .filter(|&e| e >= hdr)
                .with_context(|| format!("{what}: block tail claims {count} leaf entries"))?;
        }
        let mut pos = hdr;
        while pos + 8 <= end {
            if be::u16(b, pos) == 0xFFFF {
                let len = usize::from(be::u16(b, pos + 2));
                if len < 8 || len % 8 != 0 {
                    bail!("{what}: free space entry at byte {pos} is damaged");
                }
                pos += len;
                continue;
            }
            let ino = be::u64(b, pos);
            let namelen = usize::from(b[pos + 8]);
            let name = b
                .get(pos + 9..pos + 9 + namelen)
                .with_context(|| format!("{what}: entry at byte {pos} runs past its block"))?;
            if name != b"." && name != b".." {
                out.push((name.to_vec(), ino));
            }
            let len = (9 + namelen + usize::from(self.ftype) + 2).div_ceil(8) * 8;
            pos += len;
        }
        Ok(())
    }

    /// `name` in directory `dir`.
    pub fn child(&self, dir: &Inode, name: &[u8]) -> Result<Option<Inode>> {
        match self.entries(dir)?.into_iter().find(|(n, _)| n == name) {
            Some((_, ino)) => Ok(Some(self.inode(ino)?)),
            None => Ok(None),
        }
    }

    /// Where symbolic link `ino` points.
    pub fn link(&self, ino: &Inode) -> Result<Vec<u8>> {
        let n = ino.size.min(1024) as usize;
        if ino.format == FMT_LOCAL {
            return Ok(ino.fork.get(..n).unwrap_or_default().to_vec());
        }
        let exts = self.extents(ino)?;
        let mut b = vec![0u8; self.g.bs as usize];
        self.read_file(&exts, 0, &mut b, &format!("symlink inode {}", ino.number))?;
        // v5 remote symlink blocks start with a 56-byte header ("XSLM").
        let skip = if self.g.v5 && be::u32(&b, 0) == 0x5853_4C4D {
            56
        } else {
            0
        };
        Ok(b.get(skip..skip + n).unwrap_or_default().to_vec())
    }

    /// A reader of regular file `ino`.
    pub fn reader(&self, ino: &Inode) -> Result<XfsReader<'_>> {
        if !ino.is_file() {
            bail!("inode {}: not a regular file", ino.number);
        }
        Ok(XfsReader {
            files: self,
            exts: self.extents(ino)?,
            size: ino.size,
            pos: 0,
            what: format!("inode {}", ino.number),
        })
    }
}

/// The content of one file, read on demand.
pub struct XfsReader<'f> {
    files: &'f XfsFiles<'f>,
    exts: Vec<Extent>,
    size: u64,
    pos: u64,
    what: String,
}

impl std::io::Read for XfsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.size - self.pos.min(self.size))
            .min(buf.len() as u64)
            .min(1 << 20) as usize;
        self.files
            .read_file(&self.exts, self.pos, &mut buf[..n], &self.what)
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}
