//! `appliance ingest`: snapshot disks into the store. Per disk: read the partition table and the
//! filesystems' allocation maps ([`snapshot::layout`]), chunk the used ranges
//! ([`snapshot::chunker`]), then publish the signed manifest atomically.

use crate::cli::IngestArgs;
use crate::progress;
use anyhow::{Context, Result};
use snapshot::chunker::{chunk_disk, ChunkOptions, ChunkStats};
use snapshot::fs::exclude::Exclusions;
use snapshot::layout::{analyze_with, firmware_of};
use snapshot::manifest::{Firmware, Hardware, Manifest, MANIFEST_VERSION};
use snapshot::store::{check_name, check_snapshot_id, LocalStore};
use snapshot::CHUNK_SIZE;
use std::time::Instant;

pub fn run(a: &IngestArgs) -> Result<()> {
    check_name(&a.host, "host")?;
    let exclusions = Exclusions::from_args(&a.exclude, a.no_default_excludes)?;
    if let Some(id) = &a.snapshot {
        check_snapshot_id(id)?;
    }
    let store = LocalStore::open(&a.store)?;
    let writer = store.writer()?;
    // Reserved now, for the whole ingest: parallel ingests and upload sessions of this host
    // never pick the same id.
    let reservation = store.reserve_snapshot(&writer, &a.host, a.snapshot.as_deref())?;
    let id = reservation.id.clone();
    let started = Instant::now();
    let opts = ChunkOptions {
        zstd_level: a.level,
        ..ChunkOptions::default()
    };
    let mut disks = Vec::new();
    let mut indexes = Vec::new();
    let mut all_stats = Vec::new();
    // Filesystems copied whole because their allocation data could not be trusted.
    let mut warnings = Vec::new();
    // Files whose contents were left out (--exclude and the defaults).
    let mut excluded = Vec::new();
    let mut firmware = Firmware::Unknown;
    for (n, path) in a.sources.iter().enumerate() {
        let opened = crate::images::open(path, &store.root().join("tmp"))?;
        let dev = &opened.disk;
        let layout = analyze_with(dev, dev.device_sectors, a.raw, &exclusions)
            .with_context(|| format!("disk {n} ({})", path.display()))?;
        for note in &layout.notes {
            eprintln!("disk {n} ({}): {note}", path.display());
        }
        for p in &layout.partitions {
            for e in &p.excluded {
                excluded.push(serde_json::json!({
                    "disk": n, "partition": p.number, "path": e.path, "bytes": e.bytes,
                }));
            }
            for e in p.md.iter().flat_map(|m| &m.excluded) {
                excluded.push(serde_json::json!({
                    "disk": n, "partition": p.number, "md": p.md.as_ref().map(|m| &m.uuid),
                    "path": e.path, "bytes": e.bytes,
                }));
            }
            let pv = p
                .lvm
                .as_ref()
                .or(p.md.as_ref().and_then(|m| m.lvm.as_ref()));
            for lv in pv.iter().flat_map(|pv| &pv.vg.lvs) {
                for e in &lv.excluded {
                    excluded.push(serde_json::json!({
                        "disk": n, "partition": p.number, "lv": lv.name, "path": e.path,
                        "bytes": e.bytes,
                    }));
                }
            }
            if let Some(why) = &p.whole {
                warnings.push(format!(
                    "disk {n} partition {}: copied whole: {why}",
                    p.number
                ));
            }
        }
        if firmware == Firmware::Unknown {
            firmware = firmware_of(&layout.table).unwrap_or(Firmware::Unknown);
        }
        let pb = progress::bar(layout.size, &format!("disk {n}"));
        let (index, stats) = chunk_disk(dev, &layout.used, &store, &opts, &|done| {
            pb.set_position(done)
        })
        .with_context(|| format!("disk {n} ({})", path.display()))?;
        pb.finish_and_clear();
        let index_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(index.to_bytes()));
        disks.push(layout.into_disk(n as u32, index_sha256, &stats));
        indexes.push(index);
        all_stats.push((path.display().to_string(), stats));
    }
    firmware = match a.firmware.as_str() {
        "uefi" => Firmware::Uefi,
        "bios" => Firmware::Bios,
        _ => firmware,
    };
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        host: a.host.clone(),
        snapshot: id.clone(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        sequence: None,
        firmware,
        hardware: Hardware::default(),
        chunk_size: CHUNK_SIZE,
        disks,
    };
    store.commit_reserved(&reservation, &manifest, &indexes)?;
    summary(
        a,
        &id,
        &all_stats,
        &warnings,
        &excluded,
        started.elapsed().as_secs_f64(),
    )
}

fn summary(
    a: &IngestArgs,
    id: &str,
    stats: &[(String, ChunkStats)],
    warnings: &[String],
    excluded: &[serde_json::Value],
    secs: f64,
) -> Result<()> {
    let total = |f: fn(&ChunkStats) -> u64| stats.iter().map(|(_, s)| f(s)).sum::<u64>();
    let (size, used, new, referenced, read) = (
        total(|s| s.disk_size),
        total(|s| s.used_bytes),
        total(|s| s.new_bytes),
        total(|s| s.referenced_bytes),
        total(|s| s.bytes_read),
    );
    if a.json {
        let disks: Vec<_> = stats
            .iter()
            .map(|(path, s)| serde_json::json!({"source": path, "stats": s}))
            .collect();
        let v = serde_json::json!({
            "host": a.host, "snapshot": id, "seconds": secs, "logical_bytes": size, "used_bytes": used,
            "read_bytes": read, "new_bytes": new, "referenced_bytes": referenced, "disks": disks,
            "warnings": warnings, "excluded": excluded,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    use crate::list::human;
    println!("snapshot {}/{id} committed", a.host);
    for (n, (path, s)) in stats.iter().enumerate() {
        println!(
            "  disk {n} {path}: {} logical, {} used, {} new chunks ({}), {} data / {} zero / {} unused slots",
            human(s.disk_size),
            human(s.used_bytes),
            s.new_chunks,
            human(s.new_bytes),
            s.data_chunks,
            s.zero_chunks,
            s.unused_chunks
        );
        if s.repaired_chunks > 0 {
            println!(
                "    {} corrupt chunks found in the store and rewritten from this source",
                s.repaired_chunks
            );
        }
    }
    for e in excluded {
        println!(
            "  excluded: disk {} partition {}{}: {} ({} not stored)",
            e["disk"],
            e["partition"],
            e["lv"]
                .as_str()
                .map(|lv| format!(" LV {lv}"))
                .unwrap_or_default(),
            e["path"].as_str().unwrap_or_default(),
            human(e["bytes"].as_u64().unwrap_or_default())
        );
    }
    for w in warnings {
        println!("  warning: {w}");
    }
    let dedupe = if new > 0 {
        format!("dedupe {:.1}x", referenced as f64 / new as f64)
    } else {
        "every chunk was already stored".to_string()
    };
    println!(
        "  total: {} logical, {} used, {} stored new, {} referenced ({dedupe}), {:.1}s, {:.0} MB/s of used data",
        human(size),
        human(used),
        human(new),
        human(referenced),
        secs,
        progress::mbps(used, secs)
    );
    Ok(())
}
