//! `restorer capture --to URL --host NAME SOURCE...`: snapshot this machine's disks onto an
//! appliance through its upload API (docs/api.md), with the same used-block logic as
//! `appliance ingest` ([`snapshot::layout::analyze`]) and the same chunker.
//!
//! The chunker hands new chunks to a bounded queue; uploader threads take them in batches, ask the
//! appliance which of a batch it lacks (one `missing` request per batch), and upload only those.
//! Chunking, compression and the network overlap; memory stays bounded by the queue.

use crate::cli::CaptureArgs;
use crate::report::{self, bytes};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use snapshot::chunker::{chunk_disk, ChunkOptions, ChunkSink};
use snapshot::client::ApplianceClient;
use snapshot::fs::exclude::Exclusions;
use snapshot::layout::{analyze_with, firmware_of};
use snapshot::manifest::{Disk, Firmware, Hardware, Manifest, Nic, PciDevice, MANIFEST_VERSION};
use snapshot::store::{check_name, FetchError, HttpStore};
use snapshot::{Digest, DiskSource, CHUNK_SIZE};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Chunks per `missing` request.
const BATCH: usize = 8;

/// A compressed chunk on its way to the appliance.
type Item = (Digest, Vec<u8>);

/// Chunks go through a bounded queue to the uploader threads.
struct UploadSink<'a> {
    api: &'a ApplianceClient,
    upload: String,
    tx: Mutex<Option<crossbeam_channel::Sender<Item>>>,
    /// Chunks already handled in this capture (any disk), with their blob size.
    known: Mutex<HashMap<Digest, u64>>,
    failed: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
    uploaded_chunks: AtomicU64,
    uploaded_bytes: AtomicU64,
    present_chunks: AtomicU64,
    missing_requests: AtomicU64,
}

impl ChunkSink for UploadSink<'_> {
    fn has(&self, d: &Digest) -> Result<Option<u64>> {
        Ok(self.known.lock().expect("lock").get(d).copied())
    }

    fn put(&self, d: &Digest, blob: Vec<u8>) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            bail!("upload failed (see the first error)");
        }
        self.known
            .lock()
            .expect("lock")
            .insert(*d, blob.len() as u64);
        let tx = self.tx.lock().expect("lock").clone();
        let tx = tx.ok_or_else(|| anyhow!("upload queue closed"))?;
        tx.send((*d, blob))
            .map_err(|_| anyhow!("the uploaders stopped (see the first error)"))
    }
}

