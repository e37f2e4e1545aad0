//! `appliance failover`: run snapshots as VMs under QEMU and publish failback rounds.
//!
//! A failover VM lives in `STORE/private/failover/<vm>/`: the snapshot materialized as a sparse
//! raw base image per disk, a chain of qcow2 overlays on top (the VM writes the last one), QEMU's
//! QMP and serial sockets, the serial log and `state.json` ([`state`]). QEMU is a separate process
//! in its own process group, so the VM outlives `appliance` commands and `appliance serve`
//! restarts; every command finds it again by pid and QMP socket. Rounds ([`round`]) are
//! published as plain store files under `STORE/failover/<vm>/` for the restorer to GET.
//! The operator's view is in `docs/failback.md`.

pub mod api;
pub mod cli;
mod qcow2;
mod qmp;
pub mod round;
mod state;
mod vm;

use anyhow::{bail, Context, Result};
use cli::{FailoverArgs, FailoverCommand};
use serde::Serialize;
use snapshot::store::{check_name, LocalStore};
use snapshot::Extents;
use state::{Phase, RoundRecord, VmConfig, VmState};
use std::fs;
use std::path::Path;
use std::time::Duration;
use vm::Observed;

pub fn run(a: &FailoverArgs) -> Result<()> {
    match &a.command {
        FailoverCommand::Start(a) => start(a),
        FailoverCommand::List(a) => list(a),
        FailoverCommand::Status(a) => {
            let s = status(&open_store(&a.store)?, &a.name)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                s.print();
            }
            Ok(())
        }
        FailoverCommand::Stop(a) => {
            let store = open_store(&a.store)?;
            let how = stop(&store, &a.name, a.timeout, a.hard)?;
            println!("VM {} stopped ({how}); its disks are kept", a.name);
            Ok(())
        }
        FailoverCommand::Round(a) => {
            let store = open_store(&a.store)?;
            let r = round::run(&store, &a.name, a.r#final, a.timeout)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "round {} of {} published{}: {} changed slots, {} of chunks ({} new), {:.1}s",
                    r.round,
                    r.vm,
                    if r.is_final { " (final, cutover)" } else { "" },
                    r.changed_slots,
                    crate::list::human(r.changed_stored_bytes),
                    crate::list::human(r.new_chunk_bytes),
                    r.seconds
                );
                if let Some(how) = &r.vm_stop {
                    println!("  VM stopped: {how}; disks kept until `appliance failover delete`");
                }
            }
            Ok(())
        }
        FailoverCommand::Screenshot(a) => screenshot(&open_store(&a.store)?, &a.name, &a.out),
        FailoverCommand::Delete(a) => {
            delete(&open_store(&a.store)?, &a.name, a.force)?;
            println!("VM {} deleted with its disks and rounds", a.name);
            Ok(())
        }
    }
}

/// Open the store by its absolute path: QEMU and later commands see the same paths whatever
/// their working directory.
fn open_store(p: &Path) -> Result<LocalStore> {
    let abs = fs::canonicalize(p).with_context(|| format!("{}: no such store", p.display()))?;
    LocalStore::open(&abs)
}

