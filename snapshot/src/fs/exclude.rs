//! Exclusions: files whose contents are not worth keeping (paging, hibernation and swap files),
//! found through each filesystem's own metadata (ext inodes and extents, NTFS `$I30` indexes and
//! `$DATA` runs), whose blocks the used-block map then treats as free.
//!
//! The file itself stays: its name, size and allocation are in the metadata, which is kept, so
//! the restored filesystem is consistent (`e2fsck`, `ntfsfix` clean) and the file is where the OS
//! expects it. Only its contents after the first [`KEEP`] bytes are not stored: a swap file keeps
//! its header page (so `swapon` takes it), a `hiberfil.sys` keeps the page that says whether it
//! holds an image (so a stale image left on the target disk can never be resumed). The rest reads
//! as whatever the target held, as free space does.
//!
//! A file is excluded only when every block of it is marked used and none is a structure the
//! filesystem needs (ext group metadata and journal; NTFS system files): a damaged file table
//! then costs space, never data.

use super::{uncovered, Probe};
use crate::extents::Extents;
use serde::{Deserialize, Serialize};

/// Bytes at the start of an excluded file that are kept.
pub const KEEP: u64 = 4096;

/// Paths excluded by default, on whatever filesystem holds them: Windows' paging, hibernation
/// and swap files, and the usual Linux swap files (`/swapfile`, Ubuntu's `/swap.img`).
pub const DEFAULT_PATHS: [&str; 5] = [
    "/pagefile.sys",
    "/hiberfil.sys",
    "/swapfile.sys",
    "/swapfile",
    "/swap.img",
];

/// What to exclude.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusions {
    /// Absolute paths inside a filesystem (NTFS compares them case-insensitively).
    pub paths: Vec<String>,
    /// Also the swap files that an ext root filesystem's `/etc/fstab` names.
    pub fstab_swap: bool,
}

impl Default for Exclusions {
    fn default() -> Exclusions {
        Exclusions {
            paths: DEFAULT_PATHS.iter().map(|p| p.to_string()).collect(),
            fstab_swap: true,
        }
    }
}

impl Exclusions {
    /// The defaults (unless `no_defaults`) plus `extra` paths, as the command lines give them:
    /// each absolute, without `..`, `/` or `\\` separated.
    pub fn from_args(extra: &[String], no_defaults: bool) -> anyhow::Result<Exclusions> {
        let mut ex = if no_defaults {
            Exclusions::none()
        } else {
            Exclusions::default()
        };
        for p in extra {
            let parts: Vec<&str> = p.split(['/', '\\']).collect();
            if !(p.starts_with('/') || p.starts_with('\\'))
                || parts.iter().any(|c| *c == ".." || *c == ".")
                || p.contains('\0')
                || parts.iter().all(|c| c.is_empty())
            {
                anyhow::bail!(
                    "--exclude {p:?}: give the absolute path of a file inside its filesystem \
                     (e.g. /pagefile.sys or /var/swap), without . or .."
                );
            }
            if !ex.paths.contains(p) {
                ex.paths.push(p.clone());
            }
        }
        Ok(ex)
    }

    /// Nothing excluded.
    pub fn none() -> Exclusions {
        Exclusions {
            paths: Vec::new(),
            fstab_swap: false,
        }
    }
}

/// A file whose contents were not stored, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    /// Its path inside the filesystem.
    pub path: String,
    /// Bytes of the partition no longer kept because of it.
    pub bytes: u64,
}

/// A file an exclusion names, as the filesystem maps it.
#[derive(Debug)]
pub(crate) struct Hit {
    pub path: String,
    /// Its data: (offset in the file, start, end) with start..end bytes of the partition.
    pub ranges: Vec<(u64, u64, u64)>,
    /// Checked that it is what its name says (a swap signature): the default Linux names only.
    pub verified: bool,
}

/// What a filesystem's finder returns: the files, the structures that must never be excluded,
/// and notes on paths it could not follow.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub hits: Vec<Hit>,
    pub critical: Extents,
    pub notes: Vec<String>,
}

