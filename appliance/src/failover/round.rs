//! Failback rounds: freeze the VM's overlays (a new overlay on top, through QMP, while the VM
//! runs), turn the frozen overlays' changed 4 MiB slots into chunks, and publish a signed round:
//!
//! ```text
//! STORE/failover/<vm>/rounds/<n>/round.json   what the round holds (below), JSON
//! STORE/failover/<vm>/rounds/<n>/round.sig    ed25519 signature of round.json (as manifest.sig)
//! STORE/failover/<vm>/rounds/<n>/disk<N>.idx  the VM's disk N at freeze time: a full chunk index
//! STORE/failover/<vm>/latest                  text: the newest published round number
//! ```
//!
//! A round index is complete (slots the VM never touched keep the snapshot's digests), so a
//! restorer can make any target exact from one round; `changed` lists the slots re-read since
//! the previous round, so it can also apply only those. What a crash at each step leaves:
//!
//! 1. freeze (QMP transaction over all disks; the new overlays are recorded in `state.json`
//!    right away): a crash after it leaves frozen overlays that no round covers yet; the next
//!    round includes them (`consumed` marks what published rounds cover);
//! 2. chunks: stored one by one with the store's usual temp-name-and-rename, under the writer
//!    lock; a crash leaves unreferenced chunks (gc collects them);
//! 3. the round directory is assembled in `STORE/tmp/`, fsynced and renamed into place, then
//!    `latest` moves; a crash before the rename publishes nothing.

use super::qmp::Qmp;
use super::state::{self, Phase, RoundRecord, VmState};
use super::vm;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::Digest as _;
use snapshot::chunker::{chunk_disk, ChunkOptions};
use snapshot::store::LocalStore;
use snapshot::{ChunkIndex, Extents, CHUNK_SIZE};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

pub use snapshot::round::{Round, RoundDisk, ROUND_VERSION};

/// Slot runs `[first, count]` of the slots an extent set touches.
fn slot_runs(changed: &Extents) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in changed.ranges() {
        let (first, last) = (s / CHUNK_SIZE, (e - 1) / CHUNK_SIZE);
        match runs.last_mut() {
            Some(r) if r.0 + r.1 >= first => r.1 = r.1.max(last + 1 - r.0),
            _ => runs.push((first, last + 1 - first)),
        }
    }
    runs
}

/// Whole slots covering `runs`, as byte extents of a disk of `size` bytes.
fn slot_extents(runs: &[(u64, u64)], size: u64) -> Extents {
    let mut e = Extents::new();
    for &(first, count) in runs {
        e.add(first * CHUNK_SIZE, ((first + count) * CHUNK_SIZE).min(size));
    }
    e
}

/// The index a round builds on: the previous round's, or the snapshot's for round 1.
fn previous_indexes(store: &LocalStore, st: &VmState) -> Result<Vec<ChunkIndex>> {
    match st.rounds.last() {
        Some(r) => {
            let dir = state::published_dir(store, &st.name).join(format!("rounds/{}", r.round));
            st.disks
                .iter()
                .map(|d| {
                    let p = dir.join(format!("disk{}.idx", d.number));
                    let b = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    ChunkIndex::parse(&b, &p.display().to_string())
                })
                .collect()
        }
        None => {
            let key = store.public_key()?;
            let snap =
                snapshot::store::open_snapshot(store, &st.host, Some(&st.snapshot), Some(&key))?;
            Ok(snap.indexes)
        }
    }
}

/// Freeze every disk: a new empty overlay on top of each active one. A running VM switches
/// to the new overlays atomically (one QMP transaction); a stopped VM gets them with qemu-img
/// so that a later restart never writes into a frozen image.
fn freeze(store: &LocalStore, st: &mut VmState) -> Result<()> {
    let dir = st.dir(store);
    let gen = st.disks[0].overlays.len();
    let running = st.pid.is_some_and(|p| vm::alive(p, &st.qmp));
    let names: Vec<String> = st
        .disks
        .iter()
        .map(|d| format!("disk{}.{gen}.qcow2", d.number))
        .collect();
    for n in &names {
        let _ = fs::remove_file(dir.join(n));
    }
    if running {
        let actions: Vec<_> = st
            .disks
            .iter()
            .zip(&names)
            .map(|(d, n)| {
                serde_json::json!({"type": "blockdev-snapshot-sync", "data": {
                    "device": format!("disk{}", d.number),
                    "snapshot-file": dir.join(n).display().to_string(),
                    "format": "qcow2"}})
            })
            .collect();
        let mut q = Qmp::connect(&st.qmp, Duration::from_secs(30))?;
        q.execute("transaction", serde_json::json!({ "actions": actions }))
            .context("freezing the VM's disks")?;
    } else {
        for (k, n) in names.iter().enumerate() {
            vm::create_overlay(&st.active(store, k), "qcow2", &dir.join(n))?;
        }
    }
    for (d, n) in st.disks.iter_mut().zip(names) {
        d.overlays.push(n);
    }
    st.save(store)
}

