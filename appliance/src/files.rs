//! `appliance files ls|get|export`: file-level restore from a snapshot, read through the chunks
//! (only those the reads touch are fetched), never restoring the disk. See `snapshot::browse`.

use crate::cli::{FilesAction, FilesArgs};
use anyhow::{bail, Context, Result};
use snapshot::browse::{Browser, Entry, Kind};
use snapshot::store::{open_snapshot, LocalStore, Snapshot};
use snapshot::view::SnapshotView;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub fn run(a: &FilesArgs) -> Result<()> {
    let at = match &a.action {
        FilesAction::Ls { at, .. }
        | FilesAction::Get { at, .. }
        | FilesAction::Export { at, .. } => at,
    };
    let store = LocalStore::open(&at.store)?;
    let key = store.public_key()?;
    let snap = open_snapshot(&store, &at.host, at.snapshot.as_deref(), Some(&key))?;
    let pick = Pick {
        disk: at.disk,
        partition: at.partition,
        lv: at.lv.clone(),
    };
    browse(&store, &snap, &pick, |b| act(a, b))
}

/// Which filesystem of a snapshot: a partition of a disk, or an LV of a PV on it.
pub struct Pick {
    pub disk: u32,
    pub partition: Option<u32>,
    /// `VG/LV`: the LV's filesystem, read through its segments.
    pub lv: Option<String>,
}

/// Run `f` with the browser of the filesystem `pick` names.
pub fn browse<R>(
    store: &LocalStore,
    snap: &Snapshot,
    pick: &Pick,
    f: impl FnOnce(&Browser) -> Result<R>,
) -> Result<R> {
    let disks = &snap.manifest.disks;
    let Some(d) = disks.get(pick.disk as usize) else {
        bail!(
            "the snapshot has {} disk(s); there is no disk {}",
            disks.len(),
            pick.disk
        );
    };
    let view = SnapshotView::new(store, &snap.indexes[pick.disk as usize], d.size);
    if let Some(want) = &pick.lv {
        let (p, pv, lv) = find_lv(d, want)?;
        let Some(fs) = &lv.fs else {
            bail!("LV {want}: no filesystem was recognised in it");
        };
        let segs = segments(pv, lv).with_context(|| format!("LV {want}"))?;
        let lvv = snapshot::volume::lvm::LvView {
            dev: &view,
            base: p.offset,
            segs: &segs,
            size: lv.size,
        };
        let b = Browser::open(&lvv, 0, lv.size, fs.kind).with_context(|| format!("LV {want}"))?;
        return f(&b);
    }
    let (_, offset, len, kind, part) = place(snap, pick.disk, pick.partition)?;
    let b = Browser::open(&view, offset, len, kind)
        .with_context(|| format!("disk {} partition {part}", pick.disk))?;
    f(&b)
}

/// The partition, PV and LV `VG/LV` names on disk `d`.
fn find_lv<'d>(
    d: &'d snapshot::manifest::Disk,
    want: &str,
) -> Result<(
    &'d snapshot::ptable::Partition,
    &'d snapshot::manifest::LvmPv,
    &'d snapshot::manifest::LvmLv,
)> {
    let Some((vg, name)) = want.split_once('/') else {
        bail!("--lv {want}: expected VG/LV");
    };
    let mut known = Vec::new();
    for p in &d.partitions {
        let Some(pv) = p.lvm.as_deref() else { continue };
        if p.md.is_some() {
            continue;
        }
        for lv in &pv.vg.lvs {
            known.push(format!("{}/{}", pv.vg.name, lv.name));
            if pv.vg.name == vg && lv.name == name {
                if pv.vg.pv_count != 1 {
                    bail!(
                        "LV {want}: its VG spans {} PVs (only a VG of one PV is read)",
                        pv.vg.pv_count
                    );
                }
                return Ok((p, pv, lv));
            }
        }
    }
    bail!(
        "no LV {want} on disk {} (LVs: {})",
        d.number,
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        }
    )
}

/// The LV's segments as the view reads them (linear and striped only).
fn segments(
    pv: &snapshot::manifest::LvmPv,
    lv: &snapshot::manifest::LvmLv,
) -> Result<Vec<snapshot::volume::lvm::Seg>> {
    let es = pv.extent_size;
    let mut out = Vec::new();
    for s in &lv.segments {
        if s.kind != "striped" || s.stripes.is_empty() {
            bail!("a {} segment is not read (copied whole at ingest)", s.kind);
        }
        let len = s.extent_count * es;
        out.push(snapshot::volume::lvm::Seg {
            lv_start: s.start_extent * es,
            len,
            stripe_size: s.stripe_size.unwrap_or(len),
            stripes: s.stripes.iter().map(|pe| pv.pe_start + pe * es).collect(),
        });
    }
    out.sort_by_key(|s| s.lv_start);
    Ok(out)
}