fn start(a: &cli::StartArgs) -> Result<()> {
    check_name(&a.name, "vm")?;
    let store = open_store(&a.store)?;
    let dir = state::vm_dir(&store, &a.name);
    if dir.join("state.json").exists() {
        return restart(&store, a);
    }
    let Some(host) = &a.host else {
        bail!("no VM named {} yet: --host is needed to start one", a.name);
    };
    if !matches!(a.net.as_str(), "none" | "user") && !a.net.starts_with("bridge=") {
        bail!("--net {}: expected none, user or bridge=BRIDGE", a.net);
    }
    let key = store.public_key()?;
    let snap = snapshot::store::open_snapshot(&store, host, a.snapshot.as_deref(), Some(&key))?;
    fs::create_dir_all(dir.parent().expect("vm dir has a parent"))
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let built = (|| -> Result<VmState> {
        let _lock = state::lock(&dir)?;
        let accel = match a.accel.as_str() {
            "auto" => vm::probe_accel(
                &store.root().join("private/failover/accel-probe"),
                &store.root().join("tmp"),
            ),
            other => other.to_string(),
        };
        let firmware = vm::firmware(&snap.manifest);
        if firmware == "uefi" {
            let (_, vars) = vm::ovmf()?;
            fs::copy(&vars, dir.join("OVMF_VARS.fd"))
                .with_context(|| format!("copying {}", vars.display()))?;
        }
        let disks = vm::prepare_disks(&store, &snap, &dir, &|m| eprintln!("{m}"))?;
        let socks = state::socket_dir(&dir)?;
        let st = VmState {
            version: state::STATE_VERSION,
            name: a.name.clone(),
            host: host.clone(),
            snapshot: snap.manifest.snapshot.clone(),
            created: state::now_rfc3339(),
            config: VmConfig {
                cpus: a.cpus,
                memory_mib: a.memory,
                net: a.net.clone(),
                virtio: a.virtio,
                accel,
                firmware,
            },
            // Stopped until QEMU answers: a failed launch keeps the materialized disks and
            // `failover start --name` retries without copying them again.
            phase: Phase::Stopped,
            pid: None,
            started_at: None,
            stopped_at: None,
            cutover_requested_ms: None,
            qmp: socks.join("qmp.sock"),
            serial_socket: socks.join("serial.sock"),
            serial_log: dir.join("serial.log"),
            disks,
            consumed: 0,
            rounds: Vec::new(),
        };
        st.save(&store)?;
        Ok(st)
    })();
    let mut st = match built {
        Ok(st) => st,
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let _lock = state::lock(&dir)?;
    launch(&store, &mut st)?;
    print_started(&st, a.json)
}

fn restart(store: &LocalStore, a: &cli::StartArgs) -> Result<()> {
    let dir = state::vm_dir(store, &a.name);
    let _lock = state::lock(&dir)?;
    let mut st = VmState::load(store, &a.name)?;
    if let Some(h) = &a.host {
        if *h != st.host {
            bail!(
                "VM {} already exists and runs host {}'s snapshot, not {h}",
                a.name,
                st.host
            );
        }
    }
    match vm::observe(&st) {
        Observed::Up(s) => bail!("VM {} is already running (QEMU status {s})", a.name),
        Observed::FailedBack => eprintln!(
            "VM {} was failed back; starting it again rolls the cutover back (the server's copy \
             becomes stale: fail back again later)",
            a.name
        ),
        Observed::Crashed => eprintln!("VM {} had crashed; restarting it on its disks", a.name),
        Observed::Stopped => {}
    }
    launch(store, &mut st)?;
    print_started(&st, a.json)
}

fn launch(store: &LocalStore, st: &mut VmState) -> Result<()> {
    let pid = match vm::launch(st, &st.dir(store)) {
        Ok(pid) => pid,
        Err(e) if st.config.accel == "kvm" => {
            eprintln!("QEMU failed with KVM ({e:#}); starting with TCG instead");
            st.config.accel = "tcg".into();
            let _ = fs::remove_file(store.root().join("private/failover/accel-probe"));
            vm::launch(st, &st.dir(store))?
        }
        Err(e) => return Err(e),
    };
    st.pid = Some(pid);
    st.phase = Phase::Running;
    st.started_at = Some(state::now_unix());
    st.stopped_at = None;
    st.cutover_requested_ms = None;
    st.save(store)
}

fn print_started(st: &VmState, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(st)?);
        return Ok(());
    }
    println!(
        "VM {} running {}/{} (pid {}): {}",
        st.name,
        st.host,
        st.snapshot,
        st.pid.unwrap_or(0),
        vm::config_summary(&st.config)
    );
    println!("  serial log:    {}", st.serial_log.display());
    println!("  serial socket: {}", st.serial_socket.display());
    println!("  QMP socket:    {}", st.qmp.display());
    Ok(())
}

/// What `status` reports, also the API's answer.
#[derive(Debug, Serialize)]
pub struct Status {
    pub name: String,
    pub host: String,
    pub snapshot: String,
    /// running, powered-off, paused, crashed, stopped, failed-back...
    pub state: String,
    pub pid: Option<u32>,
    pub uptime_seconds: Option<u64>,
    /// Guest bytes written since start: allocated clusters of every overlay (QEMU's cache of the
    /// active overlay is flushed first), so 64 KiB granular.
    pub changed_bytes: u64,
    /// 4 MiB slots those bytes touch.
    pub changed_slots: u64,
    pub config: VmConfig,
    pub rounds: Vec<RoundRecord>,
    pub serial_log: String,
    pub serial_socket: String,
    pub qmp: String,
}

impl Status {
    fn print(&self) {
        println!(
            "VM {}: {} ({}/{})",
            self.name, self.state, self.host, self.snapshot
        );
        if let Some(up) = self.uptime_seconds {
            println!(
                "  uptime {}",
                humantime::format_duration(Duration::from_secs(up))
            );
        }
        println!(
            "  changed since start: {} in {} slots of 4 MiB",
            crate::list::human(self.changed_bytes),
            self.changed_slots
        );
        println!("  {}", vm::config_summary(&self.config));
        for r in &self.rounds {
            println!(
                "  round {}{}: {} slots, {} of chunks, {:.1}s ({})",
                r.round,
                if r.is_final { " final" } else { "" },
                r.changed_slots,
                crate::list::human(r.changed_stored_bytes),
                r.seconds,
                r.created
            );
        }
        println!("  serial log: {}", self.serial_log);
    }
}

