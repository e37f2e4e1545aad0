//! `appliance verify`: follow the trust chain of the chosen snapshots (signature, index hashes)
//! and re-hash every chunk they reach, each distinct chunk once. Every problem names the chunk and
//! the snapshots it breaks.
//!
//! `--repair` heals what it found: a damaged chunk is rewritten (atomically) when one of the
//! `--source` images holds it (the source is chunked exactly as ingest does, and only the damaged
//! chunks are written); a damaged chunk without a correct copy is moved to
//! `private/quarantine/`, so that it counts as missing and the next ingest or upload of that data
//! stores it again. What stays broken is listed with the snapshots it breaks.

use crate::cli::VerifyArgs;
use anyhow::{bail, Context, Result};
use snapshot::chunker::{chunk_disk, ChunkOptions, ChunkSink, Held};
use snapshot::format::index::Slot;
use snapshot::layout::analyze;
use snapshot::store::{open_snapshot, LocalStore};
use snapshot::Digest;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

pub fn run(a: &VerifyArgs) -> Result<()> {
    let store = LocalStore::open(&a.store)?;
    let key = store.public_key()?;
    let hosts = match &a.host {
        Some(h) => vec![h.clone()],
        None => store.hosts()?,
    };
    let started = Instant::now();
    let mut problems: Vec<String> = Vec::new();
    // digest -> the snapshots (and disks) that reference it
    let mut users: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let mut snapshots = 0;
    for host in &hosts {
        let ids = match &a.snapshot {
            Some(id) => vec![id.clone()],
            None => store.snapshots(host)?,
        };
        for id in ids {
            snapshots += 1;
            match open_snapshot(&store, host, Some(&id), Some(&key)) {
                Err(e) => problems.push(format!("snapshot {host}/{id}: {e:#}")),
                Ok(snap) => {
                    for (n, idx) in snap.indexes.iter().enumerate() {
                        for (_, slot) in idx.slots() {
                            if let Slot::Data(d) = slot {
                                let who = format!("{host}/{id} disk {n}");
                                let v = users.entry(d).or_default();
                                if v.last() != Some(&who) {
                                    v.push(who);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let digests: Vec<Digest> = users.keys().copied().collect();
    let bad = Mutex::new(Vec::new());
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let pb = crate::progress::bar(digests.len() as u64, "verify");
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:<12} [{bar:30}] {pos}/{len} chunks eta {eta}",
        )
        .expect("valid template"),
    );
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    snapshot::threads::par_each(
        threads,
        "verify",
        digests.len(),
        || (),
        |_, i| {
            let d = &digests[i];
            let path = store.chunk_file(d);
            let verdict = match std::fs::read(&path) {
                Ok(blob) => {
                    bytes.fetch_add(blob.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    snapshot::decode_chunk(&blob, d)
                        .err()
                        .map(|e| format!("corrupt {e}"))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Some(format!("missing chunk {d}"))
                }
                Err(e) => Some(format!("unreadable chunk {d}: {}: {e}", path.display())),
            };
            if let Some(v) = verdict {
                bad.lock().expect("lock").push((*d, v));
            }
            pb.inc(1);
            Ok(())
        },
    )?;
    pb.finish_and_clear();
    let mut bad = bad.into_inner().expect("lock");
    bad.sort();
    let mut repaired = 0;
    if a.repair {
        repaired = repair(&store, a, &mut bad)?;
    }
    for (d, v) in bad {
        problems.push(format!("{v}; breaks {}", users[&d].join(", ")));
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = bytes.into_inner();
    if a.json {
        let v = serde_json::json!({"snapshots": snapshots, "chunks": digests.len(), "bytes": bytes, "seconds": secs, "repaired": repaired, "problems": problems});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for p in &problems {
            println!("{p}");
        }
        if a.repair {
            println!(
                "repaired {repaired} damaged chunks from {} sources",
                a.source.len()
            );
        }
        println!(
            "verified {snapshots} snapshots, {} chunks ({}) in {secs:.1}s ({:.0} MB/s): {}",
            digests.len(),
            crate::list::human(bytes),
            crate::progress::mbps(bytes, secs),
            if problems.is_empty() {
                "all good".to_string()
            } else {
                format!("{} problems", problems.len())
            }
        );
    }
    if !problems.is_empty() {
        bail!("verify found {} problems", problems.len());
    }
    Ok(())
}

/// Takes the damaged chunks a source holds, and nothing else (every other digest reads as
/// present, so nothing else is written).
struct RepairSink<'a> {
    store: &'a LocalStore,
    wanted: &'a HashSet<Digest>,
    done: Mutex<HashSet<Digest>>,
}

impl ChunkSink for RepairSink<'_> {
    fn has(&self, d: &Digest) -> Result<Option<u64>> {
        Ok((!self.wanted.contains(d)).then_some(0))
    }
    fn put(&self, d: &Digest, blob: Vec<u8>) -> Result<()> {
        self.replace(d, blob)
    }
    fn check(&self, d: &Digest, _data: &[u8]) -> Result<Held> {
        let done = self.done.lock().expect("lock").contains(d);
        Ok(if self.wanted.contains(d) && !done {
            Held::Damaged("damaged in the store".into())
        } else {
            Held::Intact(0)
        })
    }
    fn replace(&self, d: &Digest, blob: Vec<u8>) -> Result<()> {
        self.store.replace_chunk(d, &blob)?;
        self.done.lock().expect("lock").insert(*d);
        Ok(())
    }
}

/// Rewrite the chunks of `bad` that the sources hold, quarantine the corrupt rest; `bad` keeps
/// what is still broken. Returns how many were rewritten.
fn repair(store: &LocalStore, a: &VerifyArgs, bad: &mut Vec<(Digest, String)>) -> Result<usize> {
    let _writer = store.writer()?;
    let wanted: HashSet<Digest> = bad.iter().map(|(d, _)| *d).collect();
    let sink = RepairSink {
        store,
        wanted: &wanted,
        done: Mutex::new(HashSet::new()),
    };
    if !wanted.is_empty() {
        for (n, path) in a.source.iter().enumerate() {
            let opened = crate::images::open(path, &store.root().join("tmp"))?;
            let dev = &opened.disk;
            let layout = analyze(dev, dev.device_sectors, false)
                .with_context(|| format!("source {n} ({})", path.display()))?;
            chunk_disk(dev, &layout.used, &sink, &ChunkOptions::default(), &|_| {})
                .with_context(|| format!("source {n} ({})", path.display()))?;
        }
    }
    let done = sink.done.into_inner().expect("lock");
    // What was rewritten is checked again like everything else.
    let mut still = Vec::new();
    for (d, why) in bad.drain(..) {
        let intact = done.contains(&d)
            && std::fs::read(store.chunk_file(&d))
                .ok()
                .is_some_and(|b| snapshot::decode_chunk(&b, &d).is_ok());
        if intact {
            continue;
        }
        if store.chunk_file(&d).exists() {
            let to = store.quarantine_chunk(&d)?;
            still.push((d, format!("{why} (moved to {})", to.display())));
        } else {
            still.push((d, why));
        }
    }
    let repaired = wanted.len() - still.len();
    *bad = still;
    Ok(repaired)
}