/// Changed guest byte ranges of disk `k` in the overlays `[from, to)`.
fn changed_extents(dir: &Path, st: &VmState, k: usize, from: usize, to: usize) -> Result<Extents> {
    let mut all = Extents::new();
    for name in &st.disks[k].overlays[from..to] {
        let img = super::qcow2::Qcow2::open(&dir.join(name))?;
        for &(s, e) in img.allocated()?.ranges() {
            all.add(s, e);
        }
    }
    Ok(all)
}

/// What one round did, for the caller's summary.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub vm: String,
    pub round: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Path of the round directory relative to the store root.
    pub path: String,
    pub changed_slots: u64,
    pub changed_stored_bytes: u64,
    pub new_chunk_bytes: u64,
    pub seconds: f64,
    /// For the final round: how the VM stopped (`powered-off` by ACPI, or `forced`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_stop: Option<String>,
    /// For the final round: Unix ms when the VM was asked to stop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutover_requested_ms: Option<u64>,
}

/// Make and publish the next round of `name`; `cutover` stops the VM first and publishes its
/// last state as the final round. A cutover of a VM that is already failed back returns the
/// final round again (so a client retrying after a lost answer gets the same result).
pub fn run(
    store: &LocalStore,
    name: &str,
    cutover: bool,
    stop_timeout: Duration,
) -> Result<RoundReport> {
    let dir = state::vm_dir(store, name);
    VmState::load(store, name)?; // a clear error for an unknown VM, before any lock file
    let _lock = state::lock(&dir)?;
    let mut st = VmState::load(store, name)?;
    let started = Instant::now();
    if st.phase == Phase::FailedBack {
        let last = st.rounds.last().context("failed back without a round")?;
        if !cutover {
            bail!(
                "VM {name} is failed back (final round {}); no more rounds",
                last.round
            );
        }
        return Ok(report_of(&st, last, None));
    }
    let mut vm_stop = None;
    if cutover {
        if st.cutover_requested_ms.is_none() {
            st.cutover_requested_ms = Some(state::now_unix_ms());
            st.save(store)?;
        }
        let clean = vm::stop(&st, stop_timeout, false)?;
        vm_stop = Some(if clean { "powered-off" } else { "forced" }.to_string());
        st.phase = Phase::Stopped;
        st.pid = None;
        st.stopped_at = Some(state::now_unix());
        st.save(store)?;
    }
    freeze(store, &mut st)?;
    let frozen = st.disks[0].overlays.len() - 1; // overlays [consumed, frozen) are new to rounds
    let n = st.rounds.last().map(|r| r.round).unwrap_or(0) + 1;
    let prev = previous_indexes(store, &st)?;
    let _writer = store.writer()?;
    let opts = ChunkOptions::default();
    let mut disks = Vec::new();
    let mut indexes = Vec::new();
    let (mut changed_total, mut stored_total, mut new_total) = (0u64, 0u64, 0u64);
    for (k, d) in st.disks.iter().enumerate() {
        let changed = changed_extents(&dir, &st, k, st.consumed, frozen)?;
        let runs = slot_runs(&changed);
        let extents = slot_extents(&runs, d.size);
        let top = dir.join(&d.overlays[frozen - 1]);
        let chain = super::qcow2::Chain::open(&top)?;
        let (delta, stats) = chunk_disk(&chain, &extents, store, &opts, &|_| {})
            .with_context(|| format!("round {n}, disk {}", d.number))?;
        let mut index = prev[k].clone();
        if index.disk_size != d.size {
            bail!(
                "disk {}: the previous index covers {} bytes, the VM disk {}",
                d.number,
                index.disk_size,
                d.size
            );
        }
        let mut slots = 0u64;
        for &(first, count) in &runs {
            for i in first..first + count {
                index.set(i as usize, delta.slot(i as usize));
                slots += 1;
            }
        }
        let bytes = index.to_bytes();
        disks.push(RoundDisk {
            number: d.number,
            size: d.size,
            index_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            changed: runs,
            changed_slots: slots,
            changed_stored_bytes: stats.referenced_bytes,
        });
        indexes.push(bytes);
        changed_total += slots;
        stored_total += stats.referenced_bytes;
        new_total += stats.new_bytes;
    }
    let round = Round {
        version: ROUND_VERSION,
        vm: st.name.clone(),
        host: st.host.clone(),
        snapshot: st.snapshot.clone(),
        round: n,
        is_final: cutover,
        created: state::now_rfc3339(),
        disks,
    };
    publish(store, &round, &indexes)?;
    let rec = RoundRecord {
        round: n,
        created: round.created.clone(),
        is_final: cutover,
        changed_slots: changed_total,
        changed_stored_bytes: stored_total,
        seconds: started.elapsed().as_secs_f64(),
    };
    st.rounds.push(rec.clone());
    st.consumed = frozen;
    if cutover {
        st.phase = Phase::FailedBack;
    }
    st.save(store)?;
    let mut r = report_of(&st, &rec, vm_stop);
    r.new_chunk_bytes = new_total;
    Ok(r)
}

