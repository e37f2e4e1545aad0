//! File-level restore: a filesystem inside a snapshot browsed and read without restoring its disk,
//! through a read-only block view ([`crate::view::SnapshotView`]) that fetches only the chunks the
//! reads touch. Our own reader of each filesystem's structures does the walking: ext2/3/4, XFS,
//! NTFS and FAT, each behind one small trait ([`Walk`]) so listing, lookup and export are written
//! once. NTFS and FAT have no Unix modes or owners: files show 0644, directories 0755, owner 0.
//!
//! Paths are `/`-separated from the filesystem's root; `..` is refused (never resolved), `.` and
//! empty components are ignored, symbolic links are listed and exported as links, never followed.

use crate::fs::ext::files::{Inode, Tree};
use crate::fs::ext::ExtFiles;
use crate::fs::fat::{FatFiles, FatNode};
use crate::fs::ntfs::{NtfsFiles, NtfsNode};
use crate::fs::xfs::{XfsFiles, XfsInode};
use crate::fs::FsKind;
use crate::source::ReadAt;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::HashSet;
use std::io::Read;

/// Directories nested deeper than this are damage (or a loop).
const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Devices, FIFOs, sockets: listed, not exported.
    Other,
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The name as UTF-8 (invalid bytes replaced); `raw` has the exact bytes.
    pub name: String,
    #[serde(skip)]
    pub raw: Vec<u8>,
    /// From the filesystem's root, `/`-separated.
    pub path: String,
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(skip)]
    pub link_raw: Option<Vec<u8>>,
}

/// The components of `path`; `..` and NUL bytes are refused.
pub fn components(path: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => bail!("{path:?}: paths with `..` are refused"),
            c if c.contains('\0') => bail!("{path:?}: NUL in a path"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// One filesystem opened for browsing.
pub struct Browser<'a> {
    fs: Fs<'a>,
}

enum Fs<'a> {
    Ext(ExtFiles<'a>),
    Xfs(XfsFiles<'a>),
    Ntfs(NtfsFiles<'a>),
    Fat(FatFiles<'a>),
}

/// Called with each entry a walk reaches and, for a regular file, a reader of its content.
pub type Visit<'f> = dyn FnMut(&Entry, Option<&mut dyn Read>) -> Result<()> + 'f;

/// What a listing shows of a node.
struct Meta {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: u64,
    /// Unique within the filesystem (loop detection).
    id: u64,
}

/// One filesystem's way of walking its tree.
trait Walk {
    type Node;
    fn root(&self) -> Result<Self::Node>;
    /// The entries of a directory, with their stored names.
    fn list(&self, dir: &Self::Node) -> Result<Vec<(Vec<u8>, Self::Node)>>;
    /// `name` in `dir` (NTFS and FAT match without regard to case), with its stored name.
    fn child(&self, dir: &Self::Node, name: &str) -> Result<Option<(Vec<u8>, Self::Node)>>;
    fn meta(&self, n: &Self::Node) -> Meta;
    fn reader<'s>(&'s self, n: &Self::Node) -> Result<Box<dyn Read + 's>>;
    fn link(&self, _n: &Self::Node) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

fn unix_kind(mode: u16) -> Kind {
    match mode & 0xF000 {
        0x8000 => Kind::File,
        0x4000 => Kind::Dir,
        0xA000 => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// Modes for filesystems that have none.
fn plain(dir: bool, other: bool, size: u64, mtime: u64, id: u64) -> Meta {
    let (kind, mode) = match (dir, other) {
        (_, true) => (Kind::Other, 0o644),
        (true, false) => (Kind::Dir, 0o755),
        (false, false) => (Kind::File, 0o644),
    };
    Meta {
        kind,
        mode,
        uid: 0,
        gid: 0,
        size: if dir { 0 } else { size },
        mtime,
        id,
    }
}

/// The ext tree borrows its filesystem; a node is an inode.
struct ExtWalk<'t>(Tree<'t>);

impl Walk for ExtWalk<'_> {
    type Node = Inode;
    fn root(&self) -> Result<Inode> {
        self.0.inode(2)
    }
    fn list(&self, dir: &Inode) -> Result<Vec<(Vec<u8>, Inode)>> {
        self.0
            .entries(dir)?
            .into_iter()
            .map(|e| Ok((e.name, self.0.inode(e.inode)?)))
            .collect()
    }
    fn child(&self, dir: &Inode, name: &str) -> Result<Option<(Vec<u8>, Inode)>> {
        match self
            .0
            .entries(dir)?
            .into_iter()
            .find(|e| e.name == name.as_bytes())
        {
            Some(e) => Ok(Some((e.name, self.0.inode(e.inode)?))),
            None => Ok(None),
        }
    }
    fn meta(&self, n: &Inode) -> Meta {
        Meta {
            kind: unix_kind(n.mode),
            mode: u32::from(n.mode) & 0o7777,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            mtime: u64::from(n.mtime),
            id: n.number,
        }
    }
    fn reader<'s>(&'s self, n: &Inode) -> Result<Box<dyn Read + 's>> {
        let ino = self.0.inode(n.number)?;
        Ok(Box::new(self.0.open(ino)?))
    }
    fn link(&self, n: &Inode) -> Result<Vec<u8>> {
        self.0.link(n)
    }
}

impl Walk for XfsFiles<'_> {
    type Node = XfsInode;
    fn root(&self) -> Result<XfsInode> {
        XfsFiles::root(self)
    }
    fn list(&self, dir: &XfsInode) -> Result<Vec<(Vec<u8>, XfsInode)>> {
        self.entries(dir)?
            .into_iter()
            .map(|(name, ino)| Ok((name, self.inode(ino)?)))
            .collect()
    }
    fn child(&self, dir: &XfsInode, name: &str) -> Result<Option<(Vec<u8>, XfsInode)>> {
        Ok(XfsFiles::child(self, dir, name.as_bytes())?.map(|n| (name.as_bytes().to_vec(), n)))
    }
    fn meta(&self, n: &XfsInode) -> Meta {
        Meta {
            kind: unix_kind(n.mode),
            mode: u32::from(n.mode) & 0o7777,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            mtime: n.mtime,
            id: n.number,
        }
    }
    fn reader<'s>(&'s self, n: &XfsInode) -> Result<Box<dyn Read + 's>> {
        Ok(Box::new(XfsFiles::reader(self, n)?))
    }
    fn link(&self, n: &XfsInode) -> Result<Vec<u8>> {
        XfsFiles::link(self, n)
    }
}

