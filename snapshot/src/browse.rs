//! File-level restore: a filesystem inside a snapshot browsed and read without restoring its disk,
//! through a read-only block view ([`crate::view::SnapshotView`]) that fetches only the chunks the
//! reads touch. Our own reader of each filesystem's structures does the walking; ext2/3/4 so far
//! (NTFS, FAT and XFS are refused with a line saying so: restore the disk, or mount a restored
//! copy).
//!
//! Paths are `/`-separated from the filesystem's root; `..` is refused (never resolved), `.` and
//! empty components are ignored, symbolic links are listed and exported as links, never followed.

use crate::fs::ext::files::{FileReader, Inode, Tree};
use crate::fs::ext::ExtFiles;
use crate::fs::FsKind;
use crate::source::ReadAt;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::HashSet;

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
    pub mtime: u32,
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
    ext: ExtFiles<'a>,
}

impl<'a> Browser<'a> {
    /// Open the filesystem of `kind` at `offset`/`len` of `dev`.
    pub fn open(dev: &'a dyn ReadAt, offset: u64, len: u64, kind: FsKind) -> Result<Browser<'a>> {
        match kind {
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => Ok(Browser {
                ext: ExtFiles::open(dev, offset, len)?,
            }),
            other => bail!(
                "file-level restore of {} is not built yet: restore the disk (or an image of it) and mount it",
                format!("{other:?}").to_lowercase()
            ),
        }
    }

    fn entry(&self, tree: &Tree, ino: &Inode, raw: &[u8], path: String) -> Result<Entry> {
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
            mtime: ino.mtime,
            link: link_raw
                .as_ref()
                .map(|l| String::from_utf8_lossy(l).into_owned()),
            link_raw,
        })
    }

    fn find(&self, tree: &Tree, path: &str) -> Result<(Inode, String)> {
        let parts = components(path)?;
        let clean = format!("/{}", parts.join("/"));
        let ino = tree
            .lookup(&clean)?
            .with_context(|| format!("{clean}: no such file or directory"))?;
        Ok((ino, clean))
    }

    /// What is at `path`.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let tree = self.ext.tree();
        let (ino, clean) = self.find(&tree, path)?;
        let name = clean.rsplit('/').next().unwrap_or("").as_bytes().to_vec();
        self.entry(&tree, &ino, &name, clean)
    }

    /// The entries of directory `path`, sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let tree = self.ext.tree();
        let (dir, clean) = self.find(&tree, path)?;
        if !dir.is_dir() {
            bail!("{clean}: not a directory");
        }
        let mut out = Vec::new();
        for e in tree.entries(&dir)? {
            let ino = tree.inode(e.inode)?;
            let p = child(&clean, &e.name);
            out.push(self.entry(&tree, &ino, &e.name, p)?);
        }
        out.sort_by(|a, b| a.raw.cmp(&b.raw));
        Ok(out)
    }

    /// Call `f` for `path` and, for a directory, everything below it (a directory before its
    /// entries), with a reader of each regular file's content.
    pub fn walk(
        &self,
        path: &str,
        f: &mut dyn FnMut(&Entry, Option<FileReader>) -> Result<()>,
    ) -> Result<()> {
        let tree = self.ext.tree();
        let (ino, clean) = self.find(&tree, path)?;
        let name = clean.rsplit('/').next().unwrap_or("").as_bytes().to_vec();
        let mut seen = HashSet::new();
        self.walk_inode(&tree, ino, &name, clean, 0, &mut seen, f)
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_inode(
        &self,
        tree: &Tree,
        ino: Inode,
        raw: &[u8],
        path: String,
        depth: usize,
        seen: &mut HashSet<u64>,
        f: &mut dyn FnMut(&Entry, Option<FileReader>) -> Result<()>,
    ) -> Result<()> {
        let e = self.entry(tree, &ino, raw, path)?;
        match e.kind {
            Kind::Dir => {
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
                    self.walk_inode(tree, child_ino, &c.name, p, depth + 1, seen, f)?;
                }
                Ok(())
            }
            Kind::File => {
                let r = tree.open(ino)?;
                f(&e, Some(r))
            }
            _ => f(&e, None),
        }
    }

    /// A reader of regular file `path`.
    pub fn open_file(
        &self,
        path: &str,
        f: &mut dyn FnMut(&Entry, FileReader) -> Result<()>,
    ) -> Result<()> {
        let tree = self.ext.tree();
        let (ino, clean) = self.find(&tree, path)?;
        if !ino.is_file() {
            bail!("{clean}: not a regular file");
        }
        let name = clean.rsplit('/').next().unwrap_or("").as_bytes().to_vec();
        let e = self.entry(&tree, &ino, &name, clean)?;
        let r = tree.open(ino)?;
        f(&e, r)
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
