//! Reproduce a disk's bytes from a snapshot: fetch the chunks of its slots with many requests in
//! flight, verify each, and hand the bytes to a writer. Identical chunks are fetched once; zero
//! and unused slots are never fetched. The restorer's write pipeline is built on [`fetch_chunks`].

use crate::format::index::{ChunkIndex, Slot};
use crate::format::Digest;
use crate::store::{fetch_chunk, Store};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// The distinct chunks of `index` (restricted to `wanted` slots), each with every slot that holds it,
/// in disk order of first appearance.
pub fn plan_fetches(
    index: &ChunkIndex,
    wanted: impl Fn(usize) -> bool,
) -> Vec<(Digest, Vec<usize>)> {
    let mut order: Vec<(Digest, Vec<usize>)> = Vec::new();
    let mut pos: HashMap<Digest, usize> = HashMap::new();
    for (i, slot) in index.slots() {
        if let Slot::Data(d) = slot {
            if !wanted(i) {
                continue;
            }
            match pos.get(&d) {
                Some(&p) => order[p].1.push(i),
                None => {
                    pos.insert(d, order.len());
                    order.push((d, vec![i]));
                }
            }
        }
    }
    order
}

/// Receives each verified chunk with the slots that hold it.
pub type OnChunk<'a> = dyn Fn(&[usize], &[u8]) -> Result<()> + Sync + 'a;

/// Fetch and verify every chunk of `jobs` on `threads` threads; `on_chunk(slots, bytes)` runs on the
/// fetching thread (so writes happen in parallel too). The first error stops the others.
pub fn fetch_chunks(
    store: &dyn Store,
    jobs: &[(Digest, Vec<usize>)],
    threads: usize,
    on_chunk: &OnChunk,
) -> Result<()> {
    let next = Mutex::new(0usize);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        let (next, failed) = (&next, &failed);
        let started = crate::threads::start_scoped(s, threads.max(1), "fetch", |_| {
            move || loop {
                let k = {
                    let mut n = next.lock().expect("lock");
                    if *n >= jobs.len() || failed.lock().expect("lock").is_some() {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                let (d, slots) = &jobs[k];
                let r = fetch_chunk(store, d).and_then(|bytes| on_chunk(slots, &bytes));
                if let Err(e) = r {
                    failed.lock().expect("lock").get_or_insert(e);
                    return;
                }
            }
        });
        // The threads already started see the error and stop.
        if let Err(e) = started {
            failed.lock().expect("lock").get_or_insert(e);
        }
    });
    match failed.into_inner().expect("lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Write the disk of `index` into `out` (a file or device of at least the disk's size): data
/// chunks and zero slots are written; unused slots are left as they are (holes in a new file).
pub fn read_disk(store: &dyn Store, index: &ChunkIndex, out: &File, threads: usize) -> Result<()> {
    let zeros = vec![0u8; crate::CHUNK_SIZE as usize];
    for (i, slot) in index.slots() {
        if slot == Slot::Zeros {
            let (off, len) = index.span(i);
            out.write_all_at(&zeros[..len as usize], off)
                .with_context(|| format!("writing at offset {off}"))?;
        }
    }
    let jobs = plan_fetches(index, |_| true);
    fetch_chunks(store, &jobs, threads, &|slots, bytes| {
        for &i in slots {
            let (off, _) = index.span(i);
            out.write_all_at(bytes, off)
                .with_context(|| format!("writing at offset {off}"))?;
        }
        Ok(())
    })
}
