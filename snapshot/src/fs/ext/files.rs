//! Files of an ext2/3/4 filesystem by path: inodes from the group descriptors' inode tables,
//! their blocks from the extent tree (ext4) or the block map (ext2/3), directories read as
//! linear entry blocks (an htree directory's index blocks look like empty entries, so a linear
//! scan finds every name). Read-only and bounded: used to find the files an exclusion names.
//!
//! Symbolic links are not followed and inline-data files have no blocks: a path through either
//! finds nothing.

use super::{Desc, Geometry};
use crate::fs::{le, Part};
use anyhow::{anyhow, bail, Result};

const ROOT_INODE: u64 = 2;
const S_IFMT: u16 = 0xF000;
const S_IFREG: u16 = 0x8000;
const S_IFDIR: u16 = 0x4000;
const S_IFLNK: u16 = 0xA000;
const EXTENTS_FL: u32 = 0x8_0000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// Deeper extent trees than this are damage (the kernel allows 5 levels).
const MAX_DEPTH: u16 = 5;
/// Runs of one file before it is refused (a fragmented 1 GiB swap file has a few thousand).
const MAX_RUNS: usize = 1 << 20;
/// Largest directory or file content read whole.
const MAX_CONTENT: u64 = 64 << 20;

/// `len` blocks of a file from its block `logical`, at filesystem block `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    /// Allocated but never written (ext4 "uninitialized" extents): reads as zeros.
    pub unwritten: bool,
}

/// An inode as far as paths, blocks and a file listing need it.
pub struct Inode {
    pub number: u64,
    /// Type and permission bits (`st_mode`).
    pub mode: u16,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch (the low 32 bits the base inode holds).
    pub mtime: u32,
    pub atime: u32,
    flags: u32,
    blocks: u32,
    block: [u8; 60],
}

impl Inode {
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

/// One directory entry: its name's bytes and its inode number.
pub struct DirEntry {
    pub name: Vec<u8>,
    pub inode: u64,
}

/// Reads inodes, blocks and directories of one filesystem.
pub struct Tree<'a> {
    pub(super) part: &'a Part<'a>,
    pub(super) geo: &'a Geometry,
    pub(super) descs: &'a [Desc],
}