impl Walk for NtfsFiles<'_> {
    type Node = NtfsNode;
    fn root(&self) -> Result<NtfsNode> {
        NtfsFiles::root(self)
    }
    fn list(&self, dir: &NtfsNode) -> Result<Vec<(Vec<u8>, NtfsNode)>> {
        Ok(NtfsFiles::list(self, dir)?
            .into_iter()
            .map(|n| (n.name.as_bytes().to_vec(), n))
            .collect())
    }
    fn child(&self, dir: &NtfsNode, name: &str) -> Result<Option<(Vec<u8>, NtfsNode)>> {
        Ok(NtfsFiles::child(self, dir, name)?.map(|n| (n.name.as_bytes().to_vec(), n)))
    }
    fn meta(&self, n: &NtfsNode) -> Meta {
        plain(n.dir, n.reparse, n.size, n.mtime, n.record)
    }
    fn reader<'s>(&'s self, n: &NtfsNode) -> Result<Box<dyn Read + 's>> {
        Ok(Box::new(NtfsFiles::reader(self, n)?))
    }
}

impl Walk for FatFiles<'_> {
    type Node = FatNode;
    fn root(&self) -> Result<FatNode> {
        Ok(FatFiles::root(self))
    }
    fn list(&self, dir: &FatNode) -> Result<Vec<(Vec<u8>, FatNode)>> {
        Ok(FatFiles::list(self, dir)?
            .into_iter()
            .map(|n| (n.name.as_bytes().to_vec(), n))
            .collect())
    }
    fn child(&self, dir: &FatNode, name: &str) -> Result<Option<(Vec<u8>, FatNode)>> {
        Ok(FatFiles::child(self, dir, name)?.map(|n| (n.name.as_bytes().to_vec(), n)))
    }
    fn meta(&self, n: &FatNode) -> Meta {
        plain(n.dir, false, n.size, n.mtime, n.id())
    }
    fn reader<'s>(&'s self, n: &FatNode) -> Result<Box<dyn Read + 's>> {
        Ok(Box::new(FatFiles::reader(self, n)?))
    }
}