pub fn status(store: &LocalStore, name: &str) -> Result<Status> {
    let st = VmState::load(store, name)?;
    let observed = vm::observe(&st);
    if matches!(observed, Observed::Up(_)) {
        // QEMU keeps qcow2 tables in a write-back cache: flush so the file shows recent writes.
        if let Ok(mut q) = qmp::Qmp::connect(&st.qmp, Duration::from_secs(5)) {
            for d in &st.disks {
                let cmd = format!("qemu-io disk{} \"flush\"", d.number);
                let _ = q.execute(
                    "human-monitor-command",
                    serde_json::json!({ "command-line": cmd }),
                );
            }
        }
    }
    let dir = st.dir(store);
    let (mut bytes, mut slots) = (0, 0);
    for d in &st.disks {
        let mut all = Extents::new();
        for o in &d.overlays {
            // A live overlay can be caught mid-update; it only makes the estimate rougher.
            if let Ok(ext) = qcow2::Qcow2::open(&dir.join(o)).and_then(|q| q.allocated()) {
                for &(s, e) in ext.ranges() {
                    all.add(s, e);
                }
            }
        }
        bytes += all.len();
        let mut last = u64::MAX;
        for &(s, e) in all.ranges() {
            for slot in s / snapshot::CHUNK_SIZE..=(e - 1) / snapshot::CHUNK_SIZE {
                if slot != last {
                    slots += 1;
                    last = slot;
                }
            }
        }
    }
    let up = matches!(observed, Observed::Up(_));
    Ok(Status {
        name: st.name.clone(),
        host: st.host.clone(),
        snapshot: st.snapshot.clone(),
        state: observed.label(),
        pid: st.pid.filter(|_| up),
        uptime_seconds: st
            .started_at
            .filter(|_| up)
            .map(|t| state::now_unix().saturating_sub(t)),
        changed_bytes: bytes,
        changed_slots: slots,
        config: st.config.clone(),
        rounds: st.rounds.clone(),
        serial_log: st.serial_log.display().to_string(),
        serial_socket: st.serial_socket.display().to_string(),
        qmp: st.qmp.display().to_string(),
    })
}

/// The host a VM was started from (whose snapshot it runs): what access to it is scoped by.
pub fn host_of(store: &LocalStore, vm: &str) -> Result<String> {
    Ok(state::VmState::load(store, vm)?.host)
}

pub fn list_all(store: &LocalStore) -> Result<Vec<Status>> {
    state::list(store)?
        .iter()
        .map(|n| status(store, n))
        .collect()
}

fn list(a: &cli::ListArgs) -> Result<()> {
    let store = open_store(&a.store)?;
    let all = list_all(&store)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no failover VMs");
    }
    for s in &all {
        println!(
            "{:<20} {:<12} {}/{}  changed {}  rounds {}",
            s.name,
            s.state,
            s.host,
            s.snapshot,
            crate::list::human(s.changed_bytes),
            s.rounds.len()
        );
    }
    Ok(())
}

/// Stop the VM; returns how (`powered-off` or `forced`).
pub fn stop(store: &LocalStore, name: &str, timeout: Duration, hard: bool) -> Result<String> {
    let dir = state::vm_dir(store, name);
    VmState::load(store, name)?;
    let _lock = state::lock(&dir)?;
    let mut st = VmState::load(store, name)?;
    let clean = vm::stop(&st, timeout, hard)?;
    if st.phase == Phase::Running {
        st.phase = Phase::Stopped;
    }
    st.pid = None;
    st.stopped_at = Some(state::now_unix());
    st.save(store)?;
    Ok(if clean { "powered-off" } else { "forced" }.into())
}

fn screenshot(store: &LocalStore, name: &str, out: &Path) -> Result<()> {
    let st = VmState::load(store, name)?;
    if !matches!(vm::observe(&st), Observed::Up(_)) {
        bail!("VM {name} is not running");
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let abs = fs::canonicalize(parent)
        .with_context(|| format!("{}: no such directory", parent.display()))?
        .join(out.file_name().context("--out needs a file name")?);
    let mut q = qmp::Qmp::connect(&st.qmp, Duration::from_secs(10))?;
    q.execute(
        "screendump",
        serde_json::json!({"filename": abs.display().to_string(), "format": "png"}),
    )?;
    println!("{}", abs.display());
    Ok(())
}

fn delete(store: &LocalStore, name: &str, force: bool) -> Result<()> {
    let dir = state::vm_dir(store, name);
    let st = VmState::load(store, name)?;
    let _lock = state::lock(&dir)?;
    if let Observed::Up(s) = vm::observe(&st) {
        if !force {
            bail!("VM {name} is running (QEMU status {s}): stop it first, or --force");
        }
        vm::stop(&st, Duration::ZERO, true)?;
    }
    let published = state::published_dir(store, name);
    if published.exists() {
        fs::remove_dir_all(&published)
            .with_context(|| format!("removing {}", published.display()))?;
    }
    if let Some(socks) = st
        .qmp
        .parent()
        .filter(|p| p.starts_with("/tmp/bmr-failover-"))
    {
        let _ = fs::remove_dir_all(socks);
    }
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}
