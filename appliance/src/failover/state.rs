//! What the appliance remembers about a failover VM: `STORE/private/failover/<vm>/state.json`.
//!
//! The VM is a separate QEMU process, so this file (not a server's memory) is the truth: any
//! `appliance` process re-attaches by pid and QMP socket. It is replaced atomically (temp file,
//! fsync, rename); every change is made under the VM's lock (`lock` in the same directory).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use snapshot::store::{check_name, LocalStore};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const STATE_VERSION: u32 = 1;

/// What the appliance last did with the VM. What the VM is doing right now is [`Observed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Started; expected to be running.
    Running,
    /// Stopped by `failover stop` (or found powered off by its guest).
    Stopped,
    /// Cutover done: the final round is published. Disks kept until `failover delete`.
    FailedBack,
}

/// How the VM is run; kept so that a restart uses the same devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    /// `none`, `user` or `bridge=BR`.
    pub net: String,
    pub virtio: bool,
    /// `kvm` or `tcg`, as decided at start.
    pub accel: String,
    /// `uefi` or `bios`.
    pub firmware: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub number: u32,
    pub size: u64,
    /// Raw base image (file name in the VM directory), the snapshot materialized.
    pub base: String,
    /// qcow2 overlays bottom to top (file names); the last is the one the VM writes.
    pub overlays: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub created: String,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub changed_slots: u64,
    /// Blob bytes of the changed data chunks (what a restorer fetches at most).
    pub changed_stored_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub name: String,
    pub host: String,
    pub snapshot: String,
    pub created: String,
    pub config: VmConfig,
    pub phase: Phase,
    /// QEMU's pid while it runs.
    pub pid: Option<u32>,
    /// Unix seconds of the last start and stop.
    pub started_at: Option<u64>,
    pub stopped_at: Option<u64>,
    /// Unix milliseconds when cutover asked the VM to stop (the start of the cutover window).
    #[serde(default)]
    pub cutover_requested_ms: Option<u64>,
    pub qmp: PathBuf,
    pub serial_socket: PathBuf,
    pub serial_log: PathBuf,
    pub disks: Vec<DiskState>,
    /// Overlays `[..consumed]` (the same count on every disk) are covered by published rounds.
    pub consumed: usize,
    pub rounds: Vec<RoundRecord>,
}

/// The VM's directory: `STORE/private/failover/<vm>` (never served).
pub fn vm_dir(store: &LocalStore, name: &str) -> PathBuf {
    store.root().join("private/failover").join(name)
}

/// Where rounds are published: `STORE/failover/<vm>` (served like any store file).
pub fn published_dir(store: &LocalStore, name: &str) -> PathBuf {
    store.root().join("failover").join(name)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Names of every VM with a state file, sorted.
pub fn list(store: &LocalStore) -> Result<Vec<String>> {
    let dir = store.root().join("private/failover");
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in rd {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(name) = e.file_name().to_str() {
            if check_name(name, "vm").is_ok() && e.path().join("state.json").exists() {
                out.push(name.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

impl VmState {
    pub fn load(store: &LocalStore, name: &str) -> Result<VmState> {
        check_name(name, "vm")?;
        let p = vm_dir(store, name).join("state.json");
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "no failover VM named {name:?} in {}",
                    store.root().display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: malformed state", p.display()))?;
        let version = v.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != STATE_VERSION as u64 {
            bail!(
                "{}: state version {version} is not supported (this build reads {STATE_VERSION})",
                p.display()
            );
        }
        serde_json::from_value(v).with_context(|| format!("{}: malformed state", p.display()))
    }

    pub fn save(&self, store: &LocalStore) -> Result<()> {
        let dir = vm_dir(store, &self.name);
        let tmp = dir.join(".state.json.tmp");
        let dest = dir.join("state.json");
        let bytes = serde_json::to_vec_pretty(self).expect("serialises");
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &dest).with_context(|| format!("replacing {}", dest.display()))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))
    }

    pub fn dir(&self, store: &LocalStore) -> PathBuf {
        vm_dir(store, &self.name)
    }

    /// The image each disk's guest writes go to now.
    pub fn active(&self, store: &LocalStore, disk: usize) -> PathBuf {
        let d = &self.disks[disk];
        self.dir(store)
            .join(d.overlays.last().expect("a disk has an overlay"))
    }
}

/// The VM's lock, held for every change of its state (start, stop, round, delete). Waits.
pub struct VmLock(#[allow(dead_code)] File);

pub fn lock(dir: &Path) -> Result<VmLock> {
    let p = dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    snapshot::sys::flock(&f, true, true).with_context(|| format!("locking {}", p.display()))?;
    Ok(VmLock(f))
}

/// Unix socket paths are limited to 107 bytes: deep stores get their sockets in a short
/// directory under /tmp named after the VM directory.
pub fn socket_dir(vm_dir: &Path) -> Result<PathBuf> {
    if vm_dir.as_os_str().len() + "/serial.sock".len() < 100 {
        return Ok(vm_dir.to_owned());
    }
    use sha2::Digest as _;
    let h = hex::encode(sha2::Sha256::digest(vm_dir.as_os_str().as_encoded_bytes()));
    let d = PathBuf::from(format!("/tmp/bmr-failover-{}", &h[..16]));
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
