//! Reproduce a disk's bytes from a snapshot: fetch the chunks of its slots with many requests in
//! flight, verify each, and hand the bytes to a writer. Identical chunks are fetched once; zero
//! and unused slots are never fetched. The failover VM's disk and the restorer's shrink path read
//! through [`fetch_chunks`]; the restorer's write pipeline has its own jobs (zero runs, masks) over
//! the same [`fetch_chunk`] and [`crate::threads::par_each`].

use crate::format::index::{ChunkIndex, Slot};
use crate::format::Digest;
use crate::store::{fetch_chunk, Store};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

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
    crate::threads::par_each(
        threads,
        "fetch",
        jobs.len(),
        || (),
        |_, k| {
            let (d, slots) = &jobs[k];
            let (bytes, _) = fetch_chunk(store, d)?;
            on_chunk(slots, &bytes)
        },
    )
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