/// Take the hits' contents (past their first [`KEEP`] bytes) out of `probe.used`. Returns what
/// was excluded and a note for every file that was not, saying why.
pub(crate) fn apply(probe: &mut Probe, found: Found) -> (Vec<Excluded>, Vec<String>) {
    let mut notes = found.notes;
    let mut out = Vec::new();
    for hit in found.hits {
        if !hit.verified {
            continue;
        }
        // Everything from file byte KEEP on.
        let drop: Vec<(u64, u64)> = hit
            .ranges
            .iter()
            .filter_map(|&(at, s, e)| {
                let skip = KEEP.saturating_sub(at).min(e - s);
                (s + skip < e).then_some((s + skip, e))
            })
            .collect();
        let refuse = drop.iter().find_map(|&(s, e)| {
            if uncovered(&probe.used, s, e).is_some() {
                Some("some of its blocks are marked free (damaged allocation data?)")
            } else if found.critical.within(s, e).next().is_some() {
                Some("its blocks overlap the filesystem's own structures (damaged?)")
            } else {
                None
            }
        });
        if let Some(why) = refuse {
            notes.push(format!("{} is kept whole: {why}", hit.path));
            continue;
        }
        let before = probe.used.len();
        for (s, e) in drop {
            probe.used.remove(s, e);
        }
        let bytes = before - probe.used.len();
        if bytes > 0 {
            out.push(Excluded {
                path: hit.path,
                bytes,
            });
        }
    }
    probe.fs.used = probe.used.len();
    (out, notes)
}

/// Paths of swap files in an fstab: entries of type `swap` whose source is a path outside `/dev`.
pub(crate) fn fstab_swap_files(fstab: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(fstab)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [src, _, "swap", ..]
                    if src.starts_with('/') && !src.starts_with("/dev/") && !l.starts_with('#') =>
                {
                    Some(src.to_string())
                }
                _ => None,
            }
        })
        .collect()
}

/// Whether the first page of a file is a Linux swap header (`SWAPSPACE2`, or the old
/// `SWAP-SPACE`, at the end of the 4 KiB page).
pub(crate) fn is_swap_header(page: &[u8]) -> bool {
    matches!(
        page.get(4086..4096),
        Some(b"SWAPSPACE2") | Some(b"SWAP-SPACE")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Filesystem, FsKind};

    fn probe(used: &[(u64, u64)]) -> Probe {
        let mut e = Extents::new();
        for &(s, end) in used {
            e.add(s, end);
        }
        Probe {
            fs: Filesystem {
                kind: FsKind::Ext4,
                uuid: None,
                label: None,
                block_size: 4096,
                size: 1 << 30,
                used: e.len(),
            },
            used: e,
        }
    }

    /// A file whose runs are laid out one after the other in file order.
    fn hit(ranges: &[(u64, u64)]) -> Hit {
        let mut at = 0;
        Hit {
            path: "/swapfile".into(),
            ranges: ranges
                .iter()
                .map(|&(s, e)| {
                    at += e - s;
                    (at - (e - s), s, e)
                })
                .collect(),
            verified: true,
        }
    }

    #[test]
    fn keeps_the_head_and_drops_the_rest() {
        let mut p = probe(&[(0, 1 << 20)]);
        let found = Found {
            hits: vec![hit(&[(8192, 10240), (65536, 131072)])],
            ..Found::default()
        };
        let (ex, notes) = apply(&mut p, found);
        assert!(notes.is_empty(), "{notes:?}");
        // 2048 bytes of the first run and 2048 of the second are the kept head.
        assert_eq!(ex[0].bytes, 65536 - 2048);
        assert_eq!(uncovered(&p.used, 65536, 65536 + 2048), None);
        assert!(uncovered(&p.used, 65536 + 2048, 131072).is_some());
        assert_eq!(p.fs.used, p.used.len());
    }

    #[test]
    fn refuses_free_or_critical_blocks() {
        let mut p = probe(&[(0, 1 << 20)]);
        let mut critical = Extents::new();
        critical.add(200_000, 200_001);
        let found = Found {
            hits: vec![
                hit(&[(0, 4096), (2 << 20, 3 << 20)]),
                hit(&[(0, 4096), (196_608, 262_144)]),
            ],
            critical,
            notes: Vec::new(),
        };
        let (ex, notes) = apply(&mut p, found);
        assert!(ex.is_empty());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(p.used.len(), 1 << 20);
    }

    #[test]
    fn command_line_paths_are_checked() {
        let ex =
            Exclusions::from_args(&["/var/swap".into(), "\\Temp\\big.bin".into()], true).unwrap();
        assert_eq!(ex.paths, ["/var/swap", "\\Temp\\big.bin"]);
        assert!(!ex.fstab_swap);
        assert_eq!(
            Exclusions::from_args(&[], false).unwrap(),
            Exclusions::default()
        );
        for bad in ["swapfile", "/a/../etc/shadow", "/", "/./x", ""] {
            assert!(
                Exclusions::from_args(&[bad.into()], false).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn reads_swap_files_from_fstab() {
        let t = b"# /swapfile none swap sw 0 0\nUUID=x / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n/dev/sda3 none swap sw 0 0\n/var/swap.img\tnone\tswap\tdefaults\n";
        assert_eq!(fstab_swap_files(t), vec!["/swapfile", "/var/swap.img"]);
    }
}