fn report_of(st: &VmState, rec: &RoundRecord, vm_stop: Option<String>) -> RoundReport {
    RoundReport {
        vm: st.name.clone(),
        round: rec.round,
        is_final: rec.is_final,
        path: format!("failover/{}/rounds/{}", st.name, rec.round),
        changed_slots: rec.changed_slots,
        changed_stored_bytes: rec.changed_stored_bytes,
        new_chunk_bytes: 0,
        seconds: rec.seconds,
        vm_stop,
        cutover_requested_ms: if rec.is_final {
            st.cutover_requested_ms
        } else {
            None
        },
    }
}

/// Write the round directory under `tmp/`, fsync, rename into place, then move `latest`.
fn publish(store: &LocalStore, round: &Round, indexes: &[Vec<u8>]) -> Result<()> {
    let key = store.signing_key()?;
    let base = state::published_dir(store, &round.vm);
    let rounds = base.join("rounds");
    fs::create_dir_all(&rounds).with_context(|| format!("creating {}", rounds.display()))?;
    let dest = rounds.join(round.round.to_string());
    if dest.exists() {
        bail!("{}: round already published", dest.display());
    }
    let tmp = store.root().join("tmp").join(format!(
        "round-{}-{}.{}",
        round.vm,
        round.round,
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let json = round.to_bytes();
    write_synced(&tmp.join("round.json"), &json)?;
    write_synced(&tmp.join("round.sig"), key.sign(&json).as_bytes())?;
    for (d, idx) in round.disks.iter().zip(indexes) {
        write_synced(&tmp.join(format!("disk{}.idx", d.number)), idx)?;
    }
    sync_path(&tmp)?;
    // The chunks' directory entries become durable before anything refers to them.
    let root = fs::File::open(store.root())
        .with_context(|| format!("opening {}", store.root().display()))?;
    snapshot::sys::syncfs(&root).context("syncing the store")?;
    fs::rename(&tmp, &dest).with_context(|| format!("publishing {}", dest.display()))?;
    sync_path(&rounds)?;
    let latest_tmp = base.join(".latest.tmp");
    write_synced(&latest_tmp, format!("{}\n", round.round).as_bytes())?;
    fs::rename(&latest_tmp, base.join("latest"))
        .with_context(|| format!("updating {}/latest", base.display()))?;
    sync_path(&base)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_path(p: &Path) -> Result<()> {
    fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_slots() {
        let mut e = Extents::new();
        e.add(0, 65536);
        e.add(CHUNK_SIZE - 10, CHUNK_SIZE + 10);
        e.add(5 * CHUNK_SIZE, 5 * CHUNK_SIZE + 1);
        e.add(7 * CHUNK_SIZE + 5, 9 * CHUNK_SIZE);
        assert_eq!(slot_runs(&e), vec![(0, 2), (5, 1), (7, 2)]);
        let x = slot_extents(&[(0, 2), (9, 1)], 9 * CHUNK_SIZE + 100);
        assert_eq!(
            x.ranges(),
            &[(0, 2 * CHUNK_SIZE), (9 * CHUNK_SIZE, 9 * CHUNK_SIZE + 100)]
        );
    }
}
