//! `restorer failback`: bring a failover VM's disks back onto this machine in rounds while the VM
//! keeps running, then a short cutover (DESIGN.md §6, operator view in `docs/failback.md`).
//!
//! Each round is asked of the appliance (`POST /api/v1/failover/<vm>/rounds`) and read like a
//! snapshot from the store (`failover/<vm>/rounds/<n>/`: `round.json`, its signature, one full
//! chunk index per disk). The first round compares the target with the index: each thread
//! hashes a slot of the target and fetches it at once when it differs, while the others go on
//! reading ([`crate::slots`]), so hashing and fetching overlap and a drifted (or blank) target
//! ends exact. Later rounds apply only the slots whose digest changed since the round applied
//! before. When a round fetched less than `--threshold` (or after `--max-rounds`), the final
//! round is requested: the appliance stops the VM and publishes its last state, while the slots
//! the rounds wrote are read back ([`while_asking`]); it is applied, and what it wrote is read
//! back and verified. The cutover window is measured from the final request to that
//! verification.
//!
//! Resuming: network faults are retried by the HTTP store (`--retry-for`); a failback started
//! again simply begins with a full comparison, which fetches only what is still missing.
//!
//! The slots are written by the restore's [`DiskWriter`] with [`Layout::plain`]: an exact copy
//! of the VM's disk has no held-back table or resume marker, and its slot 0 (the partition table)
//! goes after every other slot of a round.

use crate::cli::FailbackArgs;
use crate::dio::{AlignedBuf, Disk};
use crate::pipeline::{DiskWriter, Layout, Scratch};
use crate::report;
use crate::slots::{read_back, read_back_each, read_slot, slot_buf};
use crate::target::{Kind, Safety, Target};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressBar;
use serde::Serialize;
use snapshot::api;
use snapshot::client::{api_beside, ApplianceClient};
use snapshot::ptable::PartitionTable;
use snapshot::round::Round as RoundFile;
use snapshot::sign::PublicKey;
use snapshot::store::http::HttpStore;
use snapshot::store::{check_name, read_index, read_signed, FetchError, Store};
use snapshot::{ChunkIndex, Digest, ReadAt, Slot};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A round read and checked along the trust chain.
struct Round {
    file: RoundFile,
    indexes: Vec<ChunkIndex>,
    /// Bytes of round.json, signature and indexes.
    meta_bytes: u64,
}

/// What applying one round did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    pub round: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Slots the round asked this restorer to look at (all data/zero slots in a comparison,
    /// the changed ones afterwards).
    pub slots_considered: u64,
    /// Slots read and hashed on the target (comparison rounds).
    pub slots_hashed: u64,
    pub bytes_hashed: u64,
    /// Slots written (they differed or changed).
    pub slots_written: u64,
    pub bytes_written: u64,
    /// Bytes received: chunk blobs plus the round's files.
    pub bytes_fetched: u64,
    pub chunks_fetched: u64,
    /// Slots the appliance reported changed since its previous round.
    pub appliance_changed_slots: u64,
    /// Final round: slots it wrote, read back and checked inside the cutover window. A slot it
    /// compared and found right is not read again: that comparison read it.
    pub slots_read_back: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub vm: String,
    pub host: String,
    pub snapshot: String,
    pub targets: Vec<String>,
    pub rounds: Vec<RoundStats>,
    /// From the final-round request (the VM is stopped on it) to the final delta written,
    /// flushed, read back and verified.
    pub cutover_window_seconds: f64,
    /// Slots read back and checked after cutover (`--verify`: every slot written before the
    /// final round, or the whole target; 0 with `delta`).
    pub verified_slots: u64,
    /// Of those, the slots read back while the appliance stopped the VM (found right against the
    /// round before, which the final round left unchanged there); `verify_seconds` is the rest.
    pub verified_while_stopping: u64,
    pub verify_seconds: f64,
    /// What was done to partition tables for targets bigger than the VM's disks (a GPT's backup
    /// header and entry array moved to the target's end).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    pub total_bytes_fetched: u64,
    pub total_seconds: f64,
}

