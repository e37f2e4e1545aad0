//! The write pipeline of one disk, in the order it runs:
//!
//! 1. **start**: the target's table area is wiped and the in-progress marker written into it, so
//!    from the first write on the disk has no valid partition table;
//! 2. **resume check** (only when a marker was found): slots already on the target are read back
//!    and hashed; those that match are not fetched again;
//! 3. **data**: worker threads fetch each distinct chunk once, verify it, and write it to every
//!    slot that holds it with positional writes (O_DIRECT from aligned buffers on block devices);
//!    zero slots are discarded or zeroed by the device, unused slots skipped. Bytes that belong to
//!    the table area (held back) or to where the source kept its table are masked out;
//! 4. **table**: after an fsync, the held-back bytes (the data that was there, with the target's
//!    table patched over it) are written, the sector holding the marker last; fsync again.
//!
//! A crash at any step leaves a disk without a valid table; a rerun finds the marker and resumes.
//!
//! The writer takes a [`Layout`] (masks, marker, slot order) rather than the whole plan, so
//! failback writes through it too ([`Layout::plain`]).

use crate::dio::{AlignedBuf, Disk};
use crate::marker::{self, Marker};
use crate::plan::DiskPlan;
use crate::slots::read_back_each;
use anyhow::{anyhow, Context, Result};
use indicatif::ProgressBar;
use snapshot::store::{fetch_chunk_into, Store};
use snapshot::threads::par_each;
use snapshot::{ChunkIndex, Digest, Extents, Slot, CHUNK_SIZE};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Zero slots are merged into runs of at most this many bytes per job.
const ZERO_RUN: u64 = 256 << 20;

#[derive(Default)]
pub struct Counters {
    pub fetched_bytes: AtomicU64,
    pub fetched_chunks: AtomicU64,
    pub written_bytes: AtomicU64,
    pub zero_bytes: AtomicU64,
    pub deduped_bytes: AtomicU64,
    pub hashed_bytes: AtomicU64,
    pub verified_bytes: AtomicU64,
    pub verified_slots: AtomicU64,
    /// Busy time of the workers, summed, in nanoseconds: waiting for blobs, decoding and
    /// verifying them, writing (and zeroing) the target.
    pub fetch_ns: AtomicU64,
    pub verify_ns: AtomicU64,
    pub write_ns: AtomicU64,
}

impl Counters {
    /// The workers' busy time, summed over `workers` threads.
    pub fn busy(&self, workers: usize) -> crate::report::Busy {
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1e9;
        crate::report::Busy {
            workers,
            fetch_seconds: s(&self.fetch_ns),
            verify_seconds: s(&self.verify_ns),
            write_seconds: s(&self.write_ns),
        }
    }
}

fn bump_since(c: &AtomicU64, t: Instant) {
    bump(c, t.elapsed().as_nanos() as u64);
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

enum Job {
    /// A distinct chunk and every slot (still to write) that holds it.
    Fetch(Digest, Vec<usize>),
    /// Consecutive zero slots `[first, first + count)` clear of masked bytes.
    ZeroRun(usize, usize),
    /// One zero slot that touches masked bytes: written through the mask.
    ZeroMasked(usize),
}

impl Job {
    fn first_slot(&self) -> usize {
        match self {
            Job::Fetch(_, s) => s[0],
            Job::ZeroRun(f, _) | Job::ZeroMasked(f) => *f,
        }
    }
}

/// A worker's buffers, reused from chunk to chunk: the blob as received, the verified chunk
/// (aligned, so it goes to an O_DIRECT target as it is), and the aligned copy of a slot that must
/// be masked or widened.
#[derive(Default)]
pub struct Scratch {
    blob: Vec<u8>,
    chunk: Option<AlignedBuf>,
    slot: Option<AlignedBuf>,
}

/// What the writer takes from a plan: the bytes the data phase must not take from the chunks, the
/// marker, and the order of the slots. [`Layout::plain`] is a disk written as the index says,
/// which is what failback writes.
#[derive(Clone, Default)]
pub struct Layout {
    /// The disk's number in the snapshot, for messages.
    pub disk: u32,
    /// The target's table: held back (zeros and the marker) in the data phase, written last.
    pub held: Extents,
    /// Where the source kept its table: zeros in the data.
    pub source_table: Extents,
    /// Slots from here on are not written (the partitions there are rebuilt).
    pub keep_end: Option<u64>,
    /// The in-progress marker and where it goes (inside `held`).
    pub marker: Option<(u64, [u8; marker::LEN])>,
    /// Slot 0 is written after every other slot, after a flush: a target updated in place (a
    /// failback round) keeps its old table until the rest of the round is on it.
    pub slot0_last: bool,
}

impl Layout {
    /// Every slot as the index says, slot 0 last.
    pub fn plain(disk: u32) -> Layout {
        Layout {
            disk,
            slot0_last: true,
            ..Layout::default()
        }
    }

    /// Byte ranges whose content the data phase does not take from the chunks.
    fn masked(&self) -> Extents {
        let mut m = self.held.clone();
        for &(s, e) in self.source_table.ranges() {
            m.add(s, e);
        }
        if let Some(k) = self.keep_end {
            m.add(k, u64::MAX);
        }
        m
    }
}

impl DiskPlan {
    /// The writer's view of this plan, with `m` as the in-progress marker.
    pub fn layout(&self, m: &Marker) -> Layout {
        Layout {
            disk: self.disk,
            held: self.held.clone(),
            source_table: self.source_table.clone(),
            keep_end: self.keep_end,
            marker: self.marker_at.map(|at| (at, m.to_bytes())),
            slot0_last: false,
        }
    }
}

/// Writes one disk.
pub struct DiskWriter<'a> {
    pub layout: Layout,
    pub index: &'a ChunkIndex,
    pub disk: &'a Disk,
    masked: Extents,
    /// Data bytes of the held-back ranges, saved in the data phase, written with the table.
    stash: Mutex<Vec<(u64, Vec<u8>)>>,
    pub counters: Counters,
    zeros: AlignedBuf,
}

