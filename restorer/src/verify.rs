//! `restorer verify`: compare target disks with a snapshot. Every used slot is read back: slots
//! clear of the partition table are hashed and compared with the index; slots the table touches
//! are compared byte by byte with the chunk (source table bytes zeroed, the target's table patched
//! in, exactly as the restore writes them). Slots inside a partition the restore grew differ by
//! design (the filesystem's metadata changed) and are reported as expected.

use crate::cli::VerifyArgs;
use crate::dio::{AlignedBuf, Disk};
use crate::plan::{self, DiskPlan, Source};
use crate::report::bytes;
use crate::slots::slot_buf;
use crate::table;
use crate::target::{Kind, Safety};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use snapshot::chunker::is_zero;
use snapshot::ptable::PartitionTable;
use snapshot::store::{fetch_chunk, Store};
use snapshot::threads::par_each;
use snapshot::{ChunkIndex, Digest, Extents, Slot, CHUNK_SIZE};
use std::sync::Mutex;
use std::time::Instant;

/// One slot whose content on the target is not the snapshot's.
#[derive(Debug, Clone, Serialize)]
pub struct SlotDiff {
    pub slot: usize,
    pub offset: u64,
    pub len: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// `data`, `zeros` or `table`.
    pub kind: &'static str,
    pub expected: String,
    pub found: String,
    /// Inside a partition the restore grew: a difference by design.
    pub expected_change: bool,
}

#[derive(Debug, Serialize)]
pub struct DiskReport {
    pub disk: u32,
    pub target: String,
    pub compared_slots: u64,
    pub compared_bytes: u64,
    pub skipped_unused_bytes: u64,
    pub differences: Vec<SlotDiff>,
    pub seconds: f64,
}

impl DiskReport {
    fn unexpected(&self) -> usize {
        self.differences
            .iter()
            .filter(|d| !d.expected_change)
            .count()
    }
}

