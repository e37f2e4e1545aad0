//! Turn a disk into chunks: read the used ranges of each 4 MiB slot (free space stays zero), hash,
//! skip what the store already has, compress and store the rest. Shared by `appliance ingest`
//! and `restorer capture`; only the [`ChunkSink`] differs.
//!
//! One reader thread issues large positional reads in disk order; worker threads hash and
//! compress. Memory is bounded by the channel depth: about (2 x workers + 2) x 4 MiB.

use crate::extents::Extents;
use crate::format::index::{ChunkIndex, Slot};
use crate::format::Digest;
use crate::source::ReadAt;
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What a sink holds of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Absent,
    /// Present and intact, with the blob's size.
    Intact(u64),
    /// Present but not the chunk (truncated, bad header, content differs): to be rewritten.
    Damaged(String),
}

/// Where chunks go: a local store, or the appliance's upload API.
pub trait ChunkSink: Sync {
    /// Size of the stored blob if the store already has this chunk.
    fn has(&self, d: &Digest) -> Result<Option<u64>>;
    /// Store a blob (already checked to decode to `d`).
    fn put(&self, d: &Digest, blob: Vec<u8>) -> Result<()>;
    /// Whether the sink holds `d` intact, given the chunk's bytes (`data` hashes to `d`). A chunk
    /// file is never trusted by its name alone where it can be checked; the default trusts
    /// [`ChunkSink::has`] (the upload API checks on its side).
    fn check(&self, d: &Digest, data: &[u8]) -> Result<Held> {
        let _ = data;
        Ok(match self.has(d)? {
            Some(size) => Held::Intact(size),
            None => Held::Absent,
        })
    }
    /// Rewrite a damaged blob (atomically where the sink can).
    fn replace(&self, d: &Digest, blob: Vec<u8>) -> Result<()> {
        self.put(d, blob)
    }
}

impl ChunkSink for crate::store::LocalStore {
    fn has(&self, d: &Digest) -> Result<Option<u64>> {
        Ok(std::fs::metadata(self.chunk_file(d)).ok().map(|m| m.len()))
    }
    fn put(&self, d: &Digest, blob: Vec<u8>) -> Result<()> {
        self.insert_chunk(d, &blob).map(|_| ())
    }
    /// The stored blob is read and decoded, and its bytes compared with `data`: the full check
    /// `appliance verify` makes, at the cost of a decompression (no second hash, no compression).
    fn check(&self, d: &Digest, data: &[u8]) -> Result<Held> {
        let path = self.chunk_file(d);
        let blob = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Held::Absent),
            Err(e) => return Ok(Held::Damaged(format!("unreadable: {e}"))),
        };
        Ok(match crate::format::blob::decode_unverified(&blob, d) {
            Ok(stored) if stored == data => Held::Intact(blob.len() as u64),
            Ok(_) => Held::Damaged(format!("chunk {d}: content differs from its digest")),
            Err(e) => Held::Damaged(e.to_string()),
        })
    }
    fn replace(&self, d: &Digest, blob: Vec<u8>) -> Result<()> {
        self.replace_chunk(d, &blob)
    }
}

#[derive(Debug, Clone)]
pub struct ChunkOptions {
    pub workers: usize,
    pub zstd_level: i32,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        ChunkOptions {
            workers,
            zstd_level: 4, // measured: same wall time as 3, stores less (docs/benchmarks.md)
        }
    }
}

/// What chunking one disk did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChunkStats {
    pub disk_size: u64,
    pub used_bytes: u64,
    pub bytes_read: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub unused_chunks: u64,
    /// Chunks this run stored because the store lacked them, and their blob bytes.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Chunks the store had damaged (truncated, corrupt) and this run rewrote from the source.
    pub repaired_chunks: u64,
    /// Blob bytes of every distinct chunk this disk references.
    pub referenced_bytes: u64,
}

/// Gaps between used ranges smaller than this are read and zeroed rather than skipped: one large
/// read beats many small ones.
const MERGE_GAP: u64 = 256 << 10;