fn act(a: &FilesArgs, b: &Browser) -> Result<()> {
    match &a.action {
        FilesAction::Ls { path, json, .. } => {
            let list = b.list(path)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for e in &list {
                    println!("{}", line(e));
                }
            }
            Ok(())
        }
        FilesAction::Get { path, output, .. } => {
            let mut out = sink(output.as_deref())?;
            b.open_file(path, &mut |_, mut r| {
                std::io::copy(&mut r, &mut out).context("writing the file")?;
                Ok(())
            })?;
            out.flush().context("writing the file")
        }
        FilesAction::Export { path, output, .. } => {
            let files = export_tar(b, path, sink(output.as_deref())?)?;
            eprintln!("exported {files} file(s) from {path}");
            Ok(())
        }
    }
}

/// Write `path` of `b` (a file, or a directory and everything below it) to `out` as a tar
/// archive; returns the regular files written.
pub fn export_tar(b: &Browser, path: &str, out: impl Write) -> Result<u64> {
    let mut tar = tar::Builder::new(out);
    let base = path_base(path)?;
    let mut files = 0u64;
    b.walk(path, &mut |e, r| {
        let name = relative(&base, e);
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(u64::from(e.uid));
        h.set_gid(u64::from(e.gid));
        h.set_mtime(e.mtime);
        match (e.kind, r) {
            (Kind::Dir, _) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, name.as_path(), std::io::empty())?;
            }
            (Kind::File, Some(r)) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                tar.append_data(&mut h, name.as_path(), r)
                    .with_context(|| format!("{}: reading or writing", e.path))?;
                files += 1;
            }
            (Kind::Symlink, _) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                let target = e.link_raw.clone().unwrap_or_default();
                tar.append_link(
                    &mut h,
                    name.as_path(),
                    Path::new(std::ffi::OsStr::from_bytes(&target)),
                )?;
            }
            _ => eprintln!(
                "appliance: {}: not a file, directory or link: left out",
                e.path
            ),
        }
        Ok(())
    })?;
    let mut out = tar.into_inner().context("finishing the archive")?;
    out.flush().context("writing the archive")?;
    Ok(files)
}

/// The index, byte range and filesystem of partition `partition` of disk `disk` (default: the
/// only ext, XFS or NTFS one).
pub fn place(
    snap: &Snapshot,
    disk: u32,
    partition: Option<u32>,
) -> Result<(&snapshot::ChunkIndex, u64, u64, snapshot::fs::FsKind, u32)> {
    let at = Where { disk, partition };
    let disks = &snap.manifest.disks;
    let Some(d) = disks.get(at.disk as usize) else {
        bail!(
            "the snapshot has {} disk(s); there is no disk {}",
            disks.len(),
            at.disk
        );
    };
    let with_fs: Vec<_> = d.partitions.iter().filter(|p| p.fs.is_some()).collect();
    let p = match at.partition {
        Some(n) => d
            .partitions
            .iter()
            .find(|p| p.number == n)
            .with_context(|| format!("disk {} has no partition {n}", at.disk))?,
        None => {
            let browsable: Vec<_> = with_fs
                .iter()
                .filter(|p| {
                    matches!(
                        p.fs.as_ref().map(|f| f.kind),
                        Some(
                            snapshot::fs::FsKind::Ext2
                                | snapshot::fs::FsKind::Ext3
                                | snapshot::fs::FsKind::Ext4
                                | snapshot::fs::FsKind::Xfs
                                | snapshot::fs::FsKind::Ntfs
                        )
                    )
                })
                .collect();
            match browsable.as_slice() {
                [p] => **p,
                _ => bail!(
                    "name a partition (--partition N); disk {} has: {}",
                    at.disk,
                    with_fs
                        .iter()
                        .map(|p| format!(
                            "{} ({})",
                            p.number,
                            format!("{:?}", p.fs.as_ref().map(|f| f.kind).expect("fs"))
                                .to_lowercase()
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    let Some(fs) = &p.fs else {
        bail!(
            "disk {} partition {}: no filesystem was recognised in it",
            at.disk,
            p.number
        );
    };
    Ok((
        &snap.indexes[at.disk as usize],
        p.offset,
        p.size,
        fs.kind,
        p.number,
    ))
}

struct Where {
    disk: u32,
    partition: Option<u32>,
}

fn sink(output: Option<&Path>) -> Result<Box<dyn Write>> {
    Ok(match output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

/// The directory an export's names are relative to: the parent of what is exported.
fn path_base(path: &str) -> Result<String> {
    let parts = snapshot::browse::components(path)?;
    Ok(format!(
        "/{}",
        parts[..parts.len().saturating_sub(1)].join("/")
    ))
}

/// The archive name of `e`: its path below `base`, never absolute, never with `..` (the names
/// come from directory entries, which hold neither `/` nor `..`).
fn relative(base: &str, e: &Entry) -> std::path::PathBuf {
    let rel = e
        .path
        .strip_prefix(base)
        .unwrap_or(&e.path)
        .trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    std::path::PathBuf::from(rel)
}

fn line(e: &Entry) -> String {
    let t = match e.kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::File => '-',
        Kind::Other => '?',
    };
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.mtime),
    );
    let link = e
        .link
        .as_ref()
        .map(|l| format!(" -> {l}"))
        .unwrap_or_default();
    format!(
        "{t}{:04o} {:>6} {:>6} {:>12} {when} {}{link}",
        e.mode, e.uid, e.gid, e.size, e.name
    )
}