impl Tree<'_> {
    pub fn inode(&self, n: u64) -> Result<Inode> {
        let g = self.geo;
        let count = g.groups.saturating_mul(g.inodes_per_group);
        if n == 0 || n > count {
            bail!("inode {n} does not exist (the filesystem has {count})");
        }
        let (group, index) = ((n - 1) / g.inodes_per_group, (n - 1) % g.inodes_per_group);
        let table = self
            .descs
            .get(group as usize)
            .map(|d| d.inode_table)
            .ok_or_else(|| anyhow!("inode {n}: group {group} has no descriptor"))?;
        let at = table
            .checked_mul(g.bs)
            .and_then(|b| b.checked_add(index * g.inode_size))
            .ok_or_else(|| anyhow!("inode {n}: position overflows"))?;
        let mut raw = [0u8; 128];
        self.part.read(at, &mut raw, &format!("inode {n}"))?;
        let size = u64::from(le::u32(&raw, 0x4)) | u64::from(le::u32(&raw, 0x6C)) << 32;
        Ok(Inode {
            number: n,
            mode: le::u16(&raw, 0x0),
            size,
            uid: u32::from(le::u16(&raw, 0x2)) | u32::from(le::u16(&raw, 0x78)) << 16,
            gid: u32::from(le::u16(&raw, 0x18)) | u32::from(le::u16(&raw, 0x7A)) << 16,
            atime: le::u32(&raw, 0x8),
            mtime: le::u32(&raw, 0x10),
            flags: le::u32(&raw, 0x20),
            blocks: le::u32(&raw, 0x1C),
            block: le::bytes(&raw, 0x28),
        })
    }

    /// The blocks of `ino` in logical order (holes left out).
    pub fn runs(&self, ino: &Inode) -> Result<Vec<Run>> {
        let what = format!("inode {}", ino.number);
        if ino.flags & INLINE_DATA_FL != 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if ino.flags & EXTENTS_FL != 0 {
            self.extent_node(&ino.block, None, &mut out, &what)?;
        } else {
            let blocks = ino.size.div_ceil(self.geo.bs);
            self.block_map(&ino.block, blocks, &mut out, &what)?;
        }
        out.sort_unstable_by_key(|r| r.logical);
        for w in out.windows(2) {
            if w[0].logical + w[0].len > w[1].logical {
                bail!("{what}: extents overlap at file block {}", w[1].logical);
            }
        }
        Ok(out)
    }

    fn check(&self, physical: u64, len: u64, what: &str) -> Result<()> {
        let g = self.geo;
        if physical <= g.first_data_block || physical.checked_add(len).is_none_or(|e| e > g.blocks)
        {
            bail!(
                "{what}: blocks {physical}..+{len} lie outside the filesystem ({} blocks)",
                g.blocks
            );
        }
        Ok(())
    }

    fn push(&self, out: &mut Vec<Run>, run: Run, what: &str) -> Result<()> {
        self.check(run.physical, run.len, what)?;
        if out.len() >= MAX_RUNS {
            bail!("{what}: more than {MAX_RUNS} runs");
        }
        match out.last_mut() {
            Some(l)
                if l.logical + l.len == run.logical
                    && l.physical + l.len == run.physical
                    && l.unwritten == run.unwritten =>
            {
                l.len += run.len
            }
            _ => out.push(run),
        }
        Ok(())
    }

    /// One node of an extent tree (`node` starts with its header); `depth` is what the parent
    /// index expects, `None` at the root.
    fn extent_node(
        &self,
        node: &[u8],
        depth: Option<u16>,
        out: &mut Vec<Run>,
        what: &str,
    ) -> Result<()> {
        if le::u16(node, 0) != EXTENT_MAGIC {
            bail!("{what}: extent node without its magic");
        }
        let (entries, d) = (usize::from(le::u16(node, 2)), le::u16(node, 6));
        if d > MAX_DEPTH || depth.is_some_and(|want| want != d) {
            bail!("{what}: extent tree depth {d} is invalid here");
        }
        if 12 + entries * 12 > node.len() {
            bail!("{what}: extent node claims {entries} entries, more than fit");
        }
        for i in 0..entries {
            let e = &node[12 + i * 12..24 + i * 12];
            if d == 0 {
                let raw_len = u64::from(le::u16(e, 4));
                let unwritten = raw_len > 32768;
                let len = if unwritten { raw_len - 32768 } else { raw_len };
                let physical = u64::from(le::u16(e, 6)) << 32 | u64::from(le::u32(e, 8));
                if len > 0 {
                    let logical = u64::from(le::u32(e, 0));
                    self.push(
                        out,
                        Run {
                            logical,
                            physical,
                            len,
                            unwritten,
                        },
                        what,
                    )?;
                }
            } else {
                let child = u64::from(le::u32(e, 4)) | u64::from(le::u16(e, 8)) << 32;
                self.check(child, 1, what)?;
                let block = self.part.read_vec(
                    child * self.geo.bs,
                    self.geo.bs,
                    &format!("{what}: extent index block {child}"),
                )?;
                self.extent_node(&block, Some(d - 1), out, what)?;
            }
        }
        Ok(())
    }

    /// ext2/3 block map: 12 direct pointers, then single, double and triple indirect blocks.
    fn block_map(&self, block: &[u8], blocks: u64, out: &mut Vec<Run>, what: &str) -> Result<()> {
        let per = self.geo.bs / 4;
        let mut logical = 0u64;
        for i in 0..12 {
            if logical >= blocks {
                return Ok(());
            }
            let p = u64::from(le::u32(block, i * 4));
            if p != 0 {
                self.push(
                    out,
                    Run {
                        logical,
                        physical: p,
                        len: 1,
                        unwritten: false,
                    },
                    what,
                )?;
            }
            logical += 1;
        }
        for (level, i) in [(1u32, 12usize), (2, 13), (3, 14)] {
            let span = per.saturating_pow(level);
            let p = u64::from(le::u32(block, i * 4));
            if logical >= blocks {
                return Ok(());
            }
            if p != 0 {
                self.indirect(p, level, logical, blocks, out, what)?;
            }
            logical = logical.saturating_add(span);
        }
        Ok(())
    }

    fn indirect(
        &self,
        p: u64,
        level: u32,
        first: u64,
        blocks: u64,
        out: &mut Vec<Run>,
        what: &str,
    ) -> Result<()> {
        self.check(p, 1, what)?;
        let bs = self.geo.bs;
        let b = self
            .part
            .read_vec(p * bs, bs, &format!("{what}: indirect block {p}"))?;
        let span = (bs / 4).saturating_pow(level - 1);
        for (k, ptr) in b.chunks_exact(4).enumerate() {
            let logical = first.saturating_add((k as u64).saturating_mul(span));
            if logical >= blocks {
                break;
            }
            let q = u64::from(le::u32(ptr, 0));
            if q == 0 {
                continue;
            }
            if level == 1 {
                self.push(
                    out,
                    Run {
                        logical,
                        physical: q,
                        len: 1,
                        unwritten: false,
                    },
                    what,
                )?;
            } else {
                self.indirect(q, level - 1, logical, blocks, out, what)?;
            }
        }
        Ok(())
    }

    /// The first `max` bytes of a file or directory (holes read as zeros).
    pub fn read(&self, ino: &Inode, max: u64) -> Result<Vec<u8>> {
        let bs = self.geo.bs;
        let len = ino.size.min(max).min(MAX_CONTENT);
        let mut buf = vec![0u8; len as usize];
        for r in self.runs(ino)? {
            let start = r.logical.saturating_mul(bs);
            if start >= len {
                break;
            }
            let n = (r.len.saturating_mul(bs)).min(len - start);
            let dst = &mut buf[start as usize..(start + n) as usize];
            self.part.read(
                r.physical * bs,
                dst,
                &format!("inode {} at file block {}", ino.number, r.logical),
            )?;
        }
        Ok(buf)
    }

    /// Every entry of directory `dir` but `.` and `..`, in on-disk order.
    pub fn entries(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let bs = self.geo.bs as usize;
        let content = self.read(dir, MAX_CONTENT)?;
        let mut out = Vec::new();
        for (bi, block) in content.chunks(bs).enumerate() {
            let mut pos = 0usize;
            while pos + 8 <= block.len() {
                let inode = le::u32(block, pos);
                let rec_len = usize::from(le::u16(block, pos + 4));
                let name_len = usize::from(block[pos + 6]);
                if rec_len < 8 || pos + rec_len > block.len() || 8 + name_len > rec_len {
                    bail!(
                        "directory inode {}: entry at byte {pos} of block {bi} is damaged",
                        dir.number
                    );
                }
                let name = &block[pos + 8..pos + 8 + name_len];
                if inode != 0 && name != b"." && name != b".." {
                    out.push(DirEntry {
                        name: name.to_vec(),
                        inode: u64::from(inode),
                    });
                }
                pos += rec_len;
            }
        }
        Ok(out)
    }

    /// Where symbolic link `ino` points.
    pub fn link(&self, ino: &Inode) -> Result<Vec<u8>> {
        if !ino.is_symlink() {
            bail!("inode {} is not a symbolic link", ino.number);
        }
        // A fast symlink keeps its target in the block pointers.
        if ino.size < 60 && (ino.blocks == 0 || ino.flags & INLINE_DATA_FL != 0) {
            return Ok(ino.block[..ino.size as usize].to_vec());
        }
        self.read(ino, 4096)
    }

    /// A reader of the content of file `ino` (holes and unwritten extents read as zeros).
    pub fn open(&self, ino: Inode) -> Result<FileReader<'_>> {
        if ino.flags & INLINE_DATA_FL != 0 && ino.size > 60 {
            bail!(
                "inode {}: inline data past its first 60 bytes is not read",
                ino.number
            );
        }
        let runs = self.runs(&ino)?;
        Ok(FileReader {
            tree: self,
            ino,
            runs,
            pos: 0,
        })
    }

    /// The inode a name in directory `dir` refers to.
    fn entry(&self, dir: &Inode, name: &str) -> Result<Option<u64>> {
        Ok(self
            .entries(dir)?
            .into_iter()
            .find(|e| e.name == name.as_bytes())
            .map(|e| e.inode))
    }

    /// The inode at `path` (absolute, `/`-separated), `None` when a component is missing or is
    /// not a directory.
    pub fn lookup(&self, path: &str) -> Result<Option<Inode>> {
        let mut cur = self.inode(ROOT_INODE)?;
        for name in path.split('/').filter(|c| !c.is_empty()) {
            if !cur.is_dir() {
                return Ok(None);
            }
            match self.entry(&cur, name)? {
                Some(n) => cur = self.inode(n)?,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }
}

/// The content of one file, read on demand.
pub struct FileReader<'t> {
    tree: &'t Tree<'t>,
    ino: Inode,
    runs: Vec<Run>,
    pos: u64,
}