impl UploadSink<'_> {
    fn close(&self) {
        self.tx.lock().expect("lock").take();
    }

    fn fail(&self, e: anyhow::Error) {
        self.failed.store(true, Ordering::Relaxed);
        self.error.lock().expect("lock").get_or_insert(e);
    }

    /// An uploader: batches from the queue, one `missing` question per batch, then the uploads.
    fn uploader(&self, rx: crossbeam_channel::Receiver<Item>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(x) => batch.push(x),
                    Err(_) => break,
                }
            }
            if self.failed.load(Ordering::Relaxed) {
                continue; // drain, so the chunker's sends do not block forever
            }
            if let Err(e) = self.send_batch(batch) {
                self.fail(e);
            }
        }
    }

    fn send_batch(&self, batch: Vec<Item>) -> Result<()> {
        let ask = snapshot::api::MissingAsk {
            digests: batch.iter().map(|(d, _)| d.hex()).collect(),
        };
        let m: snapshot::api::Missing =
            self.api
                .json("POST", &format!("uploads/{}/missing", self.upload), &ask)?;
        self.missing_requests.fetch_add(1, Ordering::Relaxed);
        for (d, blob) in batch {
            if !m.missing.iter().any(|h| h.eq_ignore_ascii_case(&d.hex())) {
                self.present_chunks.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let path = format!("uploads/{}/chunks/{}", self.upload, d.hex());
            self.api
                .call("PUT", &path, "application/octet-stream", &blob)
                .map_err(|e| anyhow!("uploading chunk {d}: {e}"))?;
            self.uploaded_chunks.fetch_add(1, Ordering::Relaxed);
            self.uploaded_bytes
                .fetch_add(blob.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct DiskCapture {
    disk: u32,
    source: String,
    size: u64,
    used_bytes: u64,
    read_bytes: u64,
    data_chunks: u64,
    zero_chunks: u64,
    unused_chunks: u64,
    seconds: f64,
    notes: Vec<String>,
}

pub fn run(a: &CaptureArgs) -> Result<()> {
    check_name(&a.host, "host")?;
    // Checked before anything is opened or uploaded.
    Exclusions::from_args(&a.exclude, a.no_default_excludes)?;
    let started = Instant::now();
    let base =
        a.to.trim_end_matches('/')
            .trim_end_matches("/store")
            .to_string();
    let opts = a.net.http_options();
    let store_url = format!("{base}/store");
    let api = ApplianceClient::beside(&store_url, opts.clone())?;
    // Where a commit whose answer was lost is looked for, with the same token and CA.
    let store = HttpStore::new(&store_url, opts)?;
    let mut sources = Vec::new();
    let safety = crate::target::Safety::scan()?;
    let mut in_use = Vec::new();
    for p in &a.sources {
        let src = DiskSource::open(p)?;
        // A disk in use changes while it is read: the snapshot is at best crash-consistent.
        if src.device_sectors.is_some() {
            if let Err(e) = crate::target::Target::from_path(&p.to_string_lossy())
                .and_then(|t| safety.check(&t))
            {
                in_use.push(format!("{e}: the snapshot of it is only crash-consistent"));
            }
        }
        sources.push(src);
    }
    for w in &in_use {
        eprintln!("restorer: warning: {w}");
    }
    let opened: snapshot::api::UploadOpened = api
        .json(
            "POST",
            "uploads",
            &snapshot::api::OpenUpload {
                host: a.host.clone(),
            },
        )
        .context("opening an upload session")?;
    let (tx, rx) = crossbeam_channel::bounded(BATCH);
    let sink = UploadSink {
        api: &api,
        upload: opened.upload.clone(),
        tx: Mutex::new(Some(tx)),
        known: Mutex::new(HashMap::new()),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        uploaded_chunks: AtomicU64::new(0),
        uploaded_bytes: AtomicU64::new(0),
        present_chunks: AtomicU64::new(0),
        missing_requests: AtomicU64::new(0),
    };
    let result = capture(a, &api, &store, &sink, rx, &sources, &opened.snapshot);
    let (manifest, disks) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = api.call("DELETE", &format!("uploads/{}", opened.upload), "", &[]);
            return Err(e);
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let uploaded = sink.uploaded_bytes.load(Ordering::Relaxed);
    if a.json {
        let v = serde_json::json!({
            "host": manifest.host, "snapshot": manifest.snapshot, "seconds": secs,
            "uploaded_bytes": uploaded,
            "uploaded_chunks": sink.uploaded_chunks.load(Ordering::Relaxed),
            "present_chunks": sink.present_chunks.load(Ordering::Relaxed),
            "missing_requests": sink.missing_requests.load(Ordering::Relaxed),
            "disks": disks,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for d in &disks {
            println!(
                "disk {} {}: {} ({} used, {} read), {} data / {} zero / {} unused slots, {:.1}s",
                d.disk,
                d.source,
                bytes(d.size),
                bytes(d.used_bytes),
                bytes(d.read_bytes),
                d.data_chunks,
                d.zero_chunks,
                d.unused_chunks,
                d.seconds
            );
            for n in &d.notes {
                println!("  note: {n}");
            }
        }
        println!(
            "snapshot {}/{} committed: uploaded {} in {} chunks ({} already on the appliance) in {:.1}s ({})",
            manifest.host,
            manifest.snapshot,
            bytes(uploaded),
            sink.uploaded_chunks.load(Ordering::Relaxed),
            sink.present_chunks.load(Ordering::Relaxed),
            secs,
            report::rate(uploaded, started.elapsed())
        );
    }
    Ok(())
}

fn capture(
    a: &CaptureArgs,
    api: &ApplianceClient,
    store: &HttpStore,
    sink: &UploadSink,
    rx: crossbeam_channel::Receiver<Item>,
    sources: &[DiskSource],
    snapshot_id: &str,
) -> Result<(Manifest, Vec<DiskCapture>)> {
    let opts = ChunkOptions::default();
    let exclusions = Exclusions::from_args(&a.exclude, a.no_default_excludes)?;
    let mut disks = Vec::new();
    let mut reports = Vec::new();
    let mut indexes = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let started =
            snapshot::threads::start_scoped(s, a.jobs.max(1) as usize, "uploader", |_| {
                let rx = rx.clone();
                move || sink.uploader(rx)
            });
        drop(rx);
        if let Err(e) = started {
            // The uploaders already started see the queue closed and stop.
            sink.close();
            return Err(e);
        }
        let r = (|| -> Result<()> {
            for (n, dev) in sources.iter().enumerate() {
                let t0 = Instant::now();
                let what = format!("disk {n} ({})", dev.path.display());
                let layout = analyze_with(dev, dev.device_sectors, a.raw, &exclusions)
                    .context(what.clone())?;
                let pb = report::progress(layout.size, &format!("disk {n}"), a.json);
                let (index, stats) = chunk_disk(dev, &layout.used, sink, &opts, &|done| {
                    pb.set_position(done)
                })
                .context(what.clone())?;
                pb.finish_and_clear();
                let idx = index.to_bytes();
                let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&idx));
                api.call(
                    "PUT",
                    &format!("uploads/{}/indexes/{n}", sink.upload),
                    "application/octet-stream",
                    &idx,
                )
                .map_err(|e| anyhow!("{what}: uploading the index: {e}"))?;
                reports.push(DiskCapture {
                    disk: n as u32,
                    source: dev.path.display().to_string(),
                    size: layout.size,
                    used_bytes: stats.used_bytes,
                    read_bytes: stats.bytes_read,
                    data_chunks: stats.data_chunks,
                    zero_chunks: stats.zero_chunks,
                    unused_chunks: stats.unused_chunks,
                    seconds: t0.elapsed().as_secs_f64(),
                    notes: layout.notes.clone(),
                });
                disks.push(layout.into_disk(n as u32, sha, &stats));
                indexes.push(index);
            }
            Ok(())
        })();
        // The uploaders finish the queue and stop.
        sink.close();
        r
    })?;
    if let Some(e) = sink.error.lock().expect("lock").take() {
        return Err(e.context("uploading chunks"));
    }
    let firmware = firmware(&a.firmware, sources, &disks);
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        host: a.host.clone(),
        snapshot: snapshot_id.to_string(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        sequence: None,
        firmware,
        hardware: if sources.iter().any(|s| s.device_sectors.is_some()) {
            hardware(sources)
        } else {
            Hardware::default()
        },
        chunk_size: CHUNK_SIZE,
        disks,
    };
    commit(api, store, &sink.upload, &manifest)?;
    Ok((manifest, reports))
}

fn commit(api: &ApplianceClient, store: &HttpStore, upload: &str, m: &Manifest) -> Result<()> {
    match api.call(
        "POST",
        &format!("uploads/{upload}/commit"),
        "application/json",
        &m.to_bytes(),
    ) {
        Ok(_) => Ok(()),
        // A commit whose answer was lost and retried finds the session gone: the snapshot is
        // there if the first attempt committed it.
        Err(FetchError::NotFound(_)) => {
            let rel = format!("hosts/{}/snapshots/{}/manifest.json", m.host, m.snapshot);
            let path = store.url(&rel);
            let probe = snapshot::store::Store::get(store, &rel);
            match probe {
                Ok(_) => Ok(()),
                Err(FetchError::NotFound(_)) => {
                    bail!("committing the upload: the session is gone and {path} does not exist")
                }
                Err(FetchError::Other(e)) => bail!(
                    "committing the upload: the session is gone, and checking for {path} failed: {e:#}"
                ),
            }
        }
        Err(e) => Err(anyhow!("committing the upload: {e}")),
    }
}

/// `--firmware`: explicit, or on this machine (block device sources) what it booted with, or for
/// image files what the first disk's table suggests (an ESP means UEFI), as ingest does.
fn firmware(flag: &str, sources: &[DiskSource], disks: &[Disk]) -> Firmware {
    match flag {
        "uefi" => return Firmware::Uefi,
        "bios" => return Firmware::Bios,
        "unknown" => return Firmware::Unknown,
        _ => {}
    }
    if sources.iter().any(|s| s.device_sectors.is_some()) {
        return if Path::new("/sys/firmware/efi").exists() {
            Firmware::Uefi
        } else {
            Firmware::Bios
        };
    }
    disks
        .iter()
        .find_map(|d| firmware_of(&d.table))
        .unwrap_or(Firmware::Unknown)
}

/// This machine's storage controllers (those the source disks hang off) and NICs, from sysfs,
/// for driver injection on the restore side.
fn hardware(sources: &[DiskSource]) -> Hardware {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().trim_start_matches("0x").to_string())
            .unwrap_or_default()
    };
    let base = |p: &Path| {
        std::fs::read_link(p)
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    let pci = |dev: &Path| -> Option<(String, Option<String>)> {
        if base(&dev.join("subsystem")).as_deref() != Some("pci") {
            return None;
        }
        let id = format!(
            "{}:{}",
            read(&dev.join("vendor")),
            read(&dev.join("device"))
        );
        Some((id, base(&dev.join("driver"))))
    };
    let mut hw = Hardware::default();
    for s in sources {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = std::fs::metadata(&s.path) else {
            continue;
        };
        let r = m.rdev();
        let Ok(mut p) = std::fs::canonicalize(format!(
            "/sys/dev/block/{}:{}",
            libc::major(r),
            libc::minor(r)
        )) else {
            continue;
        };
        while p.pop() {
            if let Some((pci_id, driver)) = pci(&p) {
                if !hw.storage.iter().any(|d| d.pci_id == pci_id) {
                    hw.storage.push(PciDevice { pci_id, driver });
                }
                break;
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        let mut nics: Vec<Nic> = rd
            .flatten()
            .filter_map(|e| {
                let dev = e.path().join("device");
                if !dev.exists() {
                    return None;
                }
                let (pci_id, driver) = match pci(&std::fs::canonicalize(&dev).ok()?) {
                    Some((id, drv)) => (Some(id), drv),
                    None => (None, base(&dev.join("driver"))),
                };
                Some(Nic {
                    name: e.file_name().to_string_lossy().into_owned(),
                    mac: read(&e.path().join("address")),
                    pci_id,
                    driver,
                })
            })
            .collect();
        nics.sort_by(|a, b| a.name.cmp(&b.name));
        hw.nics = nics;
    }
    hw
}
