//! File-level restore: a filesystem inside a snapshot browsed and read without restoring its disk,
//! through a read-only block view ([`crate::view::SnapshotView`]) that fetches only the chunks the
//! reads touch. Our own reader of each filesystem's structures does the walking: ext2/3/4, NTFS
//! and FAT (XFS is refused with a line saying so: restore the disk, or mount a restored copy).
//! NTFS and FAT have no Unix modes or owners: files show 0644, directories 0755, owner 0.
//!
//! Paths are `/`-separated from the filesystem's root; `..` is refused (never resolved), `.` and
//! empty components are ignored, symbolic links are listed and exported as links, never followed.

use crate::fs::ext::files::{Inode, Tree};
use crate::fs::ext::ExtFiles;
use crate::fs::fat::{FatFiles, FatNode};
use crate::fs::ntfs::{NtfsFiles, NtfsNode};
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
    Ntfs(NtfsFiles<'a>),
    Fat(FatFiles<'a>),
}

/// Called with each entry a walk reaches and, for a regular file, a reader of its content.
pub type Visit<'f> = dyn FnMut(&Entry, Option<&mut dyn Read>) -> Result<()> + 'f;

impl<'a> Browser<'a> {
    /// Open the filesystem of `kind` at `offset`/`len` of `dev`.
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64, kind: FsKind) -> Result<Browser<'a>> {
        let fs = match kind {
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => Fs::Ext(ExtFiles::open(dev, offset, len)?),
            FsKind::Ntfs => Fs::Ntfs(NtfsFiles::open(dev, offset, len)?),
            FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
                Fs::Fat(FatFiles::open(dev, offset, len)?)
            }
            other => bail!(
                "file-level restore of {} is not built yet: restore the disk (or an image of it) and mount it",
                format!("{other:?}").to_lowercase()
            ),
        };
        Ok(Browser { fs })
    }

    /// What is at `path`.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let mut out = None;
        self.at(path, false, &mut |e, _| {
            out = Some(e.clone());
            Ok(())
        })?;
        out.context("nothing found")
    }

    /// The entries of directory `path`, sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let clean = clean(path)?;
        let mut out = match &self.fs {
            Fs::Ext(x) => {
                let tree = x.tree();
                let dir = ext_find(&tree, &clean)?;
                if !dir.is_dir() {
                    bail!("{clean}: not a directory");
                }
                let mut out = Vec::new();
                for e in tree.entries(&dir)? {
                    let ino = tree.inode(e.inode)?;
                    out.push(ext_entry(&tree, &ino, &e.name, child(&clean, &e.name))?);
                }
                out
            }
            Fs::Ntfs(n) => plain_list(n, &clean)?,
            Fs::Fat(f) => plain_list(f, &clean)?,
        };
        out.sort_by(|a, b| a.raw.cmp(&b.raw));
        Ok(out)
    }

    /// Call `f` with regular file `path` and a reader of its content.
    pub fn open_file(
        &self,
        path: &str,
        f: &mut dyn FnMut(&Entry, &mut dyn Read) -> Result<()>,
    ) -> Result<()> {
        self.at(path, false, &mut |e, r| match r {
            Some(r) => f(e, r),
            None => bail!("{}: not a regular file", e.path),
        })
    }

    /// Call `f` for `path` and, for a directory, everything below it (a directory before its
    /// entries, entries in name order), with a reader of each regular file's content.
    pub fn walk(&self, path: &str, f: &mut Visit) -> Result<()> {
        self.at(path, true, f)
    }

    fn at(&self, path: &str, recurse: bool, f: &mut Visit) -> Result<()> {
        let clean = clean(path)?;
        let name = clean.rsplit('/').next().unwrap_or("").as_bytes().to_vec();
        let mut seen = HashSet::new();
        match &self.fs {
            Fs::Ext(x) => {
                let tree = x.tree();
                let ino = ext_find(&tree, &clean)?;
                ext_walk(&tree, ino, &name, clean, recurse, 0, &mut seen, f)
            }
            Fs::Ntfs(n) => plain_at(n, clean, recurse, f),
            Fs::Fat(x) => plain_at(x, clean, recurse, f),
        }
    }
}