impl<'a> Browser<'a> {
    /// Open the filesystem of `kind` at `offset`/`len` of `dev`.
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64, kind: FsKind) -> Result<Browser<'a>> {
        let fs = match kind {
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => {
                Fs::Ext(ExtFiles::open(dev, offset, len)?)
            }
            FsKind::Xfs => Fs::Xfs(XfsFiles::open(dev, offset, len)?),
            FsKind::Ntfs => Fs::Ntfs(NtfsFiles::open(dev, offset, len)?),
            FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
                Fs::Fat(FatFiles::open(dev, offset, len)?)
            }
            FsKind::Swap => bail!("a swap area holds no files"),
        };
        Ok(Browser { fs })
    }

    fn with<R>(&self, f: impl FnOnce(&dyn Dispatch) -> Result<R>) -> Result<R> {
        match &self.fs {
            Fs::Ext(x) => f(&Over(&ExtWalk(x.tree()))),
            Fs::Xfs(x) => f(&Over(x)),
            Fs::Ntfs(n) => f(&Over(n)),
            Fs::Fat(x) => f(&Over(x)),
        }
    }

    /// What is at `path`.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let mut out = None;
        self.with(|d| {
            d.at(path, false, &mut |e, _| {
                out = Some(e.clone());
                Ok(())
            })
        })?;
        out.context("nothing found")
    }

    /// The entries of directory `path`, sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let mut out = self.with(|d| d.list(path))?;
        out.sort_by(|a, b| a.raw.cmp(&b.raw));
        Ok(out)
    }

    /// Call `f` with regular file `path` and a reader of its content.
    pub fn open_file(
        &self,
        path: &str,
        f: &mut dyn FnMut(&Entry, &mut dyn Read) -> Result<()>,
    ) -> Result<()> {
        self.with(|d| {
            d.at(path, false, &mut |e, r| match r {
                Some(r) => f(e, r),
                None => bail!("{}: not a regular file", e.path),
            })
        })
    }

    /// Call `f` for `path` and, for a directory, everything below it (a directory before its
    /// entries, entries in name order), with a reader of each regular file's content.
    pub fn walk(&self, path: &str, f: &mut Visit) -> Result<()> {
        self.with(|d| d.at(path, true, f))
    }
}

/// The [`Walk`] operations with the node type erased, so [`Browser`] dispatches once.
trait Dispatch {
    fn list(&self, path: &str) -> Result<Vec<Entry>>;
    fn at(&self, path: &str, recurse: bool, f: &mut Visit) -> Result<()>;
}

struct Over<'w, W>(&'w W);

impl<W: Walk> Dispatch for Over<'_, W> {
    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let w = self.0;
        let (clean, _, dir) = find(w, path)?;
        if w.meta(&dir).kind != Kind::Dir {
            bail!("{clean}: not a directory");
        }
        w.list(&dir)?
            .iter()
            .map(|(name, n)| entry(w, n, name, child(&clean, name)))
            .collect()
    }

    fn at(&self, path: &str, recurse: bool, f: &mut Visit) -> Result<()> {
        let w = self.0;
        let (clean, stored, node) = find(w, path)?;
        let mut seen = HashSet::new();
        walk(w, &node, &stored, clean, recurse, 0, &mut seen, f)
    }
}

/// The node at `path`: its path as stored (the names the filesystem holds), its name, the node.
fn find<W: Walk + ?Sized>(w: &W, path: &str) -> Result<(String, Vec<u8>, W::Node)> {
    let mut cur = w.root()?;
    let mut at = String::from("/");
    let mut stored = Vec::new();
    for c in components(path)? {
        if w.meta(&cur).kind != Kind::Dir {
            bail!("{at}: not a directory");
        }
        let shown = child(&at, c.as_bytes());
        let (name, node) = w
            .child(&cur, c)?
            .with_context(|| format!("{shown}: no such file or directory"))?;
        at = child(&at, &name);
        stored = name;
        cur = node;
    }
    Ok((at, stored, cur))
}

fn entry<W: Walk + ?Sized>(w: &W, n: &W::Node, raw: &[u8], path: String) -> Result<Entry> {
    let m = w.meta(n);
    let link_raw = match m.kind {
        Kind::Symlink => Some(w.link(n)?),
        _ => None,
    };
    Ok(Entry {
        name: String::from_utf8_lossy(raw).into_owned(),
        raw: raw.to_vec(),
        path,
        kind: m.kind,
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        size: m.size,
        mtime: m.mtime,
        link: link_raw
            .as_ref()
            .map(|l| String::from_utf8_lossy(l).into_owned()),
        link_raw,
    })
}

#[allow(clippy::too_many_arguments)]
fn walk<W: Walk + ?Sized>(
    w: &W,
    node: &W::Node,
    raw: &[u8],
    path: String,
    recurse: bool,
    depth: usize,
    seen: &mut HashSet<u64>,
    f: &mut Visit,
) -> Result<()> {
    let e = entry(w, node, raw, path)?;
    match e.kind {
        Kind::Dir if recurse => {
            if depth > MAX_DEPTH || !seen.insert(w.meta(node).id) {
                bail!(
                    "{}: directories nested too deep or in a loop (damaged?)",
                    e.path
                );
            }
            f(&e, None)?;
            let mut children = w.list(node)?;
            children.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, c) in &children {
                let p = child(&e.path, name);
                walk(w, c, name, p, true, depth + 1, seen, f)?;
            }
            Ok(())
        }
        Kind::File => {
            let mut r = w.reader(node)?;
            f(&e, Some(&mut *r))
        }
        _ => f(&e, None),
    }
}

fn child(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_and_dotdot_refused() {
        assert_eq!(
            components("/etc//ssh/./sshd_config").unwrap(),
            ["etc", "ssh", "sshd_config"]
        );
        assert!(components("/etc/../private").is_err());
        assert!(components("..").is_err());
        assert!(components("a\0b").is_err());
        assert!(components("/").unwrap().is_empty());
    }
}
