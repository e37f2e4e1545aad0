//! `appliance gc`: remove the chunks no snapshot references, and leftovers of killed writers in
//! `tmp/`. Runs only while no ingest or upload holds the writer lock, so it never removes a chunk
//! that a writer has found present and is about to reference. If any snapshot cannot be read, gc
//! stops without deleting anything: an unreadable index must not turn its chunks into garbage.

use crate::cli::GcArgs;
use anyhow::{bail, Context, Result};
use snapshot::format::index::Slot;
use snapshot::round::Round;
use snapshot::store::{open_snapshot, LocalStore};
use snapshot::{ChunkIndex, Digest};
use std::collections::HashSet;

pub fn run(a: &GcArgs) -> Result<()> {
    let store = LocalStore::open(&a.store)?;
    let Some(_lock) = store.try_gc_lock()? else {
        bail!(
            "an ingest or upload is in progress on {}; run gc when it has finished",
            a.store.display()
        );
    };
    let mut referenced = HashSet::new();
    let mut snapshots = 0;
    for host in store.hosts()? {
        for id in store.snapshots(&host)? {
            let snap = open_snapshot(&store, &host, Some(&id), None)
                .with_context(|| format!("snapshot {host}/{id} is unreadable; gc removes nothing until it is fixed or deleted"))?;
            snapshots += 1;
            for idx in &snap.indexes {
                for (_, slot) in idx.slots() {
                    if let Slot::Data(d) = slot {
                        referenced.insert(d);
                    }
                }
            }
        }
    }
    // Failback rounds reference chunks too: a restorer may be fetching them right now.
    let rounds = failover_references(&store, &mut referenced)?;
    let (mut removed, mut freed, mut kept) = (0u64, 0u64, 0u64);
    for (d, path) in store.chunk_files()? {
        if referenced.contains(&d) {
            kept += 1;
            continue;
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if !a.dry_run {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        removed += 1;
        freed += size;
    }
    // No writer is alive (we hold the lock exclusively): whatever is in tmp/ is a leftover.
    let tmp = store.root().join("tmp");
    let mut leftovers = 0;
    for e in std::fs::read_dir(&tmp).with_context(|| format!("listing {}", tmp.display()))? {
        let p = e
            .with_context(|| format!("listing {}", tmp.display()))?
            .path();
        leftovers += 1;
        if !a.dry_run {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    println!(
        "{snapshots} snapshots and {rounds} failback rounds reference {kept} chunks; {verb} {removed} unreferenced chunks ({}) and {leftovers} leftovers in tmp/",
        crate::list::human(freed)
    );
    Ok(())
}

/// Add the chunks of every published failback round to `referenced`; returns the round count.
/// An unreadable round stops gc, like an unreadable snapshot.
fn failover_references(store: &LocalStore, referenced: &mut HashSet<Digest>) -> Result<usize> {
    let mut count = 0;
    let root = store.root().join("failover");
    for vm in names(&root)? {
        for n in names(&root.join(&vm).join("rounds"))? {
            let dir = root.join(&vm).join("rounds").join(&n);
            let json = dir.join("round.json");
            let what = || {
                format!(
                    "failback round {}; gc removes nothing until it is fixed or deleted",
                    dir.display()
                )
            };
            let bytes = std::fs::read(&json).with_context(what)?;
            let round = Round::parse(&bytes, &json.display().to_string()).with_context(what)?;
            for d in &round.disks {
                let p = dir.join(format!("disk{}.idx", d.number));
                let b = std::fs::read(&p).with_context(what)?;
                let idx = ChunkIndex::parse(&b, &p.display().to_string()).with_context(what)?;
                for (_, slot) in idx.slots() {
                    if let Slot::Data(d) = slot {
                        referenced.insert(d);
                    }
                }
            }
            count += 1;
        }
    }
    Ok(count)
}

/// Entry names of `dir`, none when it does not exist.
fn names(dir: &std::path::Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("listing {}", dir.display())),
        Ok(entries) => entries
            .map(|e| {
                Ok(e.with_context(|| format!("listing {}", dir.display()))?
                    .file_name()
                    .to_string_lossy()
                    .into_owned())
            })
            .filter(|n: &Result<String>| n.as_ref().map_or(true, |n| !n.starts_with('.')))
            .collect(),
    }
}