impl<'a> DiskWriter<'a> {
    pub fn new(layout: Layout, index: &'a ChunkIndex, disk: &'a Disk) -> DiskWriter<'a> {
        DiskWriter {
            masked: layout.masked(),
            layout,
            index,
            disk,
            stash: Mutex::new(Vec::new()),
            counters: Counters::default(),
            zeros: AlignedBuf::new(1 << 20),
        }
    }

    fn what(&self) -> String {
        format!("disk {} ({})", self.layout.disk, self.disk.name)
    }

    /// The marker on the target, if a restore left one.
    pub fn read_marker(&self) -> Result<Option<Marker>> {
        let Some((at, _)) = self.layout.marker else {
            return Ok(None);
        };
        let (s, l) = self.disk.widen(at, marker::LEN as u64);
        let mut buf = AlignedBuf::new(l as usize);
        self.disk.read_at(&mut buf, s)?;
        let o = (at - s) as usize;
        Ok(Marker::parse(&buf[o..o + marker::LEN]))
    }

    /// Lay the held-back image over `buf`, which holds disk bytes `[off, off + buf.len())`:
    /// zeros everywhere in the held ranges, the marker where it goes.
    fn overlay_held(&self, buf: &mut [u8], off: u64) {
        let end = off + buf.len() as u64;
        for (s, e) in self.layout.held.within(off, end) {
            buf[(s - off) as usize..(e - off) as usize].fill(0);
        }
        if let Some((at, m)) = &self.layout.marker {
            let (ms, me) = (*at, at + m.len() as u64);
            let (s, e) = (ms.max(off), me.min(end));
            if s < e {
                buf[(s - off) as usize..(e - off) as usize]
                    .copy_from_slice(&m[(s - ms) as usize..(e - ms) as usize]);
            }
        }
    }

    /// Step 1 (and the wipe on failure): the held ranges become zeros plus the marker.
    pub fn wipe_table(&self) -> Result<()> {
        for &(s, e) in self.layout.held.ranges() {
            let (ws, wl) = self.disk.widen(s, e - s);
            let mut buf = AlignedBuf::new(wl as usize);
            self.disk.read_at(&mut buf, ws)?;
            self.overlay_held(&mut buf, ws);
            self.disk.write_at(&buf, ws)?;
        }
        self.disk.sync()
    }

    /// Step 2: read back the slots `wanted` would write and return those already correct.
    /// Slots touching masked bytes are always rewritten and not read.
    pub fn check_existing(
        &self,
        wanted: &[usize],
        threads: usize,
        pb: &ProgressBar,
    ) -> Result<HashSet<usize>> {
        let todo: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|&i| {
                let (off, len) = self.index.span(i);
                self.masked.within(off, off + len).next().is_none()
            })
            .collect();
        let ok = Mutex::new(HashSet::new());
        let c = &self.counters;
        read_back_each(
            self.disk,
            self.index,
            &todo,
            threads.clamp(1, 4),
            || (),
            |_, i, same| {
                let len = self.index.span(i).1;
                bump(&c.hashed_bytes, len);
                if same {
                    ok.lock().expect("lock").insert(i);
                    bump(&c.verified_bytes, len);
                    bump(&c.verified_slots, 1);
                    pb.inc(len);
                }
                Ok(())
            },
        )
        .map_err(|e| e.context(format!("{}: reading back the target", self.what())))?;
        Ok(ok.into_inner().expect("lock"))
    }

    fn jobs(&self, skip: &HashSet<usize>) -> Vec<Job> {
        let mut jobs = Vec::new();
        let mut pos: HashMap<Digest, usize> = HashMap::new();
        let mut run: Option<(usize, usize)> = None;
        let flush = |run: &mut Option<(usize, usize)>, jobs: &mut Vec<Job>| {
            if let Some((f, n)) = run.take() {
                jobs.push(Job::ZeroRun(f, n));
            }
        };
        let per_run = (ZERO_RUN / CHUNK_SIZE) as usize;
        let beyond = |i: usize| {
            self.layout
                .keep_end
                .is_some_and(|k| self.index.span(i).0 >= k)
        };
        for (i, slot) in self.index.slots() {
            if skip.contains(&i) || beyond(i) {
                continue;
            }
            match slot {
                Slot::Unused => {}
                Slot::Zeros => {
                    let (off, len) = self.index.span(i);
                    if self.masked.within(off, off + len).next().is_some() {
                        flush(&mut run, &mut jobs);
                        jobs.push(Job::ZeroMasked(i));
                        continue;
                    }
                    match &mut run {
                        Some((f, n)) if *f + *n == i && *n < per_run => *n += 1,
                        _ => {
                            flush(&mut run, &mut jobs);
                            run = Some((i, 1));
                        }
                    }
                }
                Slot::Data(d) => match pos.get(&d) {
                    Some(&p) => {
                        if let Job::Fetch(_, slots) = &mut jobs[p] {
                            slots.push(i);
                        }
                    }
                    None => {
                        pos.insert(d, jobs.len());
                        jobs.push(Job::Fetch(d, vec![i]));
                    }
                },
            }
        }
        flush(&mut run, &mut jobs);
        jobs.sort_by_key(Job::first_slot);
        jobs
    }

    /// Step 3: fetch, verify and write every slot not in `skip` (slot 0 last when the layout
    /// says so).
    pub fn write_data(
        &self,
        store: &dyn Store,
        skip: &HashSet<usize>,
        threads: usize,
        pb: &ProgressBar,
    ) -> Result<()> {
        let last = self.layout.slot0_last && !skip.contains(&0);
        let jobs = if last {
            let mut skip = skip.clone();
            skip.insert(0);
            self.jobs(&skip)
        } else {
            self.jobs(skip)
        };
        par_each(
            threads,
            "worker",
            jobs.len(),
            Scratch::default,
            |scratch, k| self.run_job(store, &jobs[k], scratch, pb),
        )?;
        if last {
            self.disk.sync()?;
            self.put(store, 0, &mut Scratch::default(), pb)?;
        }
        Ok(())
    }

    /// Make slot `i` hold what the index says (its chunk fetched, or zeros): for plans that
    /// decide slot by slot (failback's comparison).
    pub fn put(
        &self,
        store: &dyn Store,
        i: usize,
        scratch: &mut Scratch,
        pb: &ProgressBar,
    ) -> Result<()> {
        let job = match self.index.slot(i) {
            Slot::Data(d) => Job::Fetch(d, vec![i]),
            Slot::Zeros => Job::ZeroMasked(i),
            Slot::Unused => return Ok(()),
        };
        self.run_job(store, &job, scratch, pb)
    }

    /// Write `data` (the slot's bytes, already verified) as slot `i`, through the mask: a chunk
    /// copied from another slot of the target instead of fetched again.
    pub fn put_bytes(&self, i: usize, data: &[u8], scratch: &mut Scratch) -> Result<()> {
        self.write_slot(i, Some(data), &mut scratch.slot)
    }

    fn run_job(
        &self,
        store: &dyn Store,
        job: &Job,
        scratch: &mut Scratch,
        pb: &ProgressBar,
    ) -> Result<()> {
        match job {
            Job::Fetch(d, slots) => {
                let Scratch { blob, chunk, slot } = scratch;
                let chunk = chunk.get_or_insert_with(|| AlignedBuf::new(CHUNK_SIZE as usize));
                let n = self.fetch(store, d, slots[0], blob, chunk)?;
                let data = &chunk[..n];
                for (n, &i) in slots.iter().enumerate() {
                    let len = self.index.span(i).1;
                    if data.len() as u64 != len {
                        return Err(anyhow!(
                            "{}: chunk {d} is {} bytes but slot {i} holds {len} (inconsistent index)",
                            self.what(),
                            data.len()
                        ));
                    }
                    self.write_slot(i, Some(data), slot)?;
                    if n > 0 {
                        bump(&self.counters.deduped_bytes, len);
                    }
                    pb.inc(len);
                }
                Ok(())
            }
            Job::ZeroMasked(i) => {
                self.write_slot(*i, None, &mut scratch.slot)?;
                let len = self.index.span(*i).1;
                bump(&self.counters.zero_bytes, len);
                pb.inc(len);
                Ok(())
            }
            Job::ZeroRun(first, count) => {
                let (off, _) = self.index.span(*first);
                let (last_off, last_len) = self.index.span(first + count - 1);
                let len = last_off + last_len - off;
                let (ws, wl) = self.disk.widen(off, len);
                let t = Instant::now();
                self.disk
                    .zero(ws, wl, &self.zeros)
                    .with_context(|| format!("{}: zeroing slots {first}..", self.what()))?;
                bump_since(&self.counters.write_ns, t);
                bump(&self.counters.zero_bytes, len);
                bump(&self.counters.written_bytes, len);
                pb.inc(len);
                Ok(())
            }
        }
    }

    /// Fetch a chunk into `chunk` and verify it; errors name the disk, the chunk, the slot and
    /// the URL. Returns the chunk's length.
    fn fetch(
        &self,
        store: &dyn Store,
        d: &Digest,
        slot: usize,
        blob: &mut Vec<u8>,
        chunk: &mut [u8],
    ) -> Result<usize> {
        let path = d.chunk_path();
        let ctx = || {
            format!(
                "{}: chunk {d} (slot {slot}, offset {}) from {}/{path}",
                self.what(),
                self.index.span(slot).0,
                store.location()
            )
        };
        let t = Instant::now();
        let f = fetch_chunk_into(store, d, blob, chunk).map_err(|e| e.context(ctx()))?;
        let c = &self.counters;
        bump(&c.fetch_ns, f.waited.as_nanos() as u64);
        bump(
            &c.verify_ns,
            t.elapsed().saturating_sub(f.waited).as_nanos() as u64,
        );
        bump(&c.fetched_bytes, f.blob_len);
        bump(&c.fetched_chunks, 1);
        Ok(f.len)
    }

    /// Write slot `i` (`data`, or zeros for `None`) through the mask.
    fn write_slot(
        &self,
        i: usize,
        data: Option<&[u8]>,
        scratch: &mut Option<AlignedBuf>,
    ) -> Result<()> {
        let (off, len) = self.index.span(i);
        // A slot reaching into partitions that are rebuilt stops where they start.
        let len = match self.layout.keep_end {
            Some(k) if off + len > k => k.saturating_sub(off),
            _ => len,
        };
        let data = data.map(|d| &d[..len as usize]);
        let (ws, wl) = self.disk.widen(off, len);
        let touches_mask = self.masked.within(ws, ws + wl).next().is_some();
        let straight = data.filter(|d| !touches_mask && self.disk.takes(d, off));
        let t = Instant::now();
        if let Some(data) = straight {
            self.disk.write_at(data, off)?;
        } else {
            let buf = scratch.get_or_insert_with(|| AlignedBuf::new(CHUNK_SIZE as usize + 4096));
            let b = &mut buf[..wl as usize];
            let o = (off - ws) as usize;
            match data {
                Some(d) => {
                    b[..o].fill(0);
                    b[o..o + len as usize].copy_from_slice(d);
                    b[o + len as usize..].fill(0);
                }
                None => b.fill(0),
            }
            if touches_mask {
                // Where the source kept its table: zeros (the target's table lives in `held`).
                for (s, e) in self.layout.source_table.within(ws, ws + wl) {
                    b[(s - ws) as usize..(e - ws) as usize].fill(0);
                }
                let mut stash = Vec::new();
                for (s, e) in self.layout.held.within(off, off + len) {
                    stash.push((s, b[(s - ws) as usize..(e - ws) as usize].to_vec()));
                }
                if !stash.is_empty() {
                    self.stash.lock().expect("lock").extend(stash);
                }
                self.overlay_held(b, ws);
            }
            self.disk.write_at(b, ws)?;
        }
        bump_since(&self.counters.write_ns, t);
        bump(&self.counters.written_bytes, len);
        Ok(())
    }

    /// Step 4: write the held-back ranges: the data saved in step 3 with `patches` (the target's
    /// table) over it. The range holding the marker goes last, so until the very end a crash
    /// leaves the marker and no valid table.
    pub fn write_table(&self, patches: &[(u64, Vec<u8>)]) -> Result<()> {
        self.disk.sync()?;
        let stash = self.stash.lock().expect("lock");
        let mut ranges: Vec<(u64, u64)> = self.layout.held.ranges().to_vec();
        if let Some((at, _)) = self.layout.marker {
            ranges.sort_by_key(|&(s, e)| (s <= at && at < e, s));
        }
        let mut covered = Extents::new();
        for &(s, e) in &ranges {
            let (ws, wl) = self.disk.widen(s, e - s);
            let mut buf = AlignedBuf::new(wl as usize);
            self.disk.read_at(&mut buf, ws)?;
            let end = ws + wl;
            for (s2, e2) in self.layout.held.within(ws, end) {
                buf[(s2 - ws) as usize..(e2 - ws) as usize].fill(0);
            }
            for (at, bytes) in stash.iter().chain(patches.iter()) {
                let (ps, pe) = (*at, at + bytes.len() as u64);
                let (a, b) = (ps.max(ws), pe.min(end));
                if a < b {
                    buf[(a - ws) as usize..(b - ws) as usize]
                        .copy_from_slice(&bytes[(a - ps) as usize..(b - ps) as usize]);
                    covered.add(a, b);
                }
            }
            self.disk.write_at(&buf, ws)?;
            bump(&self.counters.written_bytes, e - s);
        }
        // A patch outside every held range would be a bug in the table code: write it anyway.
        for (at, bytes) in patches {
            let (ps, pe) = (*at, at + bytes.len() as u64);
            if covered.within(ps, pe).map(|(a, b)| b - a).sum::<u64>() == pe - ps {
                continue;
            }
            let (ws, wl) = self.disk.widen(ps, pe - ps);
            let mut buf = AlignedBuf::new(wl as usize);
            self.disk.read_at(&mut buf, ws)?;
            buf[(ps - ws) as usize..(pe - ws) as usize].copy_from_slice(bytes);
            self.disk.write_at(&buf, ws)?;
        }
        self.disk.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{NetArgs, SourceArgs};
    use crate::plan::{self, Plan, Source};
    use crate::target::Target;
    use snapshot::chunker::{chunk_disk, ChunkOptions};
    use snapshot::manifest::{Disk as MDisk, DiskTotals, Firmware, Manifest, MANIFEST_VERSION};
    use snapshot::ptable::PartitionTable;
    use snapshot::store::LocalStore;

    const C: usize = CHUNK_SIZE as usize;

    /// A table-less disk: random slot, zero slot, the first slot again, an unused slot, and a
    /// short random tail; committed to a local store as host `t`.
    fn snapshot(dir: &std::path::Path) -> Vec<u8> {
        let mut disk = vec![0u8; 4 * C + 8192];
        let mut x = 0x9e3779b97f4a7c15u64;
        for i in (0..C).chain(4 * C..disk.len()) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            disk[i] = x as u8;
        }
        let (a, b) = disk.split_at_mut(2 * C);
        b[..C].copy_from_slice(&a[..C]);
        let (store, _) = LocalStore::init(&dir.join("store")).unwrap();
        let mut used = Extents::whole(0, disk.len() as u64);
        used.remove(3 * CHUNK_SIZE, 4 * CHUNK_SIZE);
        let (index, stats) =
            chunk_disk(&disk, &used, &store, &ChunkOptions::default(), &|_| {}).unwrap();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(index.to_bytes()));
        let m = Manifest {
            version: MANIFEST_VERSION,
            host: "t".into(),
            snapshot: "s1".into(),
            created: "2026-01-01T00:00:00Z".into(),
            sequence: None,
            firmware: Firmware::Unknown,
            hardware: Default::default(),
            chunk_size: CHUNK_SIZE,
            disks: vec![MDisk {
                number: 0,
                size: disk.len() as u64,
                logical_sector: 512,
                physical_sector: 512,
                table: PartitionTable::None,
                partitions: vec![],
                index_sha256: sha,
                totals: DiskTotals {
                    used_bytes: stats.used_bytes,
                    ..Default::default()
                },
            }],
        };
        store.commit_snapshot(&m, &[index]).unwrap();
        disk
    }

    fn source(dir: &std::path::Path) -> Source {
        Source::open(&SourceArgs {
            from: dir.join("store").display().to_string(),
            host: "t".into(),
            snapshot: "latest".into(),
            pubkey: None,
            net: NetArgs {
                token: None,
                ca: None,
                retry_for: std::time::Duration::from_secs(1),
                timeout: std::time::Duration::from_secs(1),
            },
        })
        .unwrap()
    }

    /// A target file of `len` bytes of 0xee, and the plan to restore onto it.
    fn target(src: &Source, dir: &std::path::Path, len: usize) -> (std::path::PathBuf, Plan) {
        let path = dir.join("target.img");
        std::fs::write(&path, vec![0xeeu8; len]).unwrap();
        let t = Target::from_path(path.to_str().unwrap()).unwrap();
        let layout = crate::cli::LayoutArgs {
            target: vec![path.to_string_lossy().into_owned()],
            grow: "last".into(),
            grow_lv: None,
        };
        let plan = plan::build(src, vec![t], None, &layout, &Default::default()).unwrap();
        (path, plan)
    }

    #[test]
    fn writes_held_back_last_dedupes_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = snapshot(dir.path());
        let src = source(dir.path());
        let (path, plan) = target(&src, dir.path(), disk.len());
        let d = &plan.disks[0];
        assert_eq!(d.held.ranges(), &[(0, 4096)]);
        let index = &src.snapshot.indexes[0];
        let m = Marker::new("t", "s1", 0);
        let open = || Disk::open(&path, false, 512, disk.len() as u64).unwrap();
        let first = open();
        let w = DiskWriter::new(d.layout(&m), index, &first);
        assert_eq!(
            w.read_marker().unwrap(),
            None,
            "a blank target has no marker"
        );
        w.wipe_table().unwrap();
        assert_eq!(w.read_marker().unwrap(), Some(m.clone()));
        let pb = ProgressBar::hidden();
        w.write_data(src.store.as_ref(), &HashSet::new(), 3, &pb)
            .unwrap();
        // Data is written, the held-back range still holds the marker.
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[4096..3 * C], &disk[4096..3 * C]);
        assert_eq!(&back[4 * C..], &disk[4 * C..]);
        assert!(
            back[3 * C..4 * C].iter().all(|&b| b == 0xee),
            "unused slot untouched"
        );
        assert_eq!(w.counters.fetched_chunks.load(Ordering::Relaxed), 2);
        assert_eq!(w.counters.deduped_bytes.load(Ordering::Relaxed), CHUNK_SIZE);
        assert_eq!(w.read_marker().unwrap(), Some(m.clone()));
        w.write_table(&[]).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(
            &back[..3 * C],
            &disk[..3 * C],
            "held-back bytes written last"
        );
        assert_eq!(w.read_marker().unwrap(), None);

        // A rerun over a wiped (marked) disk finds every slot but the held-back one correct.
        let again = open();
        let w = DiskWriter::new(d.layout(&m), index, &again);
        w.wipe_table().unwrap();
        let wanted: Vec<usize> = (0..index.len()).filter(|&i| i != 3).collect();
        let ok = w.check_existing(&wanted, 2, &pb).unwrap();
        assert_eq!(ok, [1usize, 2, 4].into_iter().collect());
        w.write_data(src.store.as_ref(), &ok, 2, &pb).unwrap();
        w.write_table(&[]).unwrap();
        assert_eq!(w.counters.fetched_chunks.load(Ordering::Relaxed), 1);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..3 * C], &disk[..3 * C]);
        assert_eq!(&back[4 * C..], &disk[4 * C..]);
    }

    /// The plain layout (failback's): every slot as the index says, slot 0 after all the others.
    /// A write error at slot 0 finds every other slot written; a clean run writes the disk.
    #[test]
    fn plain_layout_writes_slot_zero_last() {
        use crate::faulty::{Fault, Faulty};
        let dir = tempfile::tempdir().unwrap();
        let disk = snapshot(dir.path());
        let src = source(dir.path());
        let index = &src.snapshot.indexes[0];
        let path = dir.path().join("target.img");
        std::fs::write(&path, vec![0xeeu8; disk.len()]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let faulty = std::sync::Arc::new(Faulty::new(file, Fault::WriteAt(100)));
        let medium = Disk::on(Box::new(faulty.clone()), disk.len() as u64, "target.img");
        let w = DiskWriter::new(Layout::plain(0), index, &medium);
        let pb = ProgressBar::hidden();
        let e = w
            .write_data(src.store.as_ref(), &HashSet::new(), 2, &pb)
            .unwrap_err();
        assert!(format!("{e:#}").contains("at offset 0"), "{e:#}");
        let back = std::fs::read(&path).unwrap();
        assert!(
            back[..C].iter().all(|&b| b == 0xee),
            "slot 0 not yet written"
        );
        assert_eq!(
            &back[C..3 * C],
            &disk[C..3 * C],
            "slots 1 and 2 written first"
        );
        assert_eq!(&back[4 * C..], &disk[4 * C..]);
        let w = DiskWriter::new(Layout::plain(0), index, &medium);
        w.write_data(src.store.as_ref(), &HashSet::new(), 2, &pb)
            .unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..3 * C], &disk[..3 * C]);
        assert!(
            back[3 * C..4 * C].iter().all(|&b| b == 0xee),
            "unused slot untouched"
        );
        assert_eq!(&back[4 * C..], &disk[4 * C..]);
    }

    /// Each fault of the target, met where a restore runs (data, flush after data, the table):
    /// the restore stops with an error naming the target, the operation and the offset, and the
    /// wipe that follows (as in `restore::run`) leaves no table: zeros and the marker.
    #[test]
    fn every_target_fault_ends_in_a_clear_error_and_a_wiped_table() {
        use crate::faulty::{Fault, Faulty};
        let dir = tempfile::tempdir().unwrap();
        let disk = snapshot(dir.path());
        let src = source(dir.path());
        let index = &src.snapshot.indexes[0];
        let m = Marker::new("t", "s1", 0);
        let c = CHUNK_SIZE;
        let cases = [
            (Fault::WriteAt(4 * c + 100), format!("writing 8192 bytes at offset {}", 4 * c)),
            (Fault::WriteAt(c), format!("zeroing slots 1..: target.img: writing 1048576 bytes at offset {c}: Input/output error")),
            (Fault::ShortWriteAt(2 * c), format!("bytes at offset {}: failed to write whole buffer", 2 * c)),
            (Fault::Flush(2), "fsync: Input/output error".to_string()),
            (Fault::Flush(3), "fsync: Input/output error".to_string()),
            (Fault::Flush(4), "fsync: Input/output error".to_string()),
        ];
        for (fault, expect) in cases {
            let (path, plan) = target(&src, dir.path(), disk.len());
            let d = &plan.disks[0];
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let faulty = std::sync::Arc::new(Faulty::new(file, fault));
            let medium = Disk::on(Box::new(faulty.clone()), disk.len() as u64, "target.img");
            let w = DiskWriter::new(d.layout(&m), index, &medium);
            let pb = ProgressBar::hidden();
            let restore = || -> Result<()> {
                w.wipe_table()?;
                w.write_data(src.store.as_ref(), &HashSet::new(), 2, &pb)?;
                w.disk.sync()?;
                w.write_table(&[])
            };
            let e = restore().expect_err(&format!("{fault:?}: the restore went through"));
            assert!(faulty.fired(), "{fault:?} never fired");
            let msg = format!("{e:#}");
            assert!(msg.contains(&expect), "{fault:?}: {msg}");
            assert!(
                msg.contains("target.img"),
                "{fault:?}: the target is not named: {msg}"
            );
            w.wipe_table().unwrap();
            let back = std::fs::read(&path).unwrap();
            let at = d.marker_at.unwrap() as usize;
            let mut want = vec![0u8; 4096];
            want[at..at + marker::LEN].copy_from_slice(&m.to_bytes());
            assert_eq!(
                &back[..4096],
                &want[..],
                "{fault:?}: the table area is not wiped"
            );
            assert_eq!(w.read_marker().unwrap(), Some(m.clone()));
        }
    }
}