pub fn run(a: &FailbackArgs) -> Result<()> {
    check_name(&a.vm, "vm")?;
    let started = Instant::now();
    let opts = a.net.http_options();
    if !(a.from.starts_with("http://") || a.from.starts_with("https://")) {
        bail!(
            "--from {}: failback needs the appliance (http://HOST:PORT/store), which makes the rounds",
            a.from
        );
    }
    let store = HttpStore::new(&a.from, opts.clone())?;
    snapshot::store::open(&a.from, &opts)?; // checks store.json, names a wrong URL early
    let api_base = match &a.api {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => api_beside(&a.from).context("--from: give the API base with --api")?,
    };
    // Making a round can take minutes (the final one stops the VM first): a long request timeout.
    let api = ApplianceClient::new(
        &api_base,
        snapshot::store::http::Options {
            timeout: opts.timeout.max(a.stop_timeout + Duration::from_secs(1800)),
            ..opts.clone()
        },
    )?;
    let key = a.pubkey.as_deref().map(PublicKey::load).transpose()?;
    let safety = Safety::scan()?;
    let mut targets = Vec::new();
    for spec in &a.target {
        let t = Target::from_path(spec)?;
        safety.check(&t)?;
        targets.push(t);
    }
    crate::target::check_distinct(&targets)?;
    let threads = a.jobs as usize;

    let mut disks: Vec<Disk> = Vec::new();
    let mut applied: Option<Vec<ChunkIndex>> = None;
    let mut rounds: Vec<RoundStats> = Vec::new();
    let mut want_final = false;
    // Per disk, the slots written by the rounds before the final one.
    let mut written: Vec<BTreeSet<usize>> = Vec::new();
    // Per disk, slots of `written` read back and found right while the VM was being stopped
    // (against the round applied before the final one).
    let mut pre_verified: Vec<Vec<usize>> = Vec::new();
    let (window, last) = loop {
        let asked = Instant::now();
        let ask = || {
            let n = request_round(&api, &a.vm, want_final, a.stop_timeout)?;
            read_round(&store, &a.vm, n, key.as_ref())
        };
        let round = match &applied {
            // The cutover: while the appliance stops the VM, what the rounds wrote is read back.
            Some(prev) if want_final => {
                let (round, ok) =
                    while_asking(ask, |answered| pre_verify(&disks, prev, &written, answered))?;
                pre_verified = ok;
                round
            }
            _ => ask()?,
        };
        if disks.is_empty() {
            disks = open_targets(&targets, &round)?;
            if !a.json {
                println!(
                    "failback of VM {} ({}/{}) onto {}",
                    a.vm,
                    round.file.host,
                    round.file.snapshot,
                    a.target.join(", ")
                );
            }
        }
        let (mut st, wrote) = apply(&store, &disks, &round, applied.as_deref(), threads)?;
        st.bytes_fetched += round.meta_bytes;
        let is_final = round.file.is_final;
        if is_final {
            // What the final round wrote, read back and checked: the end of the cutover window.
            st.slots_read_back = verify(&disks, &round.indexes, &wrote, threads)?;
        }
        st.seconds = asked.elapsed().as_secs_f64();
        if !a.json {
            println!(
                "  round {}{}: {} slots {}, {} written, {} fetched, {:.1}s",
                st.round,
                if st.is_final { " (final)" } else { "" },
                st.slots_considered,
                if applied.is_none() {
                    "compared"
                } else {
                    "changed"
                },
                st.slots_written,
                report::bytes(st.bytes_fetched),
                st.seconds
            );
        }
        let fetched = st.bytes_fetched;
        rounds.push(st);
        if is_final {
            break (asked.elapsed().as_secs_f64(), round);
        }
        written.resize_with(disks.len(), BTreeSet::new);
        for (w, s) in written.iter_mut().zip(wrote) {
            w.extend(s);
        }
        applied = Some(round.indexes.clone());
        if fetched <= a.threshold || rounds.len() as u32 >= a.max_rounds {
            want_final = true;
        }
    };
    let verify_started = Instant::now();
    let mut check: Vec<Vec<usize>> = match a.verify.as_str() {
        "full" => last.indexes.iter().map(|i| round_slots(i, None)).collect(),
        // Slots written earlier and changed again by the final round were checked in the window.
        "written" => written
            .iter()
            .enumerate()
            .map(|(k, w)| {
                let fin = &last.indexes[k];
                w.iter()
                    .copied()
                    .filter(|&i| {
                        applied
                            .as_ref()
                            .is_none_or(|p| p[k].digest(i) == fin.digest(i))
                    })
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };
    // Found right during the VM's stop and not changed by the final round: proven already.
    let mut while_stopping = 0;
    if let Some(prev) = &applied {
        for ((c, ok), (fin, p)) in check
            .iter_mut()
            .zip(&pre_verified)
            .zip(last.indexes.iter().zip(prev))
        {
            let done: HashSet<usize> = ok
                .iter()
                .copied()
                .filter(|&i| fin.digest(i) == p.digest(i))
                .collect();
            let before = c.len();
            c.retain(|i| !done.contains(i));
            while_stopping += (before - c.len()) as u64;
        }
    }
    let verified = while_stopping + verify(&disks, &last.indexes, &check, threads)?;
    let verify_seconds = verify_started.elapsed().as_secs_f64();
    // Last, once the copy is proven: a GPT copied onto a bigger target still has its backup where
    // the VM's disk ended. It is laid out for the target, as a restore writes it.
    let mut tables = Vec::new();
    for ((disk, t), d) in disks.iter().zip(&targets).zip(&last.file.disks) {
        if t.size > d.size {
            let what = format!("disk {} ({})", d.number, disk.name);
            if let Some(line) = relocate_gpt(disk, t, d.size).with_context(|| what.clone())? {
                tables.push(format!("{what}: {line}"));
            }
        }
    }
    let summary = Summary {
        vm: a.vm.clone(),
        host: last.file.host.clone(),
        snapshot: last.file.snapshot.clone(),
        targets: a.target.clone(),
        total_bytes_fetched: rounds.iter().map(|r| r.bytes_fetched).sum(),
        rounds,
        cutover_window_seconds: window,
        verified_slots: verified,
        verified_while_stopping: while_stopping,
        verify_seconds,
        tables,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "failback done: {} rounds, {} fetched, cutover window {:.1}s (VM stop requested -> \
             final delta verified){}, {:.1}s in all",
            summary.rounds.len(),
            report::bytes(summary.total_bytes_fetched),
            summary.cutover_window_seconds,
            match a.verify.as_str() {
                "full" => format!(
                    "; whole target verified ({} slots, {:.1}s)",
                    summary.verified_slots, summary.verify_seconds
                ),
                "written" => format!(
                    "; the {} slots written before cutover verified ({:.1}s)",
                    summary.verified_slots, summary.verify_seconds
                ),
                _ => String::new(),
            },
            summary.total_seconds
        );
        for line in &summary.tables {
            println!("  {line}");
        }
    }
    Ok(())
}

/// The first `size` bytes of a target, for the partition-table reader (aligned reads, so
/// O_DIRECT targets work).
struct Prefix<'a> {
    disk: &'a Disk,
    size: u64,
}

