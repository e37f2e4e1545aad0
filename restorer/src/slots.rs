//! Reading a target back slot by slot and comparing it with a chunk index: the resume check of a
//! restore, the comparison of a failback's first round and its final verification all run here,
//! on [`snapshot::threads::par_each`].

use crate::dio::{AlignedBuf, Disk};
use anyhow::Result;
use snapshot::threads::{on_a_core, par_each};
use snapshot::{ChunkIndex, Slot, CHUNK_SIZE};
use std::sync::Mutex;

/// A buffer for one slot read through O_DIRECT (a chunk plus the widening on both sides).
pub fn slot_buf() -> AlignedBuf {
    AlignedBuf::new(CHUNK_SIZE as usize + 8192)
}

/// Read slot `i` of `disk` into `buf` (from [`slot_buf`]) and return the slot's bytes within it.
pub fn read_slot<'b>(
    disk: &Disk,
    index: &ChunkIndex,
    i: usize,
    buf: &'b mut AlignedBuf,
) -> Result<&'b [u8]> {
    let (off, len) = index.span(i);
    disk.read_span(off, len, buf)
}

/// Read `slots` of `disk` on up to `threads` threads and hash each against `index`; then
/// `then(state, slot, same)` runs on the same thread (a differing slot can be fetched and
/// written while other threads go on reading). `init` makes each thread's state. A slot that is
/// a hole of a target file is not read: it holds zeros.
pub fn read_back_each<S>(
    disk: &Disk,
    index: &ChunkIndex,
    slots: &[usize],
    threads: usize,
    init: impl Fn() -> S + Sync,
    then: impl Fn(&mut S, usize, bool) -> Result<()> + Sync,
) -> Result<()> {
    par_each(
        threads,
        "reader",
        slots.len(),
        || (slot_buf(), init()),
        |(buf, state), k| {
            let i = slots[k];
            let (off, len) = index.span(i);
            let same = if disk.is_hole(off, len) {
                // An index records every all-zero slot as zeros, never as data.
                !matches!(index.slot(i), Slot::Data(_))
            } else {
                let bytes = read_slot(disk, index, i, buf)?;
                on_a_core(|| index.holds(i, bytes))
            };
            then(state, i, same)
        },
    )
}

/// Read `slots` back and return `(matching, differing)`, each in slot order.
pub fn read_back(
    disk: &Disk,
    index: &ChunkIndex,
    slots: &[usize],
    threads: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let found = Mutex::new((Vec::new(), Vec::new()));
    read_back_each(
        disk,
        index,
        slots,
        threads,
        || (),
        |_, i, same| {
            let mut f = found.lock().expect("lock");
            if same { &mut f.0 } else { &mut f.1 }.push(i);
            Ok(())
        },
    )?;
    let (mut same, mut differ) = found.into_inner().expect("lock");
    same.sort_unstable();
    differ.sort_unstable();
    Ok((same, differ))
}
