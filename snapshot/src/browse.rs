//! File-level restore: a filesystem inside a snapshot browsed and read without restoring its disk,
//! through a read-only block view ([`crate::view::SnapshotView`]) that fetches only the chunks the
//! reads touch. Our own reader of each filesystem's structures does the walking: ext2/3/4 and
//! NTFS so far (FAT and XFS are refused with a line saying so: restore the disk, or mount a
//! restored copy). NTFS has no Unix modes or owners: files show 0644, directories 0755, owner 0.
//!
//! Paths are `/`-separated from the filesystem's root; `..` is refused (never resolved), `.` and
//! empty components are ignored, symbolic links are listed and exported as links, never followed.

use crate::fs::ext::files::{Inode, Tree};
use crate::fs::ext::ExtFiles;
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
}

/// Called with each entry a walk reaches and, for a regular file, a reader of its content.
pub type Visit<'f> = dyn FnMut(&Entry, Option<&mut dyn Read>) -> Result<()> + 'f;

impl<'a> Browser<'a> {
    /// Open the filesystem of `kind` at `offset`/`len` of `dev`.
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64, kind: FsKind) -> Result<Browser<'a>> {
        let fs = match kind {
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => Fs::Ext(ExtFiles::open(dev, offset, len)?),
            FsKind::Ntfs => Fs::Ntfs(NtfsFiles::open(dev, offset, len)?),
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
            Fs::Ntfs(n) => {
                let dir = ntfs_find(n, &clean)?;
                if !dir.dir {
                    bail!("{clean}: not a directory");
                }
                n.list(&dir)?
                    .into_iter()
                    .map(|c| {
                        let p = child(&clean, c.name.as_bytes());
                        ntfs_entry(&c, p)
                    })
                    .collect()
            }
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
            Fs::Ntfs(n) => {
                let mut node = ntfs_find(n, &clean)?;
                node.name = String::from_utf8_lossy(&name).into_owned();
                ntfs_walk(n, node, clean, recurse, 0, &mut seen, f)
            }
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

fn ntfs_find(n: &NtfsFiles, clean: &str) -> Result<NtfsNode> {
    let mut cur = n.root()?;
    let mut at = String::new();
    for c in components(clean)? {
        if !cur.dir {
            bail!("{at}: not a directory");
        }
        at = format!("{at}/{c}");
        cur = n
            .child(&cur, c)?
            .with_context(|| format!("{at}: no such file or directory"))?;
    }
    Ok(cur)
}

fn ntfs_entry(n: &NtfsNode, path: String) -> Entry {
    let (kind, mode) = match (n.dir, n.reparse) {
        (_, true) => (Kind::Other, 0o644),
        (true, false) => (Kind::Dir, 0o755),
        (false, false) => (Kind::File, 0o644),
    };
    Entry {
        name: n.name.clone(),
        raw: n.name.as_bytes().to_vec(),
        path,
        kind,
        mode,
        uid: 0,
        gid: 0,
        size: if n.dir { 0 } else { n.size },
        mtime: n.mtime,
        link: None,
        link_raw: None,
    }
}

fn ntfs_walk(
    n: &NtfsFiles,
    node: NtfsNode,
    path: String,
    recurse: bool,
    depth: usize,
    seen: &mut HashSet<u64>,
    f: &mut Visit,
) -> Result<()> {
    let e = ntfs_entry(&node, path);
    match e.kind {
        Kind::Dir if recurse => {
            if depth > MAX_DEPTH || !seen.insert(node.record) {
                bail!(
                    "{}: directories nested too deep or in a loop (damaged?)",
                    e.path
                );
            }
            f(&e, None)?;
            for c in n.list(&node)? {
                let p = child(&e.path, c.name.as_bytes());
                ntfs_walk(n, c, p, true, depth + 1, seen, f)?;
            }
            Ok(())
        }
        Kind::File => {
            let mut r = n.reader(&node)?;
            f(&e, Some(&mut r))
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