impl ReadAt for Prefix<'_> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let len = buf.len() as u64;
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the VM's disk",
            ));
        }
        let mut a = AlignedBuf::new(buf.len() + 2 * 4096);
        let got = self
            .disk
            .read_span(off, len, &mut a)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        buf.copy_from_slice(got);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// Write `bytes` at `off` through an aligned read-modify-write (O_DIRECT).
fn patch(disk: &Disk, off: u64, bytes: &[u8]) -> Result<()> {
    let (ws, wl) = disk.widen(off, bytes.len() as u64);
    let mut buf = AlignedBuf::new(wl as usize);
    disk.read_at(&mut buf[..wl as usize], ws)?;
    let o = (off - ws) as usize;
    buf[o..o + bytes.len()].copy_from_slice(bytes);
    disk.write_at(&buf[..wl as usize], ws)
}

/// A GPT that the failback copied from a VM disk of `vm_size` bytes onto the bigger target `t`:
/// laid out for the target (backup entry array and header at its last LBA, last usable LBA and
/// the protective MBR's size updated; partitions unchanged), written backup first, and the old
/// backup (now inside the target, outside every partition) zeroed. `None` when the disk has no
/// GPT. One line saying what was done otherwise.
fn relocate_gpt(disk: &Disk, t: &Target, vm_size: u64) -> Result<Option<String>> {
    let sector = match t.kind {
        Kind::Block => t.logical_sector,
        Kind::File => None,
    };
    let view = Prefix {
        disk,
        size: vm_size,
    };
    let (table, ss) = PartitionTable::read(&view, sector).context("reading the partition table")?;
    if !matches!(table, PartitionTable::Gpt(_)) {
        return Ok(None);
    }
    let old = table.table_regions(vm_size, ss);
    let new = table
        .for_target(ss, t.size, ss, false)
        .context("laying out the GPT for the bigger target")?;
    let mut patches = new
        .to_disk(t.size, ss)
        .context("laying out the GPT for the bigger target")?;
    // Backup first, primary last: an interruption leaves the old primary in charge.
    patches.reverse();
    for (off, bytes) in &patches {
        patch(disk, *off, bytes).context("writing the GPT")?;
    }
    disk.sync()?;
    // The old backup: the regions of the old layout past the new primary's entry array.
    let keep = new.table_regions(t.size, ss);
    let first_usable = match &new {
        PartitionTable::Gpt(g) => g.first_usable_lba * u64::from(ss),
        _ => 0,
    };
    for (s, e) in old.into_iter().filter(|&(s, _)| s >= first_usable) {
        if keep.iter().all(|&(ks, ke)| e <= ks || ke <= s) {
            patch(disk, s, &vec![0u8; (e - s) as usize]).context("clearing the old GPT backup")?;
        }
    }
    disk.sync()?;
    let last = t.size / u64::from(ss) - 1;
    Ok(Some(format!(
        "GPT backup moved from LBA {} to the end of the target (LBA {last})",
        vm_size / u64::from(ss) - 1
    )))
}

