//! `restorer failback`: bring a failover VM's disks back onto this machine in rounds while the VM
//! keeps running, then a short cutover (DESIGN.md §6, operator view in `docs/failback.md`).
//!
//! Each round is asked of the appliance (`POST /api/v1/failover/<vm>/rounds`) and read like a
//! snapshot from the store (`failover/<vm>/rounds/<n>/`: `round.json`, its signature, one full
//! chunk index per disk). While the appliance freezes round 1, the target is compared with the
//! newest state already published (the last round, else the snapshot the VM was started from,
//! `GET /api/v1/failover/<vm>`): each data and zero slot is hashed on the target
//! ([`crate::slots`]). Round 1 then writes the slots it changed since that base and those the
//! comparison found differing, so a drifted (or blank) target ends exact. Later rounds apply only
//! the slots whose digest changed since the round applied before. When a round fetched less than
//! `--threshold` (or after `--max-rounds`), the final round is requested: the appliance stops the
//! VM and publishes its last state; meanwhile what the earlier rounds wrote is read back
//! (`--verify`). The final delta is applied, read back and verified. The cutover window is
//! measured from the final request to that verification.
//!
//! Resuming: network faults are retried by the HTTP store (`--retry-for`); a failback started
//! again simply begins with a full comparison, which fetches only what is still missing.
//!
//! The slots are written by the restore's [`DiskWriter`] with [`Layout::plain`]: an exact copy
//! of the VM's disk has no held-back table or resume marker, and its slot 0 (the partition table)
//! goes after every other slot of a round.

