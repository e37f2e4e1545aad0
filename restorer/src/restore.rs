//! `restorer restore`: open the snapshot along the trust chain, plan every disk, show the plan,
//! then write: wipe and mark every target, write the data, grow filesystems, write the tables
//! last, re-read the partitions. On failure the tables are wiped (unless `--keep-on-error`).

use crate::cli::RestoreArgs;
use crate::dio::Disk;
use crate::marker::Marker;
use crate::pipeline::DiskWriter;
use crate::plan::{self, Plan, Source};
use crate::report::{self, DiskSummary};
use crate::shrink::Rebuilt;
use crate::target::{Kind, Safety};
use crate::{adapt, bootentry, resize, shrink, table};
use anyhow::{Context, Result};
use snapshot::Slot;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub fn run(a: &RestoreArgs) -> Result<()> {
    let started = Instant::now();
    let src = Source::open(&a.source)?;
    let safety = Safety::scan()?;
    let targets = plan::targets(&a.layout, &src.snapshot.manifest.disks, &safety)?;
    let mut plan = plan::build(&src, targets, Some(&safety), &a.layout, &plan::Mins::new())?;
    if !a.json {
        plan.print();
        if !a.no_adapt {
            for l in adapt::plan_lines(&src.snapshot.manifest) {
                println!("adapt: {l}");
            }
        }
    }
    if a.dry_run {
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "plan": plan, "peak_memory_bytes": report::peak_memory(),
                }))?
            );
        } else {
            println!("dry run: nothing written");
        }
        return Ok(());
    }
    // Everything that can fail without writing is done before the first write: rebuild and
    // shrink what moves onto a smaller target, open every target (exclusively for block devices)
    // and lay out every table.
    let rebuilt = if plan.disks.iter().any(|d| !d.relocate.is_empty()) {
        let (p, r) = rebuild(a, &src, &safety, plan)?;
        plan = p;
        r
    } else {
        Vec::new()
    };
    let mut disks = Vec::new();
    let mut patches = Vec::new();
    for d in &plan.disks {
        let t = &d.target;
        disks.push(
            Disk::open(&t.path, t.kind == Kind::Block, d.target_sector, t.size)
                .with_context(|| format!("disk {}", d.disk))?,
        );
        patches.push(
            table::to_disk(&d.new_table, t.size, d.target_sector)
                .with_context(|| format!("disk {}: writing the partition table", d.disk))?,
        );
    }
    let writers: Vec<DiskWriter> = plan
        .disks
        .iter()
        .zip(&src.snapshot.indexes)
        .zip(&disks)
        .map(|((d, index), disk)| {
            let m = Marker::new(&plan.host, &plan.snapshot, d.disk);
            DiskWriter::new(d.layout(&m), index, disk)
        })
        .collect();
    let mut started_disks = 0;
    let result = execute(
        a,
        &src,
        &plan,
        &writers,
        &patches,
        &rebuilt,
        &mut started_disks,
    );
    match result {
        Ok(summaries) => {
            // The targets are held exclusively while open: released, their partitions can be
            // mounted for the adaptation.
            drop(writers);
            drop(disks);
            let secs = started.elapsed().as_secs_f64();
            if !a.json {
                for s in &summaries {
                    s.print();
                }
                println!(
                    "restore of {}/{} written and verified in {secs:.1}s",
                    plan.host, plan.snapshot
                );
            }
            // The data is in place whatever happens now: an adaptation failure is reported,
            // never undone by wiping what was restored.
            let adapted = if a.no_adapt {
                if !a.json {
                    println!(
                        "adapt: skipped (--no-adapt): the restored OS is as it was on the source"
                    );
                }
                None
            } else {
                let paths: Vec<&std::path::Path> =
                    plan.disks.iter().map(|d| d.target.path.as_path()).collect();
                let old = adapt::old_nics(&src.snapshot.manifest);
                Some(
                    adapt::adapt(
                        &paths,
                        old,
                        &a.adapt,
                        a.source.net.http_options(),
                        false,
                        a.json,
                    )
                    .with_context(|| {
                        format!(
                            "{}/{} is restored, but adapting it to this machine failed",
                            plan.host, plan.snapshot
                        )
                    }),
                )
            };
            if a.json {
                let adapt = match &adapted {
                    Some(Ok(r)) => serde_json::to_value(r)?,
                    Some(Err(e)) => serde_json::json!({ "error": format!("{e:#}") }),
                    None => serde_json::Value::Null,
                };
                let v = serde_json::json!({
                    "plan": plan, "disks": summaries, "adapt": adapt,
                    "seconds": started.elapsed().as_secs_f64(),
                    "peak_memory_bytes": report::peak_memory(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            if let Some(r) = adapted {
                r?;
            }
            if !a.json {
                println!(
                    "restore of {}/{} complete in {:.1}s (peak memory {})",
                    plan.host,
                    plan.snapshot,
                    started.elapsed().as_secs_f64(),
                    report::bytes(report::peak_memory())
                );
            }
            Ok(())
        }
        Err(e) => {
            for w in writers.iter().take(started_disks) {
                let name = w.disk.name.clone();
                if a.keep_on_error {
                    eprintln!("restorer: {name}: kept as written (--keep-on-error); it has no valid partition table");
                } else {
                    match w.wipe_table() {
                        Ok(()) => eprintln!("restorer: {name}: partition table wiped"),
                        Err(we) => eprintln!(
                            "restorer: {name}: wiping the partition table failed too: {we:#}"
                        ),
                    }
                }
            }
            Err(e)
        }
    }
}

fn execute(
    a: &RestoreArgs,
    src: &Source,
    plan: &Plan,
    writers: &[DiskWriter],
    patches: &[Vec<(u64, Vec<u8>)>],
    rebuilt: &[Rebuilt],
    started_disks: &mut usize,
) -> Result<Vec<DiskSummary>> {
    let threads = a.jobs as usize;
    let mut summaries: Vec<DiskSummary> = Vec::new();
    let mut resume = Vec::new();
    // 1. Every target loses its table and gets the marker before any data is written.
    for (w, d) in writers.iter().zip(&plan.disks) {
        let mine = Marker::new(&plan.host, &plan.snapshot, d.disk);
        let found = w
            .read_marker()
            .with_context(|| format!("disk {}: reading the target", d.disk))?;
        if let Some(m) = &found {
            let what = if m.same_restore(&mine) {
                "an interrupted restore of this snapshot"
            } else {
                "an interrupted restore of another snapshot"
            };
            eprintln!(
                "disk {} ({}): found {what}; reading back what is already written",
                d.disk,
                d.target.path.display()
            );
        }
        resume.push(found.is_some());
        *started_disks += 1;
        w.wipe_table()
            .with_context(|| format!("disk {}: wiping the partition table", d.disk))?;
    }
    // 2. Data, disk by disk.
    for ((w, &resume), d) in writers.iter().zip(&resume).zip(&plan.disks) {
        let t0 = Instant::now();
        let total = d.data_bytes + d.zero_bytes;
        let pb = report::progress(total, &format!("disk {}", d.disk), a.json);
        let mut skip = HashSet::new();
        if resume {
            let wanted: Vec<usize> = w
                .index
                .slots()
                .filter(|(_, s)| *s != Slot::Unused)
                .map(|(i, _)| i)
                .collect();
            pb.set_message("reading back");
            skip = w.check_existing(&wanted, threads, &pb)?;
            pb.set_message("");
        }
        w.write_data(src.store.as_ref(), &skip, threads, &pb)?;
        w.disk.sync()?;
        pb.finish_and_clear();
        let mut lines = Vec::new();
        for r in rebuilt.iter().filter(|r| r.disk == d.disk) {
            let n = r
                .write(w.disk)
                .with_context(|| format!("disk {}: writing {}", d.disk, r.line))?;
            w.counters.written_bytes.fetch_add(n, Ordering::Relaxed);
            lines.push(format!(
                "{}; {} written and read back",
                r.line,
                report::bytes(n)
            ));
        }
        let c = &w.counters;
        let get = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed);
        summaries.push(DiskSummary {
            disk: d.disk,
            target: d.target.path.display().to_string(),
            fetched_bytes: get(&c.fetched_bytes),
            fetched_chunks: get(&c.fetched_chunks),
            written_bytes: get(&c.written_bytes),
            zero_bytes: get(&c.zero_bytes),
            skipped_bytes: d.unused_bytes,
            deduped_bytes: get(&c.deduped_bytes),
            verified_in_place_bytes: get(&c.verified_bytes),
            verified_in_place_slots: get(&c.verified_slots),
            hashed_bytes: get(&c.hashed_bytes),
            seconds: t0.elapsed().as_secs_f64(),
            busy: c.busy(threads),
            resized: lines,
            boot_entry: None,
            warnings: Vec::new(),
        });
    }
    // 3. Filesystems grow into their bigger partitions (data durable, table not yet written).
    for (s, d) in summaries.iter_mut().zip(&plan.disks) {
        for r in &d.resize {
            let t0 = Instant::now();
            match resize::grow(&d.target.path, d.target_sector, r) {
                Ok((line, warning)) => {
                    s.resized.push(line);
                    s.warnings.extend(warning);
                }
                Err(e) => s.warnings.push(format!(
                    "partition {}: growing the filesystem failed ({e:#}); it keeps its size of {}",
                    r.partition,
                    report::bytes(r.from_size)
                )),
            }
            s.seconds += t0.elapsed().as_secs_f64();
        }
    }
    // 4. Tables last, then the kernel re-reads them.
    for (((w, p), s), d) in writers
        .iter()
        .zip(patches)
        .zip(&mut summaries)
        .zip(&plan.disks)
    {
        w.write_table(p)
            .with_context(|| format!("disk {}: writing the partition table", d.disk))?;
        s.written_bytes = w.counters.written_bytes.load(Ordering::Relaxed);
        let file = w.disk.file().filter(|_| d.target.kind == Kind::Block);
        if let (Some(file), true) = (file, d.new_table != snapshot::ptable::PartitionTable::None) {
            let r = snapshot::sys::reread_partitions(file);
            // A loop device without partition scanning answers EINVAL: nothing to re-read.
            let loop_no_scan = d.target.transport == "loop"
                && matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EINVAL));
            if let (Err(e), false) = (r, loop_no_scan) {
                s.warnings.push(format!(
                    "the kernel did not re-read the partition table ({e}); reboot or run partprobe"
                ));
            }
        }
    }
    // 5. A UEFI boot entry for the restored system, when asked.
    if a.efi_boot_entry {
        let label = format!("{} (restored)", plan.host);
        for (s, d) in summaries.iter_mut().zip(&plan.disks) {
            let Some(esp) = bootentry::esp_of(&d.new_table, d.target_sector) else {
                continue;
            };
            if d.target.kind != Kind::Block || !bootentry::uefi_booted() {
                s.warnings.push(
                    "no UEFI boot entry written: it needs a UEFI-booted machine and a block device"
                        .into(),
                );
                continue;
            }
            match bootentry::add(&d.target.path, esp, d.target_sector, &label) {
                Ok(line) => s.boot_entry = Some(line),
                Err(e) => s.warnings.push(format!(
                    "no UEFI boot entry written ({e:#}); the firmware must find the loader itself"
                )),
            }
        }
    }
    Ok(summaries)
}