/// Ask the appliance for a round (the final one: cutover) and return its number.
fn request_round(
    api: &ApplianceClient,
    vm: &str,
    cutover: bool,
    stop_timeout: Duration,
) -> Result<u32> {
    let path = format!("failover/{vm}/rounds");
    let url = api.url(&path);
    let ask = |is_final: bool, timeout_seconds: Option<u64>| {
        let body = serde_json::to_vec(&api::RoundAsk {
            is_final,
            timeout_seconds,
        })
        .map_err(|e| FetchError::Other(e.into()))?;
        let (_, out) = api.call("POST", &path, "application/json", &body)?;
        serde_json::from_slice::<api::RoundMade>(&out).map_err(|e| {
            FetchError::Other(anyhow!("{url}: malformed answer (no round number): {e}"))
        })
    };
    // Whole seconds on the wire: a part of a second still gives the VM that second.
    let made = match ask(cutover, Some(stop_timeout.as_secs_f64().ceil() as u64)) {
        Ok(m) => m,
        // The VM is failed back already (a failback run again after cutover): its final round.
        Err(FetchError::Other(e)) if !cutover && format!("{e:#}").contains("HTTP 409") => {
            ask(true, None).map_err(|e| anyhow!("{e:#}"))?
        }
        Err(FetchError::NotFound(_)) => bail!(
            "{url}: not found: no failover VM named {vm} on this appliance (or no failover API)"
        ),
        Err(FetchError::Other(e)) => return Err(e.context("asking the appliance for a round")),
    };
    Ok(made.round)
}

/// Read round `n`: signature (with a key), version, names, then every index against its hash.
fn read_round(store: &dyn Store, vm: &str, n: u32, key: Option<&PublicKey>) -> Result<Round> {
    let dir = snapshot::round::round_dir(vm, n);
    let origin = format!("{}/{dir}/round.json", store.location());
    let bytes = read_signed(store, &dir, "round.json", "round.sig", key, || {
        anyhow!("{origin}: missing")
    })?;
    let mut meta = bytes.len() as u64;
    let file = RoundFile::parse(&bytes, &origin)?;
    if file.vm != vm || file.round != n {
        bail!(
            "{origin}: names round {} of {}, not {n} of {vm}",
            file.round,
            file.vm
        );
    }
    let mut indexes = Vec::new();
    for d in &file.disks {
        let name = format!("disk{}.idx", d.number);
        let (idx, len) = read_index(store, &dir, &name, d.size, &d.index_sha256, "round.json")?;
        meta += len;
        indexes.push(idx);
    }
    Ok(Round {
        file,
        indexes,
        meta_bytes: meta,
    })
}