/// Chunk `dev`, keeping only `used` (byte ranges of the disk). `progress` gets bytes of disk done.
pub fn chunk_disk(
    dev: &dyn ReadAt,
    used: &Extents,
    sink: &dyn ChunkSink,
    opts: &ChunkOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(ChunkIndex, ChunkStats)> {
    let mut index = ChunkIndex::new(dev.size());
    let n = index.len();
    let read = AtomicU64::new(0);
    let seen = Mutex::new(HashSet::new());
    let stats = Mutex::new(ChunkStats {
        disk_size: dev.size(),
        used_bytes: used.len(),
        ..Default::default()
    });
    let (work_tx, work_rx) = crossbeam_channel::bounded::<(usize, Vec<u8>)>(opts.workers + 1);
    // Buffers circulate reader -> worker -> pool -> reader: no 4 MiB allocation (and its page
    // faults) per chunk.
    let (pool_tx, pool_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    let (done_tx, done_rx) =
        crossbeam_channel::bounded::<Result<(usize, Slot)>>(opts.workers * 2 + 2);
    let spans: Vec<(u64, u64)> = (0..n).map(|i| index.span(i)).collect();

    std::thread::scope(|s| -> Result<()> {
        let (seen, stats) = (&seen, &stats);
        // On a refusal, returning drops the senders and receivers this closure owns: the threads
        // already started stop at their next receive or send.
        crate::threads::start_scoped(s, opts.workers, "chunker", |_| {
            let (work_rx, done_tx, pool_tx) = (work_rx.clone(), done_tx.clone(), pool_tx.clone());
            move || {
                for (i, buf) in work_rx {
                    let r = store_chunk(&buf, sink, opts, seen, stats);
                    let _ = pool_tx.send(buf);
                    let r = r.with_context(|| {
                        format!("chunk {i} at offset {}", i as u64 * crate::CHUNK_SIZE)
                    });
                    if done_tx.send(r.map(|slot| (i, slot))).is_err() {
                        return;
                    }
                }
            }
        })?;
        drop(work_rx);
        // Reader: slots in disk order, only the used ranges.
        {
            let done_tx = done_tx.clone();
            let (spans, read) = (&spans, &read);
            let reader = move || {
                for (i, &(off, len)) in spans.iter().enumerate() {
                    // An unused slot takes no buffer: a 4 TiB disk with a little data is a
                    // million of them, and zero-filling 4 MiB for each took minutes.
                    if used.within(off, off + len).next().is_none() {
                        if done_tx.send(Ok((i, Slot::Unused))).is_err() {
                            return;
                        }
                        continue;
                    }
                    let mut buf = pool_rx.try_recv().unwrap_or_default();
                    buf.resize(len as usize, 0);
                    let r = read_slot(dev, used, off, &mut buf, read).map(|any| any.then_some(buf));
                    let sent = match r {
                        Ok(None) => done_tx.send(Ok((i, Slot::Unused))).is_ok(),
                        Ok(Some(buf)) => work_tx.send((i, buf)).is_ok(),
                        Err(e) => {
                            let _ = done_tx.send(Err(e));
                            false
                        }
                    };
                    if !sent {
                        return;
                    }
                }
            };
            crate::threads::start_one_scoped(s, "disk reader", reader)?;
        }
        drop(done_tx);
        let mut done_bytes = 0;
        for r in done_rx.iter() {
            // On the first error, returning drops the receiver: the reader and workers stop at
            // their next send.
            let (i, slot) = r?;
            index.set(i, slot);
            done_bytes += spans[i].1;
            progress(done_bytes);
        }
        Ok(())
    })?;
    let mut stats = stats.into_inner().expect("no worker panicked");
    stats.bytes_read = read.load(Ordering::Relaxed);
    for (_, slot) in index.slots() {
        match slot {
            Slot::Unused => stats.unused_chunks += 1,
            Slot::Zeros => stats.zero_chunks += 1,
            Slot::Data(_) => stats.data_chunks += 1,
        }
    }
    Ok((index, stats))
}

/// Read the used ranges of the slot at `off` into `buf` (its length is the slot's), zeroing the
/// rest; `false` when nothing in it is used.
fn read_slot(
    dev: &dyn ReadAt,
    used: &Extents,
    off: u64,
    buf: &mut [u8],
    read: &AtomicU64,
) -> Result<bool> {
    let len = buf.len() as u64;
    let ranges: Vec<(u64, u64)> = used.within(off, off + len).collect();
    if ranges.is_empty() {
        return Ok(false);
    }
    let mut filled = 0; // bytes of `buf` that hold this slot's data or zeros
    let mut k = 0;
    while k < ranges.len() {
        let (start, mut end) = ranges[k];
        let mut j = k + 1;
        while j < ranges.len() && ranges[j].0 - end < MERGE_GAP {
            end = ranges[j].1;
            j += 1;
        }
        let (s, e) = ((start - off) as usize, (end - off) as usize);
        buf[filled..s].fill(0);
        dev.read_at(&mut buf[s..e], start)
            .with_context(|| format!("reading {} bytes at offset {start}", end - start))?;
        read.fetch_add(end - start, Ordering::Relaxed);
        // Zero the free gaps that the merged read pulled in.
        for w in ranges[k..j].windows(2) {
            buf[(w[0].1 - off) as usize..(w[1].0 - off) as usize].fill(0);
        }
        filled = e;
        k = j;
    }
    buf[filled..].fill(0);
    Ok(true)
}

fn store_chunk(
    buf: &[u8],
    sink: &dyn ChunkSink,
    opts: &ChunkOptions,
    seen: &Mutex<HashSet<Digest>>,
    stats: &Mutex<ChunkStats>,
) -> Result<Slot> {
    if is_zero(buf) {
        return Ok(Slot::Zeros);
    }
    let d = Digest::of(buf);
    if !seen.lock().expect("lock").insert(d) {
        return Ok(Slot::Data(d));
    }
    let size = match sink.check(&d, buf)? {
        Held::Intact(size) => size,
        Held::Absent => {
            let blob = crate::encode_chunk(buf, opts.zstd_level);
            let size = blob.len() as u64;
            sink.put(&d, blob)?;
            let mut st = stats.lock().expect("lock");
            st.new_chunks += 1;
            st.new_bytes += size;
            size
        }
        Held::Damaged(_) => {
            let blob = crate::encode_chunk(buf, opts.zstd_level);
            let size = blob.len() as u64;
            sink.replace(&d, blob)?;
            stats.lock().expect("lock").repaired_chunks += 1;
            size
        }
    };
    stats.lock().expect("lock").referenced_bytes += size;
    Ok(Slot::Data(d))
}

/// Whether every byte is zero (folded 64 bytes at a time so the compiler vectorises it).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    blocks.all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}