fn clean(path: &str) -> Result<String> {
    Ok(format!("/{}", components(path)?.join("/")))
}

fn ext_find(tree: &Tree, clean: &str) -> Result<Inode> {
    tree.lookup(clean)?
        .with_context(|| format!("{clean}: no such file or directory"))
}

fn ext_entry(tree: &Tree, ino: &Inode, raw: &[u8], path: String) -> Result<Entry> {
    let kind = if ino.is_file() {
        Kind::File
    } else if ino.is_dir() {
        Kind::Dir
    } else if ino.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    let link_raw = match kind {
        Kind::Symlink => Some(tree.link(ino)?),
        _ => None,
    };
    Ok(Entry {
        name: String::from_utf8_lossy(raw).into_owned(),
        raw: raw.to_vec(),
        path,
        kind,
        mode: u32::from(ino.mode) & 0o7777,
        uid: ino.uid,
        gid: ino.gid,
        size: ino.size,
        mtime: u64::from(ino.mtime),
        link: link_raw
            .as_ref()
            .map(|l| String::from_utf8_lossy(l).into_owned()),
        link_raw,
    })
}

#[allow(clippy::too_many_arguments)]
fn ext_walk(
    tree: &Tree,
    ino: Inode,
    raw: &[u8],
    path: String,
    recurse: bool,
    depth: usize,
    seen: &mut HashSet<u64>,
    f: &mut Visit,
) -> Result<()> {
    let e = ext_entry(tree, &ino, raw, path)?;
    match e.kind {
        Kind::Dir if recurse => {
            if depth > MAX_DEPTH || !seen.insert(ino.number) {
                bail!(
                    "{}: directories nested too deep or in a loop (damaged?)",
                    e.path
                );
            }
            f(&e, None)?;
            let mut entries = tree.entries(&ino)?;
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            for c in entries {
                let child_ino = tree.inode(c.inode)?;
                let p = child(&e.path, &c.name);
                ext_walk(tree, child_ino, &c.name, p, true, depth + 1, seen, f)?;
            }
            Ok(())
        }
        Kind::File => {
            let mut r = tree.open(ino)?;
            f(&e, Some(&mut r))
        }
        _ => f(&e, None),
    }
}

/// Filesystems without Unix modes, owners or links (NTFS, FAT), walked the same way: files show
/// 0644, directories 0755, owner 0.
trait Plain {
    type Node;
    fn root(&self) -> Result<Self::Node>;
    fn list(&self, dir: &Self::Node) -> Result<Vec<Self::Node>>;
    fn child(&self, dir: &Self::Node, name: &str) -> Result<Option<Self::Node>>;
    fn reader<'s>(&'s self, n: &Self::Node) -> Result<Box<dyn Read + 's>>;
    /// Name, directory?, other (not a file or directory)?, size, mtime, a unique id.
    fn info(n: &Self::Node) -> (&str, bool, bool, u64, u64, u64);
}

impl Plain for NtfsFiles<'_> {
    type Node = NtfsNode;
    fn root(&self) -> Result<NtfsNode> {
        NtfsFiles::root(self)
    }
    fn list(&self, dir: &NtfsNode) -> Result<Vec<NtfsNode>> {
        NtfsFiles::list(self, dir)
    }
    fn child(&self, dir: &NtfsNode, name: &str) -> Result<Option<NtfsNode>> {
        NtfsFiles::child(self, dir, name)
    }
    fn reader<'s>(&'s self, n: &NtfsNode) -> Result<Box<dyn Read + 's>> {
        Ok(Box::new(NtfsFiles::reader(self, n)?))
    }
    fn info(n: &NtfsNode) -> (&str, bool, bool, u64, u64, u64) {
        (&n.name, n.dir, n.reparse, n.size, n.mtime, n.record)
    }
}