/// Run `work` while `ask` waits on the appliance (a round being frozen, the VM being stopped).
/// `work` gets `answered()`, true once `ask` has returned, to end early what can wait. The
/// error of `ask` comes first, then that of `work`.
fn while_asking<R: Send, T>(
    ask: impl FnOnce() -> Result<R> + Send,
    work: impl FnOnce(&dyn Fn() -> bool) -> Result<T>,
) -> Result<(R, T)> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("round".into())
            .spawn_scoped(s, ask)
            .context("starting the thread that asks for the round")?;
        let done = work(&|| h.is_finished());
        let asked = h
            .join()
            .map_err(|_| anyhow!("the thread asking for the round panicked"))??;
        Ok((asked, done?))
    })
}

/// [`verify`] the slots the rounds wrote (`written`) against `prev`, the round applied last, in
/// batches until the final round is `answered()`, which is so not delayed by more than one
/// batch. Returns the slots found right; one that is not is an error.
fn pre_verify(
    disks: &[Disk],
    prev: &[ChunkIndex],
    written: &[BTreeSet<usize>],
    answered: &dyn Fn() -> bool,
) -> Result<Vec<Vec<usize>>> {
    const BATCH: usize = 8;
    let mut ok = vec![Vec::new(); disks.len()];
    for (k, (disk, idx)) in disks.iter().zip(prev).enumerate() {
        let list: Vec<usize> = written.get(k).into_iter().flatten().copied().collect();
        for batch in list.chunks(BATCH) {
            if answered() {
                return Ok(ok);
            }
            let (d, i) = (std::slice::from_ref(disk), std::slice::from_ref(idx));
            verify(d, i, &[batch.to_vec()], 4)?;
            ok[k].extend_from_slice(batch);
        }
    }
    Ok(ok)
}

fn open_targets(targets: &[Target], round: &Round) -> Result<Vec<Disk>> {
    if targets.len() != round.file.disks.len() {
        bail!(
            "VM {} has {} disks; --target names {}",
            round.file.vm,
            round.file.disks.len(),
            targets.len()
        );
    }
    targets
        .iter()
        .zip(&round.file.disks)
        .map(|(t, d)| {
            if t.size < d.size {
                bail!(
                    "target {} is too small for disk {}: {} bytes needed, it has {}",
                    t.path.display(),
                    d.number,
                    d.size,
                    t.size
                );
            }
            let block = t.kind == Kind::Block;
            Disk::open(&t.path, block, t.logical_sector.unwrap_or(512), t.size)
        })
        .collect()
}

#[derive(Default)]
struct Counters {
    hashed_slots: AtomicU64,
    hashed_bytes: AtomicU64,
    written_slots: AtomicU64,
    written_bytes: AtomicU64,
    fetched_bytes: AtomicU64,
    fetched_chunks: AtomicU64,
}

/// The slots of `idx` a round considers: every data and zero slot (`prev` = None), or those whose
/// digest differs from `prev`.
fn round_slots(idx: &ChunkIndex, prev: Option<&ChunkIndex>) -> Vec<usize> {
    idx.slots()
        .filter(|&(i, s)| s != Slot::Unused && prev.is_none_or(|p| p.digest(i) != idx.digest(i)))
        .map(|(i, _)| i)
        .collect()
}