use crate::cli::FailbackArgs;
use crate::dio::{AlignedBuf, Disk};
use crate::pipeline::{DiskWriter, Layout};
use crate::report;
use crate::slots::read_back;
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
use snapshot::{ChunkIndex, ReadAt, Slot};
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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

    // The newest state the appliance published (a round, else the snapshot the VM started from):
    // the target is compared with it while the appliance freezes round 1.
    let origin: api::VmOrigin = vm_origin(&api, &a.vm)?;
    let base = match origin.rounds.last() {
        Some(r) => read_round(&store, &a.vm, r.round, key.as_ref())?.indexes,
        None => {
            snapshot::store::open_snapshot(
                &store,
                &origin.host,
                Some(&origin.snapshot),
                key.as_ref(),
            )
            .with_context(|| format!("the snapshot VM {} was started from", a.vm))?
            .indexes
        }
    };
    let disks = open_targets(&targets, &a.vm, &base)?;
    if !a.json {
        println!(
            "failback of VM {} ({}/{}) onto {}",
            a.vm,
            origin.host,
            origin.snapshot,
            a.target.join(", ")
        );
    }
    let mut applied: Option<Vec<ChunkIndex>> = None;
    let mut rounds: Vec<RoundStats> = Vec::new();
    let mut want_final = false;
    // Per disk, the slots written by the rounds before the final one.
    let mut written: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); disks.len()];
    // Per disk, slots read back and found right while the VM was being stopped (against the
    // round applied before the final one).
    let mut pre_verified: Vec<Vec<usize>> = vec![Vec::new(); disks.len()];
    let (window, last) = loop {
        let asked = Instant::now();
        let ask = || {
            let n = request_round(&api, &a.vm, want_final, a.stop_timeout)?;
            read_round(&store, &a.vm, n, key.as_ref())
        };
        let (round, compared) = match &applied {
            // Round 1: the target compared with the base while the appliance freezes the VM.
            None => {
                let (round, cmp) = while_asking(ask, |_| compare(&disks, &base, threads))?;
                (round, Some(cmp))
            }
            // The cutover: while the VM is being stopped, what the rounds wrote is read back.
            Some(prev) if want_final => {
                let list = pre_verify_list(&a.verify, prev, &written);
                let (round, ok) =
                    while_asking(ask, |answered| pre_verify(&disks, prev, &list, answered))?;
                pre_verified = ok;
                (round, None)
            }
            Some(_) => (ask()?, None),
        };
        check_round(&round, &base)?;
        let prev = applied.as_deref().unwrap_or(&base);
        let stale = compared
            .as_ref()
            .map(|c| c.differ.as_slice())
            .unwrap_or(&[]);
        let (mut st, wrote) = apply(&store, &disks, &round, prev, stale, threads)?;
        if let Some(c) = &compared {
            st.slots_considered = c.slots;
            st.slots_hashed = c.slots;
            st.bytes_hashed = c.bytes;
        }
        st.bytes_fetched += round.meta_bytes;
        st.seconds = asked.elapsed().as_secs_f64();
        if !a.json {
            println!(
                "  round {}{}: {} slots {}, {} written, {} fetched, {:.1}s",
                st.round,
                if st.is_final { " (final)" } else { "" },
                st.slots_considered,
                if compared.is_some() {
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
        let is_final = round.file.is_final;
        rounds.push(st);
        if is_final {
            // The final delta read back and checked: the end of the cutover window. The slots
            // it did not write were proven before (compared, or written and checked earlier).
            verify(&disks, &round.indexes, &wrote, threads)?;
            break (asked.elapsed().as_secs_f64(), round);
        }
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
        for (k, c) in check.iter_mut().enumerate() {
            let (fin, p) = (&last.indexes[k], &prev[k]);
            let done: HashSet<usize> = pre_verified[k]
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

/// What the VM was started from and the rounds published so far.
fn vm_origin(api: &ApplianceClient, vm: &str) -> Result<api::VmOrigin> {
    let path = format!("failover/{vm}");
    match api.call("GET", &path, "application/json", &[]) {
        Ok((_, body)) => serde_json::from_slice(&body)
            .map_err(|e| anyhow!("{}: malformed VM status: {e}", api.url(&path))),
        Err(FetchError::NotFound(_)) => bail!(
            "{}: not found: no failover VM named {vm} on this appliance (or no failover API)",
            api.url(&path)
        ),
        Err(FetchError::Other(e)) => Err(e.context("reading the VM's status")),
    }
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

/// Round 1's comparison: the slots of each target that differ from `base`.
struct Compared {
    differ: Vec<Vec<usize>>,
    slots: u64,
    bytes: u64,
}

/// Read every data and zero slot of each target (a hole of a target file is judged without a
/// read) and hash it against `base`, on at least four threads so that one thread's read overlaps
/// another's hashing.
fn compare(disks: &[Disk], base: &[ChunkIndex], threads: usize) -> Result<Compared> {
    let mut c = Compared {
        differ: Vec::new(),
        slots: 0,
        bytes: 0,
    };
    for (disk, idx) in disks.iter().zip(base) {
        let slots = round_slots(idx, None);
        c.slots += slots.len() as u64;
        c.bytes += slots.iter().map(|&i| idx.span(i).1).sum::<u64>();
        let (_, differ) = read_back(disk, idx, &slots, threads.max(4))
            .with_context(|| format!("comparing {} with the VM's disk", disk.name))?;
        c.differ.push(differ);
    }
    Ok(c)
}

/// The slots `--verify` reads back after cutover, as far as the rounds so far know them: checked
/// against the last round applied while the VM is being stopped.
fn pre_verify_list(
    mode: &str,
    prev: &[ChunkIndex],
    written: &[BTreeSet<usize>],
) -> Vec<Vec<usize>> {
    match mode {
        "full" => prev.iter().map(|i| round_slots(i, None)).collect(),
        "written" => written
            .iter()
            .map(|w| w.iter().copied().collect())
            .collect(),
        _ => vec![Vec::new(); prev.len()],
    }
}

/// Read `list` back against `prev` in batches until the final round is `answered()` (it is not
/// delayed by more than one batch). Returns the slots found right; one that is not is an error.
fn pre_verify(
    disks: &[Disk],
    prev: &[ChunkIndex],
    list: &[Vec<usize>],
    answered: &dyn Fn() -> bool,
) -> Result<Vec<Vec<usize>>> {
    const BATCH: usize = 8;
    let mut ok = vec![Vec::new(); disks.len()];
    for (k, (disk, idx)) in disks.iter().zip(prev).enumerate() {
        for batch in list[k].chunks(BATCH) {
            if answered() {
                return Ok(ok);
            }
            let (_, bad) = read_back(disk, idx, batch, 4)
                .with_context(|| format!("verifying {}", disk.name))?;
            if let Some(&i) = bad.first() {
                bail!(
                    "verifying {}: the slot at offset {} differs from what this failback wrote: \
                     something else wrote to the target; run failback again",
                    disk.name,
                    idx.span(i).0
                );
            }
            ok[k].extend_from_slice(batch);
        }
    }
    Ok(ok)
}

/// A round must describe the disks the comparison was made with.
fn check_round(round: &Round, base: &[ChunkIndex]) -> Result<()> {
    let same = round.indexes.len() == base.len()
        && round
            .indexes
            .iter()
            .zip(base)
            .all(|(r, b)| r.disk_size == b.disk_size && r.chunk_size == b.chunk_size);
    if !same {
        bail!(
            "round {} of VM {}: its disks are not those of the snapshot it was started from",
            round.file.round,
            round.file.vm
        );
    }
    Ok(())
}

fn open_targets(targets: &[Target], vm: &str, base: &[ChunkIndex]) -> Result<Vec<Disk>> {
    if targets.len() != base.len() {
        bail!(
            "VM {vm} has {} disks; --target names {}",
            base.len(),
            targets.len()
        );
    }
    targets
        .iter()
        .zip(base)
        .enumerate()
        .map(|(k, (t, idx))| {
            if t.size < idx.disk_size {
                bail!(
                    "target {} is too small for disk {k}: {} bytes needed, it has {}",
                    t.path.display(),
                    idx.disk_size,
                    t.size
                );
            }
            let block = t.kind == Kind::Block;
            Disk::open(&t.path, block, t.logical_sector.unwrap_or(512), t.size)
        })
        .collect()
}

/// The data and zero slots of `idx`, or those whose digest differs from `prev`.
fn round_slots(idx: &ChunkIndex, prev: Option<&ChunkIndex>) -> Vec<usize> {
    idx.slots()
        .filter(|&(i, s)| s != Slot::Unused && prev.is_none_or(|p| p.digest(i) != idx.digest(i)))
        .map(|(i, _)| i)
        .collect()
}

/// Apply one round to every disk: the slots whose digest differs from `prev` (the round applied
/// before, or the base round 1 was compared with) and the `stale` ones (found differing by that
/// comparison). Returns, per disk, the slots written.
fn apply(
    store: &dyn Store,
    disks: &[Disk],
    round: &Round,
    prev: &[ChunkIndex],
    stale: &[Vec<usize>],
    threads: usize,
) -> Result<(RoundStats, Vec<Vec<usize>>)> {
    const PARTLY: &str = "the target is partly updated: run failback again to finish it";
    let mut st = RoundStats {
        round: round.file.round,
        is_final: round.file.is_final,
        appliance_changed_slots: round.file.disks.iter().map(|d| d.changed_slots).sum(),
        ..RoundStats::default()
    };
    let mut written = Vec::new();
    for (k, disk) in disks.iter().enumerate() {
        let idx = &round.indexes[k];
        let changed = round_slots(idx, Some(&prev[k]));
        st.slots_considered += changed.len() as u64;
        let mut todo: BTreeSet<usize> = changed.into_iter().collect();
        let extra = stale.get(k).into_iter().flatten().copied();
        todo.extend(extra.filter(|&i| idx.slot(i) != Slot::Unused));
        let number = round.file.disks[k].number;
        // Slot 0, the partition table, goes last (after a sync of the rest).
        let w = DiskWriter::new(Layout::plain(number), idx, disk);
        let skip: HashSet<usize> = (0..idx.len()).filter(|i| !todo.contains(i)).collect();
        w.write_data(store, &skip, threads, &ProgressBar::hidden())
            .and_then(|()| disk.sync())
            .context(PARTLY)
            .with_context(|| {
                format!("round {}, disk {number} ({})", round.file.round, disk.name)
            })?;
        let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
        st.slots_written += todo.len() as u64;
        st.bytes_written += get(&w.counters.written_bytes);
        st.bytes_fetched += get(&w.counters.fetched_bytes);
        st.chunks_fetched += get(&w.counters.fetched_chunks);
        written.push(todo.into_iter().collect());
    }
    Ok((st, written))
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
                "verifying {}: {} slots differ from the final round (first at offset {}): \
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
        let all: Vec<usize> = (0..20).collect();
        let disks = [disk];
        // Not answered: every slot read back and found right.
        let ok = pre_verify(&disks, &[idx.clone()], &[all.clone()], &|| false).unwrap();
        assert_eq!(ok[0], all);
        // Answered at once: nothing more is read.
        let ok = pre_verify(&disks, &[idx.clone()], &[all.clone()], &|| true).unwrap();
        assert!(ok[0].is_empty());
        // A slot someone else changed is an error naming its offset.
        let mut other = idx.clone();
        other.set(13, Slot::Data(snapshot::Digest::of(b"not this")));
        let e = pre_verify(&disks, &[other], &[all], &|| false).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&format!("offset {}", 13 * slot)), "{msg}");
    }
}
