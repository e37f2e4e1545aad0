//! Applying a plan (hives edited on a copy, checked, written in place; files copied with their
//! originals kept) and rolling back from the record.

use super::plan::*;
use super::*;
use crate::windows::hive::{Data, Edit, Hive};
use crate::windows::offline::WindowsVolume;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file beside it.
pub(super) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".bmr-tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// A value read back after a merge: key, name, data (None: absent).
pub(super) type Expected = (String, String, Option<Data>);

/// Edits `hive` through a copy: merge, check every value by reading the copy back, then write
/// the copy's bytes over the hive in place (its NTFS security descriptor is kept).
pub(super) fn edit_hive(
    vol: &WindowsVolume,
    h: HiveName,
    edits: &[Edit],
    expect: &[Expected],
) -> Result<()> {
    if edits.is_empty() {
        return Ok(());
    }
    let hive = hive_of(vol, h);
    let staging = vol.windows.join(STAGING);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let tmp = staging.join(format!("{}.bmr-tmp", h.file()));
    std::fs::copy(&hive.path, &tmp)
        .with_context(|| format!("copying {} to {}", hive.path.display(), tmp.display()))?;
    let work = Hive::new(&tmp, &hive.prefix);
    let result = merge_checked(&work, h, edits, expect, &hive.path);
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Merges into the working copy, reads every expected value back from it, then writes its
/// bytes over `target`.
pub(super) fn merge_checked(
    work: &Hive,
    h: HiveName,
    edits: &[Edit],
    expect: &[Expected],
    target: &Path,
) -> Result<()> {
    work.merge(edits)
        .with_context(|| format!("editing the {} hive", h.file()))?;
    for (key, name, want) in expect {
        let got = work.value(key, name)?;
        if &got != want {
            bail!(
                "{}\\{key} value {name:?}: read back {got:?} after the merge, expected {want:?}",
                h.file()
            );
        }
    }
    let bytes =
        std::fs::read(&work.path).with_context(|| format!("reading {}", work.path.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(target)
        .with_context(|| format!("opening {} for writing", target.display()))?;
    std::io::Write::write_all(&mut f, &bytes)
        .with_context(|| format!("writing {}", target.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", target.display()))
}

/// Applies `plan` (from [`plan`] on this volume): files first, then each hive, then the record
/// (appended to `Windows/bmr-drivers/record.json`). The first time a hive is edited its
/// original bytes are kept in `Windows/bmr-drivers/originals/`.
pub fn apply(vol: &WindowsVolume, plan: &Plan) -> Result<()> {
    if plan.is_empty() {
        return Ok(());
    }
    let root = &vol.root;
    for f in &plan.files {
        let dest = root.join(&f.path);
        if let Some(o) = &f.original {
            let keep = root.join(o);
            if !keep.exists() {
                if let Some(d) = keep.parent() {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("creating {}", d.display()))?;
                }
                std::fs::copy(&dest, &keep)
                    .with_context(|| format!("keeping the original of {}", f.path))?;
            }
        }
        match &f.source {
            Source::Copy(src) => {
                let b = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                write_file(&dest, &b)?;
            }
            Source::Text(t) => write_file(&dest, t.as_bytes())?,
        }
    }
    for h in [HiveName::System, HiveName::Software] {
        let mut edits: Vec<Edit> = plan
            .keys_created
            .iter()
            .filter(|k| k.hive == h)
            .map(|k| Edit::Key { key: k.key.clone() })
            .collect();
        let mut expect = Vec::new();
        for w in plan.registry.iter().filter(|w| w.hive == h) {
            edits.push(Edit::Set {
                key: w.key.clone(),
                name: w.name.clone(),
                data: w.data.clone(),
            });
            expect.push((w.key.clone(), w.name.clone(), Some(w.data.clone())));
        }
        if edits.is_empty() {
            continue;
        }
        let keep = vol.windows.join(STAGING).join("originals").join(h.file());
        if !keep.exists() {
            if let Some(d) = keep.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            std::fs::copy(&hive_of(vol, h).path, &keep)
                .with_context(|| format!("keeping the original {} hive", h.file()))?;
        }
        edit_hive(vol, h, &edits, &expect)?;
    }
    let mut record = read_record(vol)?;
    record.push(plan.clone());
    let json = serde_json::to_vec_pretty(&record).context("encoding the record")?;
    write_file(&vol.windows.join(STAGING).join(RECORD), &json)
}

/// Undoes every recorded injection, newest first: values back to their originals (or
/// deleted), created keys deleted, replaced files restored from `originals/`, new files
/// removed. The record is renamed `record.rolled-back.json`. Returns the plans undone.
pub fn rollback(vol: &WindowsVolume) -> Result<Vec<Plan>> {
    let record = read_record(vol)?;
    let root = &vol.root;
    for plan in record.iter().rev() {
        for h in [HiveName::System, HiveName::Software] {
            let mut edits = Vec::new();
            let mut expect = Vec::new();
            for w in plan.registry.iter().rev().filter(|w| w.hive == h) {
                edits.push(match &w.original {
                    Some(d) => Edit::Set {
                        key: w.key.clone(),
                        name: w.name.clone(),
                        data: d.clone(),
                    },
                    None => Edit::Delete {
                        key: w.key.clone(),
                        name: w.name.clone(),
                    },
                });
                let created = plan
                    .keys_created
                    .iter()
                    .any(|k| k.hive == h && k.key.eq_ignore_ascii_case(&w.key));
                if !created {
                    expect.push((w.key.clone(), w.name.clone(), w.original.clone()));
                }
            }
            for k in plan.keys_created.iter().rev().filter(|k| k.hive == h) {
                edits.push(Edit::DeleteKey { key: k.key.clone() });
            }
            edit_hive(vol, h, &edits, &expect)?;
        }
        for f in plan.files.iter().rev() {
            let dest = root.join(&f.path);
            match &f.original {
                Some(o) => {
                    let b = std::fs::read(root.join(o))
                        .with_context(|| format!("reading the original of {} ({o})", f.path))?;
                    write_file(&dest, &b)?;
                }
                None => match std::fs::remove_file(&dest) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", f.path));
                    }
                    _ => {}
                },
            }
        }
    }
    let rec = vol.windows.join(STAGING).join(RECORD);
    if rec.exists() {
        std::fs::rename(
            &rec,
            vol.windows.join(STAGING).join("record.rolled-back.json"),
        )
        .with_context(|| format!("renaming {}", rec.display()))?;
    }
    Ok(record)
}