/// Apply one round to every disk: compare everything (`prev` = None) or only the slots whose
/// digest differs from `prev`. Also returns, per disk, the slots written.
fn apply(
    store: &dyn Store,
    disks: &[Disk],
    round: &Round,
    prev: Option<&[ChunkIndex]>,
    threads: usize,
) -> Result<(RoundStats, Vec<Vec<usize>>)> {
    let c = Counters::default();
    let mut considered = 0;
    let mut written = Vec::new();
    for (k, disk) in disks.iter().enumerate() {
        let idx = &round.indexes[k];
        let slots = round_slots(idx, prev.map(|p| &p[k]));
        considered += slots.len() as u64;
        let number = round.file.disks[k].number;
        let what = format!("disk {number} ({})", disk.name);
        let w = DiskWriter::new(Layout::plain(number), idx, disk);
        let wrote = apply_disk(store, &w, &slots, prev.is_none(), threads, &c)
            .with_context(|| format!("round {}, {what}", round.file.round))?;
        written.push(wrote);
    }
    let stats = RoundStats {
        round: round.file.round,
        is_final: round.file.is_final,
        slots_considered: considered,
        slots_hashed: c.hashed_slots.into_inner(),
        bytes_hashed: c.hashed_bytes.into_inner(),
        slots_written: c.written_slots.into_inner(),
        bytes_written: c.written_bytes.into_inner(),
        bytes_fetched: c.fetched_bytes.into_inner(),
        chunks_fetched: c.fetched_chunks.into_inner(),
        appliance_changed_slots: round.file.disks.iter().map(|d| d.changed_slots).sum(),
        slots_read_back: 0,
        seconds: 0.0,
    };
    Ok((stats, written))
}

/// The slots of one disk, written by a [`DiskWriter`] with a plain layout (slot 0, the partition
/// table, last). In a comparison each thread hashes a slot on the target and, when it differs,
/// fetches and writes it at once while the other threads go on reading, so hashing and fetching
/// overlap; a chunk already written to another slot in this round is copied from there instead of
/// fetched again. Otherwise the writer's data phase writes every slot.
fn apply_disk(
    store: &dyn Store,
    w: &DiskWriter,
    slots: &[usize],
    compare: bool,
    threads: usize,
    c: &Counters,
) -> Result<Vec<usize>> {
    const PARTLY: &str = "the target is partly updated: run failback again to finish it";
    let (disk, idx) = (w.disk, w.index);
    let pb = ProgressBar::hidden();
    let wrote = if compare {
        // Digest -> a slot already holding it on the target.
        let first: Mutex<HashMap<Digest, usize>> = Mutex::new(HashMap::new());
        let wrote: Mutex<Vec<usize>> = Mutex::new(Vec::new());
        let slot0 = AtomicBool::new(false);
        let put = |i: usize, (scratch, copy): &mut (Scratch, AlignedBuf)| -> Result<()> {
            let digest = match idx.slot(i) {
                Slot::Data(d) => Some(d),
                _ => None,
            };
            let have = digest.and_then(|d| first.lock().expect("lock").get(&d).copied());
            let local = match (have, digest) {
                (Some(j), Some(d)) => {
                    Some(read_slot(disk, idx, j, copy)?).filter(|b| Digest::of(b) == d)
                }
                _ => None,
            };
            match local {
                Some(b) => w.put_bytes(i, b, scratch)?,
                None => w.put(store, i, scratch, &pb)?,
            }
            if let Some(d) = digest {
                first.lock().expect("lock").entry(d).or_insert(i);
            }
            wrote.lock().expect("lock").push(i);
            Ok(())
        };
        let bufs = || (Scratch::default(), slot_buf());
        // At least four threads, so that one thread's read overlaps another's hashing.
        read_back_each(disk, idx, slots, threads.max(4), bufs, |b, i, same| {
            c.hashed_slots.fetch_add(1, Ordering::Relaxed);
            c.hashed_bytes.fetch_add(idx.span(i).1, Ordering::Relaxed);
            match (same, i) {
                (true, _) => Ok(()),
                (false, 0) => {
                    slot0.store(true, Ordering::Relaxed);
                    Ok(())
                }
                (false, _) => put(i, b),
            }
        })
        .context(PARTLY)?;
        if slot0.into_inner() {
            disk.sync().context(PARTLY)?;
            put(0, &mut bufs()).context(PARTLY)?;
        }
        wrote.into_inner().expect("lock")
    } else {
        let todo: HashSet<usize> = slots.iter().copied().collect();
        let skip: HashSet<usize> = (0..idx.len()).filter(|i| !todo.contains(i)).collect();
        w.write_data(store, &skip, threads, &pb).context(PARTLY)?;
        slots.to_vec()
    };
    disk.sync()?;
    c.written_slots
        .fetch_add(wrote.len() as u64, Ordering::Relaxed);
    let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
    c.written_bytes
        .fetch_add(get(&w.counters.written_bytes), Ordering::Relaxed);
    c.fetched_bytes
        .fetch_add(get(&w.counters.fetched_bytes), Ordering::Relaxed);
    c.fetched_chunks
        .fetch_add(get(&w.counters.fetched_chunks), Ordering::Relaxed);
    Ok(wrote)
}

