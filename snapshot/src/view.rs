//! A read-only block view of one disk of a snapshot: reads are served from the chunks of its
//! slots, fetched (and verified) on first use and kept in a small cache, so a filesystem reader
//! can walk a snapshot without restoring the disk. Unused and zero slots read as zeros.

use crate::format::index::{ChunkIndex, Slot};
use crate::source::ReadAt;
use crate::store::{fetch_chunk, Store};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

/// Chunks kept in memory (4 MiB each).
const CACHED: usize = 16;

pub struct SnapshotView<'a> {
    store: &'a dyn Store,
    index: &'a ChunkIndex,
    size: u64,
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

impl<'a> SnapshotView<'a> {
    pub fn new(store: &'a dyn Store, index: &'a ChunkIndex, size: u64) -> SnapshotView<'a> {
        SnapshotView {
            store,
            index,
            size,
            cache: Mutex::new(VecDeque::new()),
        }
    }

    fn chunk(&self, i: usize) -> io::Result<Option<Arc<Vec<u8>>>> {
        let Slot::Data(d) = self.index.slot(i) else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = cache.iter().position(|(s, _)| *s == i) {
            let hit = cache.remove(pos).expect("position found");
            let data = hit.1.clone();
            cache.push_front(hit);
            return Ok(Some(data));
        }
        drop(cache);
        let data = Arc::new(
            fetch_chunk(self.store, &d)
                .map_err(|e| io::Error::other(format!("slot {i}: {e:#}")))?
                .0,
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_front((i, data.clone()));
        cache.truncate(CACHED);
        Ok(Some(data))
    }
}

impl ReadAt for SnapshotView<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "read past the disk's end")
            })?;
        let mut pos = offset;
        while pos < end {
            let i = (pos / crate::CHUNK_SIZE) as usize;
            let (s, len) = self.index.span(i);
            let n = (s + len).min(end) - pos;
            let dst = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            match self.chunk(i)? {
                Some(data) => {
                    let from = (pos - s) as usize;
                    let src = data.get(from..from + n as usize).ok_or_else(|| {
                        io::Error::other(format!("slot {i}: chunk shorter than its slot"))
                    })?;
                    dst.copy_from_slice(src);
                }
                None => dst.fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}