pub fn run(a: &VerifyArgs) -> Result<()> {
    let src = Source::open(&a.source)?;
    let safety = Safety::scan()?;
    let targets = plan::targets(&a.layout, &src.snapshot.manifest.disks, &safety)?;
    let plan = plan::build(&src, targets, None, &a.layout, &plan::Mins::new())?;
    let mut reports = Vec::new();
    for d in plan.disks.iter().filter(|d| !d.relocate.is_empty()) {
        let parts: Vec<String> = d.relocate.iter().map(|p| p.number.to_string()).collect();
        eprintln!(
            "disk {}: partitions {} were shrunk or moved onto the smaller target: not compared with the snapshot (check them with fsck); the rest is",
            d.disk,
            parts.join(", ")
        );
    }
    for (d, index) in plan.disks.iter().zip(&src.snapshot.indexes) {
        reports.push(
            verify_disk(src.store.as_ref(), d, index, a.jobs as usize)
                .with_context(|| format!("disk {} ({})", d.disk, d.target.path.display()))?,
        );
    }
    let bad: usize = reports.iter().map(DiskReport::unexpected).sum();
    if a.json {
        let v = serde_json::json!({
            "host": plan.host, "snapshot": plan.snapshot, "identical": bad == 0, "disks": reports,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in &reports {
            let expected = r.differences.len() - r.unexpected();
            println!(
                "disk {} ({}): {} slots ({}) compared in {:.1}s, {} differ{}",
                r.disk,
                r.target,
                r.compared_slots,
                bytes(r.compared_bytes),
                r.seconds,
                r.unexpected(),
                if expected > 0 {
                    format!(" ({expected} more in grown filesystems, as expected)")
                } else {
                    String::new()
                }
            );
            for d in r.differences.iter().filter(|d| !d.expected_change).take(50) {
                let part = d
                    .partition
                    .map(|p| format!(", partition {p}"))
                    .unwrap_or_default();
                println!(
                    "  slot {} at {} ({}{part}): {} differs: expected {}, found {}",
                    d.slot,
                    d.offset,
                    bytes(d.len),
                    d.kind,
                    d.expected,
                    d.found
                );
            }
            if r.unexpected() > 50 {
                println!("  ... and {} more", r.unexpected() - 50);
            }
        }
    }
    if bad > 0 {
        bail!(
            "the targets differ from snapshot {}/{} in {bad} slot(s)",
            plan.host,
            plan.snapshot
        );
    }
    if !a.json {
        println!("targets match snapshot {}/{}", plan.host, plan.snapshot);
    }
    Ok(())
}

fn verify_disk(
    store: &dyn Store,
    d: &DiskPlan,
    index: &ChunkIndex,
    threads: usize,
) -> Result<DiskReport> {
    let t0 = Instant::now();
    let t = &d.target;
    let disk = Disk::open_read(&t.path, t.kind == Kind::Block, d.target_sector, t.size)?;
    let patches = table::to_disk(&expected_table(d)?, t.size, d.target_sector)?;
    let mut patched = Extents::new();
    for (at, b) in &patches {
        patched.add(*at, at + b.len() as u64);
    }
    let mut special = patched.clone();
    for &(s, e) in d.source_table.ranges() {
        special.add(s, e);
    }
    let grown: Vec<(u64, u64)> = d
        .resize
        .iter()
        .map(|r| (r.offset, r.offset + r.size))
        .collect();
    let part_of = |off: u64| {
        d.partitions
            .iter()
            .find(|p| p.offset <= off && off < p.offset + p.size)
            .map(|p| p.number)
    };
    // Partitions rebuilt onto a smaller target differ from the snapshot by design.
    let kept = |i: usize| {
        let (o, l) = index.span(i);
        d.keep_end.is_none_or(|k| o + l <= k)
    };
    let slots: Vec<usize> = index
        .slots()
        .filter(|&(i, s)| s != Slot::Unused && kept(i))
        .map(|(i, _)| i)
        .collect();
    let diffs = Mutex::new(Vec::new());
    par_each(threads, "reader", slots.len(), slot_buf, |buf, k| {
        let i = slots[k];
        let (off, len) = index.span(i);
        let found = compare_slot(store, &disk, index, i, buf, &special, d, &patches)?;
        if let Some((kind, expected, found)) = found {
            let expected_change = grown.iter().any(|&(s, e)| off < e && s < off + len);
            diffs.lock().expect("lock").push(SlotDiff {
                slot: i,
                offset: off,
                len,
                partition: part_of(off),
                kind,
                expected,
                found,
                expected_change,
            });
        }
        Ok(())
    })?;
    // Table bytes past the snapshot's disk (the backup GPT of a bigger target).
    let mut diffs = diffs.into_inner().expect("lock");
    for (at, b) in &patches {
        let (ps, pe) = (*at, at + b.len() as u64);
        if ps < d.source_size {
            continue;
        }
        let (ws, wl) = disk.widen(ps, pe - ps);
        let mut buf = AlignedBuf::new(wl as usize);
        disk.read_at(&mut buf, ws)?;
        let got = &buf[(ps - ws) as usize..(pe - ws) as usize];
        if got != &b[..] {
            diffs.push(SlotDiff {
                slot: (ps / CHUNK_SIZE) as usize,
                offset: ps,
                len: pe - ps,
                partition: None,
                kind: "table",
                expected: format!("{} table bytes", b.len()),
                found: "other bytes".into(),
                expected_change: false,
            });
        }
    }
    diffs.sort_by_key(|x| x.offset);
    Ok(DiskReport {
        disk: d.disk,
        target: t.path.display().to_string(),
        compared_slots: slots.len() as u64,
        compared_bytes: slots.iter().map(|&i| index.span(i).1).sum(),
        skipped_unused_bytes: d.unused_bytes,
        differences: diffs,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

type Diff = (&'static str, String, String);

/// Compare slot `i`; `None` when it matches, else (kind, expected, found).
/// The table the target should hold. A restore onto a smaller target placed the partitions it
/// rebuilt by the minimums it measured: their places are taken from the target's own table, after
/// checking that every other partition is where the plan puts it.
fn expected_table(d: &DiskPlan) -> Result<PartitionTable> {
    if d.relocate.is_empty() {
        return Ok(d.new_table.clone());
    }
    let dev = snapshot::DiskSource::open(&d.target.path)?;
    let (found, _) = PartitionTable::read(&dev, Some(d.target_sector))
        .context("reading the target's partition table")?;
    let on_disk = found.partitions(d.target_sector);
    for p in &d.partitions {
        let there = on_disk.iter().find(|q| q.number == p.number);
        let rebuilt = d.relocate.iter().any(|r| r.number == p.number);
        match there {
            None => bail!("the target's table has no partition {}", p.number),
            Some(q) if !rebuilt && (q.offset, q.size) != (p.offset, p.size) => bail!(
                "the target's partition {} is at {} ({} bytes), the plan puts it at {} ({} bytes)",
                p.number,
                q.offset,
                q.size,
                p.offset,
                p.size
            ),
            Some(_) => {}
        }
    }
    Ok(found)
}

#[allow(clippy::too_many_arguments)]
fn compare_slot(
    store: &dyn Store,
    disk: &Disk,
    index: &ChunkIndex,
    i: usize,
    buf: &mut AlignedBuf,
    special: &Extents,
    d: &DiskPlan,
    patches: &[(u64, Vec<u8>)],
) -> Result<Option<Diff>> {
    let (off, len) = index.span(i);
    let got = disk.read_span(off, len, buf)?;
    let slot = index.slot(i);
    if special.within(off, off + len).next().is_none() {
        return Ok(match slot {
            Slot::Zeros if !is_zero(got) => Some(("zeros", "zeros".into(), Digest::of(got).hex())),
            Slot::Data(e) => {
                let f = Digest::of(got);
                (f != e).then(|| ("data", e.hex(), f.hex()))
            }
            _ => None,
        });
    }
    // The table touches this slot: build the expected bytes as the restore writes them.
    let mut want = match slot {
        Slot::Data(dg) => fetch_chunk(store, &dg)?.0,
        _ => vec![0u8; len as usize],
    };
    for (s, e) in d.source_table.within(off, off + len) {
        want[(s - off) as usize..(e - off) as usize].fill(0);
    }
    for (at, b) in patches {
        let (ps, pe) = (*at, at + b.len() as u64);
        let (a, e) = (ps.max(off), pe.min(off + len));
        if a < e {
            want[(a - off) as usize..(e - off) as usize]
                .copy_from_slice(&b[(a - ps) as usize..(e - ps) as usize]);
        }
    }
    if want == got {
        return Ok(None);
    }
    let first = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0) as u64 + off;
    let in_table = patches
        .iter()
        .any(|(at, b)| *at <= first && first < at + b.len() as u64);
    Ok(Some((
        if in_table { "table" } else { "data" },
        Digest::of(&want).hex(),
        format!(
            "{} (first difference at byte {first})",
            Digest::of(got).hex()
        ),
    )))
}