/// Read back `slots` of every disk and compare them with `indexes`. Returns the slots checked.
fn verify(
    disks: &[Disk],
    indexes: &[ChunkIndex],
    slots: &[Vec<usize>],
    threads: usize,
) -> Result<u64> {
    let mut total = 0;
    for ((disk, idx), slots) in disks.iter().zip(indexes).zip(slots) {
        let (_, bad) = read_back(disk, idx, slots, threads.clamp(1, 4))
            .with_context(|| format!("verifying {}", disk.name))?;
        if !bad.is_empty() {
            bail!(
                "verifying {}: {} slots differ from what this failback wrote (first at offset {}): \
                 something else wrote to the target; run failback again",
                disk.name,
                bad.len(),
                idx.span(bad[0]).0
            );
        }
        total += slots.len() as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn work_runs_while_the_appliance_answers() {
        let started = Instant::now();
        let (asked, seen) = while_asking(
            || {
                std::thread::sleep(Duration::from_millis(300));
                Ok(7)
            },
            |answered| {
                let before = answered();
                std::thread::sleep(Duration::from_millis(300));
                while !answered() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(before)
            },
        )
        .unwrap();
        assert_eq!(asked, 7);
        assert!(!seen, "the work began before the answer");
        // Side by side, not one after the other.
        assert!(started.elapsed() < Duration::from_millis(550));
    }

    #[test]
    fn a_failed_request_is_the_error() {
        let r = while_asking(|| -> Result<()> { bail!("HTTP 500") }, |_| Ok(()));
        assert!(format!("{:#}", r.unwrap_err()).contains("HTTP 500"));
        let r = while_asking(|| Ok(()), |_| -> Result<()> { bail!("read error") });
        assert!(format!("{:#}", r.unwrap_err()).contains("read error"));
    }

    fn disk_with(slots: &[Vec<u8>]) -> (tempfile::TempDir, Disk, ChunkIndex) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.raw");
        let data: Vec<u8> = slots.concat();
        std::fs::write(&path, &data).unwrap();
        let size = data.len() as u64;
        let mut idx = ChunkIndex::new(size);
        for (i, s) in slots.iter().enumerate() {
            idx.set(i, Slot::Data(snapshot::Digest::of(s)));
        }
        let disk = Disk::open(&path, false, 512, size).unwrap();
        (d, disk, idx)
    }

    #[test]
    fn pre_verify_stops_at_the_answer_and_names_a_wrong_slot() {
        let slot = snapshot::CHUNK_SIZE as usize;
        let slots: Vec<Vec<u8>> = (0..20u8).map(|k| vec![k + 1; slot]).collect();
        let (_d, disk, idx) = disk_with(&slots);
        let all: BTreeSet<usize> = (0..20).collect();
        let disks = [disk];
        let (one, two) = (std::slice::from_ref(&idx), std::slice::from_ref(&all));
        let run = |answered: bool| pre_verify(&disks, one, two, &move || answered).unwrap();
        // Not answered: every slot read back and found right.
        assert_eq!(run(false)[0], all.iter().copied().collect::<Vec<_>>());
        // Answered at once: nothing more is read.
        assert!(run(true)[0].is_empty());
        // A slot someone else changed is an error naming its offset.
        let mut other = idx.clone();
        other.set(13, Slot::Data(snapshot::Digest::of(b"not this")));
        let e = pre_verify(&disks, &[other], &[all], &|| false).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&format!("offset {}", 13 * slot)), "{msg}");
    }
}