/// Rebuild every partition that shrinks or moves in the scratch directory, measure how small its
/// filesystem can be, plan again with those minimums, and shrink each to its final size. Nothing
/// is written to a target.
fn rebuild(
    a: &RestoreArgs,
    src: &Source,
    safety: &Safety,
    plan: Plan,
) -> Result<(Plan, Vec<Rebuilt>)> {
    let dir = a.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let need: u64 = plan.disks.iter().map(|d| d.scratch_bytes).sum();
    let free = shrink::scratch_free(&dir)?;
    if need > free {
        anyhow::bail!(
            "rebuilding the partitions that shrink needs {} in the scratch directory {}, which has {} free; give --scratch a bigger directory",
            report::bytes(need),
            dir.display(),
            report::bytes(free)
        );
    }
    let m = &src.snapshot.manifest;
    let mut out = Vec::new();
    let mut mins = plan::Mins::new();
    for (d, index) in plan.disks.iter().zip(&src.snapshot.indexes) {
        let disk = &m.disks[d.disk as usize];
        for pl in &d.relocate {
            let p = disk
                .partitions
                .iter()
                .find(|p| p.number == pl.number)
                .context("a planned partition")?;
            if !a.json {
                println!(
                    "disk {} partition {}: rebuilding {} in {}",
                    d.disk,
                    p.number,
                    report::bytes(shrink::data_within(index, p.offset, p.size)),
                    dir.display()
                );
            }
            let r = Rebuilt::fetch(
                src.store.as_ref(),
                index,
                d.disk,
                p,
                pl.clone(),
                &dir,
                a.jobs as usize,
            )?;
            if let (Some(kind), Some(f)) = (shrink::shrinkable(p), &p.fs) {
                let min = r.measure(kind, f.block_size).with_context(|| {
                    format!(
                        "disk {} partition {}: measuring how far it can shrink",
                        d.disk, p.number
                    )
                })?;
                mins.insert((d.disk, p.number), min);
            }
            out.push(r);
        }
    }
    let targets = plan.disks.iter().map(|d| d.target.clone()).collect();
    let plan = plan::build(src, targets, Some(safety), &a.layout, &mins)
        .context("planning again with the minimums the filesystems' tools measured")?;
    // The final places: partitions the measured plan no longer moves keep their rebuild unused.
    let mut kept = Vec::new();
    for mut r in out {
        let Some(d) = plan.disks.iter().find(|d| d.disk == r.disk) else {
            continue;
        };
        let Some(pl) = d.relocate.iter().find(|p| p.number == r.place.number) else {
            continue;
        };
        r.place = pl.clone();
        r.shrink(d.target_sector)?;
        if !a.json {
            println!("disk {}: {}", r.disk, r.line);
        }
        kept.push(r);
    }
    for d in &plan.disks {
        for pl in &d.relocate {
            if !kept
                .iter()
                .any(|r| r.disk == d.disk && r.place.number == pl.number)
            {
                anyhow::bail!(
                    "disk {} partition {}: planned to move with the measured minimums but not rebuilt",
                    d.disk,
                    pl.number
                );
            }
        }
    }
    Ok((plan, kept))
}