impl Plain for FatFiles<'_> {
    type Node = FatNode;
    fn root(&self) -> Result<FatNode> {
        Ok(FatFiles::root(self))
    }
    fn list(&self, dir: &FatNode) -> Result<Vec<FatNode>> {
        FatFiles::list(self, dir)
    }
    fn child(&self, dir: &FatNode, name: &str) -> Result<Option<FatNode>> {
        FatFiles::child(self, dir, name)
    }
    fn reader<'s>(&'s self, n: &FatNode) -> Result<Box<dyn Read + 's>> {
        Ok(Box::new(FatFiles::reader(self, n)?))
    }
    fn info(n: &FatNode) -> (&str, bool, bool, u64, u64, u64) {
        (&n.name, n.dir, false, n.size, n.mtime, n.id())
    }
}

fn plain_find<P: Plain>(p: &P, clean: &str) -> Result<P::Node> {
    let mut cur = p.root()?;
    let mut at = String::new();
    for c in components(clean)? {
        if !P::info(&cur).1 {
            bail!("{at}: not a directory");
        }
        at = format!("{at}/{c}");
        cur = p
            .child(&cur, c)?
            .with_context(|| format!("{at}: no such file or directory"))?;
    }
    Ok(cur)
}

fn plain_entry<P: Plain>(n: &P::Node, name: Option<&[u8]>, path: String) -> Entry {
    let (own, dir, other, size, mtime, _) = P::info(n);
    let raw = name.map_or_else(|| own.as_bytes().to_vec(), <[u8]>::to_vec);
    let (kind, mode) = match (dir, other) {
        (_, true) => (Kind::Other, 0o644),
        (true, false) => (Kind::Dir, 0o755),
        (false, false) => (Kind::File, 0o644),
    };
    Entry {
        name: String::from_utf8_lossy(&raw).into_owned(),
        raw,
        path,
        kind,
        mode,
        uid: 0,
        gid: 0,
        size: if dir { 0 } else { size },
        mtime,
        link: None,
        link_raw: None,
    }
}

fn plain_list<P: Plain>(p: &P, clean: &str) -> Result<Vec<Entry>> {
    let dir = plain_find(p, clean)?;
    if !P::info(&dir).1 {
        bail!("{clean}: not a directory");
    }
    Ok(p.list(&dir)?
        .iter()
        .map(|c| plain_entry::<P>(c, None, child(clean, P::info(c).0.as_bytes())))
        .collect())
}

/// `clean` names the node by the request's spelling; the entry has the name the volume stores
/// (NTFS and FAT names match without regard to case).
fn plain_at<P: Plain>(p: &P, clean: String, recurse: bool, f: &mut Visit) -> Result<()> {
    let node = plain_find(p, &clean)?;
    let stored = P::info(&node).0.to_string();
    let path = match clean.rsplit_once('/') {
        Some((dir, _)) if !stored.is_empty() => {
            child(if dir.is_empty() { "/" } else { dir }, stored.as_bytes())
        }
        _ => clean,
    };
    let mut seen = HashSet::new();
    plain_walk(p, &node, None, path, recurse, 0, &mut seen, f)
}

#[allow(clippy::too_many_arguments)]
fn plain_walk<P: Plain>(
    p: &P,
    node: &P::Node,
    name: Option<&[u8]>,
    path: String,
    recurse: bool,
    depth: usize,
    seen: &mut HashSet<u64>,
    f: &mut Visit,
) -> Result<()> {
    let e = plain_entry::<P>(node, name, path);
    match e.kind {
        Kind::Dir if recurse => {
            if depth > MAX_DEPTH || !seen.insert(P::info(node).5) {
                bail!(
                    "{}: directories nested too deep or in a loop (damaged?)",
                    e.path
                );
            }
            f(&e, None)?;
            let mut children = p.list(node)?;
            children.sort_by(|a, b| P::info(a).0.cmp(P::info(b).0));
            for c in &children {
                let cp = child(&e.path, P::info(c).0.as_bytes());
                plain_walk(p, c, None, cp, true, depth + 1, seen, f)?;
            }
            Ok(())
        }
        Kind::File => {
            let mut r = p.reader(node)?;
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