impl std::io::Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.ino.size;
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - self.pos);
        if self.ino.flags & INLINE_DATA_FL != 0 {
            let (s, n) = (self.pos as usize, want as usize);
            buf[..n].copy_from_slice(&self.ino.block[s..s + n]);
            self.pos += want;
            return Ok(n);
        }
        let bs = self.tree.geo.bs;
        let block = self.pos / bs;
        // The run holding this block, or the next one after a hole.
        let i = self.runs.partition_point(|r| r.logical + r.len <= block);
        let n = match self.runs.get(i) {
            Some(r) if r.logical <= block && !r.unwritten => {
                let end = (r.logical + r.len).saturating_mul(bs).min(size);
                let n = want.min(end - self.pos);
                let at = (r.physical + (block - r.logical)) * bs + self.pos % bs;
                self.tree
                    .part
                    .read(
                        at,
                        &mut buf[..n as usize],
                        &format!("inode {}", self.ino.number),
                    )
                    .map_err(std::io::Error::other)?;
                n
            }
            Some(r) if r.logical <= block => {
                let end = (r.logical + r.len).saturating_mul(bs).min(size);
                let n = want.min(end - self.pos);
                buf[..n as usize].fill(0);
                n
            }
            next => {
                let end = next.map_or(size, |r| r.logical.saturating_mul(bs).min(size));
                let n = want.min(end - self.pos);
                buf[..n as usize].fill(0);
                n
            }
        };
        self.pos += n;
        Ok(n as usize)
    }
}
