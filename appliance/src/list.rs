//! `appliance list`.

use crate::cli::ListArgs;
use anyhow::Result;
use snapshot::store::{LocalStore, Store};
use snapshot::Manifest;

pub fn run(a: &ListArgs) -> Result<()> {
    let store = LocalStore::open(&a.store)?;
    let hosts = match &a.host {
        Some(h) => vec![h.clone()],
        None => store.hosts()?,
    };
    let mut rows = Vec::new();
    for host in &hosts {
        let latest = store
            .get(&format!("hosts/{host}/latest"))
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim().to_string());
        for id in store.snapshots(host)? {
            let path = format!("hosts/{host}/snapshots/{id}/manifest.json");
            let bytes = store.get(&path).map_err(anyhow::Error::from)?;
            let m = Manifest::parse(&bytes, &path)?;
            rows.push((m, latest.as_deref() == Some(id.as_str())));
        }
    }
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(m, latest)| {
                serde_json::json!({
                    "host": m.host, "snapshot": m.snapshot, "created": m.created, "latest": latest,
                    "disks": m.disks.iter().map(|d| serde_json::json!({
                        "size": d.size, "used_bytes": d.totals.used_bytes, "stored_bytes": d.totals.stored_bytes,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no snapshots");
    }
    println!(
        "{:<16} {:<18} {:<22} {:>6} {:>10} {:>10} {:>10}",
        "HOST", "SNAPSHOT", "CREATED", "DISKS", "SIZE", "USED", "STORED"
    );
    for (m, latest) in &rows {
        let sum = |f: fn(&snapshot::manifest::Disk) -> u64| m.disks.iter().map(f).sum::<u64>();
        println!(
            "{:<16} {:<18} {:<22} {:>6} {:>10} {:>10} {:>10}{}",
            m.host,
            m.snapshot,
            m.created,
            m.disks.len(),
            human(sum(|d| d.size)),
            human(sum(|d| d.totals.used_bytes)),
            human(sum(|d| d.totals.stored_bytes)),
            if *latest { "  latest" } else { "" }
        );
    }
    Ok(())
}

/// Bytes as a short human figure (binary units).
pub fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
