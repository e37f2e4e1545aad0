//! The QEMU side of a failover VM: materializing the snapshot into a base image, the overlay,
//! the accelerator probe, the command line, and finding a running VM again by pid and QMP.

use super::qmp::Qmp;
use super::state::{DiskState, VmConfig, VmState};
use anyhow::{bail, Context, Result};
use snapshot::reader::{fetch_chunks, plan_fetches};
use snapshot::store::LocalStore;
use snapshot::ChunkIndex;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";

/// OVMF firmware pairs (code, variables template), preferred first.
const OVMF: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// Write the snapshot disk of `index` into a new sparse raw file: only data chunks are written
/// (zero and unused slots stay holes, which read as zeros).
pub fn materialize(store: &LocalStore, index: &ChunkIndex, path: &Path) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(index.disk_size)
        .with_context(|| format!("sizing {}", path.display()))?;
    let jobs = plan_fetches(index, |_| true);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    fetch_chunks(store, &jobs, threads, &|slots, bytes| {
        for &i in slots {
            let (off, _) = index.span(i);
            f.write_all_at(bytes, off)
                .with_context(|| format!("writing {} at offset {off}", path.display()))?;
        }
        Ok(())
    })?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT overlay` (backing named relative to the overlay).
pub fn create_overlay(backing: &Path, backing_format: &str, overlay: &Path) -> Result<()> {
    let name = backing.file_name().expect("backing has a file name");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", backing_format, "-b"])
        .arg(name)
        .arg(overlay)
        .current_dir(overlay.parent().expect("overlay has a directory"))
        .output()
        .context("running qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img create {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A 512-byte boot sector that writes `K` to the first serial port and halts: if it shows up
/// within a few seconds, KVM runs guests here.
fn probe_boot_sector() -> Vec<u8> {
    let mut s = vec![0u8; 512];
    let code = [
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'K', // mov al, 'K'
        0xee, // out dx, al
        0xfa, // cli
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ];
    s[..code.len()].copy_from_slice(&code);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// Decide the accelerator: `kvm` only when /dev/kvm opens and a probe guest actually runs code
/// within a few seconds (on some hosts KVM exists but guests hang); `tcg` otherwise. The result
/// is cached in `cache` for the current boot of the machine.
pub fn probe_accel(cache: &Path, tmp: &Path) -> String {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    if let Ok(text) = fs::read_to_string(cache) {
        if let Some((id, accel)) = text.trim().split_once(' ') {
            if id == boot_id.trim() && (accel == "kvm" || accel == "tcg") {
                return accel.to_string();
            }
        }
    }
    let accel = if kvm_runs(tmp) { "kvm" } else { "tcg" };
    let _ = fs::write(cache, format!("{} {accel}\n", boot_id.trim()));
    accel.to_string()
}

fn kvm_runs(tmp: &Path) -> bool {
    if OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let dir = tmp.join(format!("kvm-probe.{}", std::process::id()));
    if fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let disk = dir.join("probe.img");
    let serial = dir.join("serial.out");
    if fs::write(&disk, probe_boot_sector()).is_err() {
        return false;
    }
    let child = Command::new(QEMU)
        // The machine and CPU model the VM will get: on some hosts `-cpu host` is what fails.
        .args(["-machine", "q35,accel=kvm", "-cpu", "host"])
        .args(["-nodefaults", "-display", "none", "-m", "32", "-no-reboot"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args(["-device", "ide-hd,drive=d0,bus=ide.0"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let start = Instant::now();
    let mut ok = false;
    while start.elapsed() < Duration::from_secs(8) {
        if fs::read(&serial).is_ok_and(|b| b.contains(&b'K')) {
            ok = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = fs::remove_dir_all(&dir);
    ok
}

/// Everything needed to launch QEMU for `st`.
pub fn command(st: &VmState, dir: &Path) -> Result<Command> {
    let c = &st.config;
    let mut cmd = Command::new(QEMU);
    let cpu = if c.accel == "kvm" { "host" } else { "max" };
    cmd.arg("-name")
        .arg(format!("{},process=bmr-failover-{}", st.name, st.name))
        .arg("-machine")
        .arg(format!("q35,accel={}", c.accel))
        .args(["-cpu", cpu, "-smp"])
        .arg(c.cpus.to_string())
        .arg("-m")
        .arg(c.memory_mib.to_string())
        .args([
            "-nodefaults",
            "-vga",
            "std",
            "-display",
            "none",
            "-no-shutdown",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            st.qmp.display()
        ))
        .args(["-mon", "chardev=qmp,mode=control"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
            st.serial_socket.display(),
            st.serial_log.display()
        ))
        .args(["-serial", "chardev:ser0"]);
    if c.firmware == "uefi" {
        let (code, _) = ovmf()?;
        cmd.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                dir.join("OVMF_VARS.fd").display()
            ));
    }
    for (k, d) in st.disks.iter().enumerate() {
        let active = dir.join(d.overlays.last().expect("overlay"));
        cmd.arg("-drive").arg(format!(
            "file={},format=qcow2,if=none,id=disk{},cache=writeback",
            active.display(),
            d.number
        ));
        let dev = if c.virtio {
            format!("virtio-blk-pci,drive=disk{}", d.number)
        } else {
            // q35's built-in AHCI controller has six ports, ide.0 to ide.5.
            if k > 5 {
                bail!("more than six disks need --virtio");
            }
            format!("ide-hd,drive=disk{},bus=ide.{k}", d.number)
        };
        cmd.arg("-device")
            .arg(format!("{dev},bootindex={k}", k = k + 1));
    }
    // A MAC of QEMU's own range, never the source's: the repaired server comes back with its
    // own NIC on the same network while the VM still runs.
    let model = if c.virtio { "virtio-net-pci" } else { "e1000" };
    let mac = format!(",mac={}", mac_for(&st.name));
    match c.net.as_str() {
        "none" => {}
        "user" => {
            cmd.args(["-netdev", "user,id=net0", "-device"])
                .arg(format!("{model},netdev=net0{mac}"));
        }
        other => {
            let Some(br) = other.strip_prefix("bridge=") else {
                bail!("--net {other}: expected none, user or bridge=BRIDGE");
            };
            cmd.arg("-netdev")
                .arg(format!("bridge,id=net0,br={br}"))
                .arg("-device")
                .arg(format!("{model},netdev=net0{mac}"));
        }
    }
    Ok(cmd)
}

/// The OVMF code image and variables template present on this machine.
pub fn ovmf() -> Result<(PathBuf, PathBuf)> {
    for (code, vars) in OVMF {
        if Path::new(code).exists() && Path::new(vars).exists() {
            return Ok((code.into(), vars.into()));
        }
    }
    bail!("the snapshot boots with UEFI but no OVMF firmware was found (install the ovmf package)")
}

/// Launch QEMU as its own process group (so it outlives this program and a Ctrl-C of it), its
/// output in `qemu.log`, and wait until QMP answers. Returns the pid.
pub fn launch(st: &VmState, dir: &Path) -> Result<u32> {
    for p in [&st.qmp, &st.serial_socket] {
        let _ = fs::remove_file(p);
    }
    let log_path = dir.join("qemu.log");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = command(st, dir)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating a file handle")?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {QEMU} (install qemu-system-x86)"))?;
    let pid = child.id();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for QEMU")? {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "QEMU exited at start ({status}): {}",
                log.lines().last().unwrap_or("no message")
            );
        }
        if st.qmp.exists() {
            if let Ok(mut q) = Qmp::connect(&st.qmp, Duration::from_secs(10)) {
                q.status()?;
                break;
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("QEMU did not open its QMP socket within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // QEMU outlives us; dropping `child` does not kill it. Whoever reaps orphans reaps it.
    Ok(pid)
}

/// Whether `pid` is a live (not zombie) QEMU of this VM: its command line names our QMP socket.
pub fn alive(pid: u32, qmp: &Path) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("");
    if state.is_empty() || state == "Z" || state == "X" {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = qmp.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// What the VM is doing now, from its state, its process and QMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// QEMU runs; the QMP status (`running`, `paused`, `shutdown` = guest powered off...).
    Up(String),
    /// QEMU is gone although nobody stopped it.
    Crashed,
    Stopped,
    FailedBack,
}

pub fn observe(st: &VmState) -> Observed {
    use super::state::Phase;
    let up = st.pid.is_some_and(|p| alive(p, &st.qmp));
    match (st.phase, up) {
        (_, true) => {
            let status = Qmp::connect(&st.qmp, Duration::from_secs(5))
                .and_then(|mut q| q.status())
                .unwrap_or_else(|_| "unresponsive".into());
            Observed::Up(status)
        }
        (Phase::Running, false) => Observed::Crashed,
        (Phase::Stopped, false) => Observed::Stopped,
        (Phase::FailedBack, false) => Observed::FailedBack,
    }
}

impl Observed {
    pub fn label(&self) -> String {
        match self {
            Observed::Up(s) if s == "running" => "running".into(),
            Observed::Up(s) if s == "shutdown" => "powered-off".into(),
            Observed::Up(s) => s.clone(),
            Observed::Crashed => "crashed".into(),
            Observed::Stopped => "stopped".into(),
            Observed::FailedBack => "failed-back".into(),
        }
    }
}

/// Stop QEMU: ACPI power button, wait up to `timeout` for the guest to power off, then `quit`
/// (QEMU flushes and closes its images), then SIGTERM/SIGKILL. Returns whether the guest shut
/// down by itself.
pub fn stop(st: &VmState, timeout: Duration, hard: bool) -> Result<bool> {
    let Some(pid) = st.pid.filter(|&p| alive(p, &st.qmp)) else {
        return Ok(false);
    };
    // A pidfd taken now names this QEMU for good: a signal through it cannot reach a process
    // that reuses the pid after QEMU exits (kernels before 5.3 fall back to the pid).
    let proc = rustix::process::Pid::from_raw(pid as i32);
    let pidfd = proc
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let signal = |sig: rustix::process::Signal| {
        let _ = match (&pidfd, proc) {
            (Some(fd), _) => rustix::process::pidfd_send_signal(fd, sig),
            (None, Some(p)) => rustix::process::kill_process(p, sig),
            (None, None) => Ok(()),
        };
    };
    let mut clean = false;
    if let Ok(mut q) = Qmp::connect(&st.qmp, Duration::from_secs(10)) {
        if !hard {
            let already_off = q.status().map(|s| s == "shutdown").unwrap_or(false);
            if already_off {
                clean = true;
            } else if q.execute("system_powerdown", serde_json::json!({})).is_ok() {
                let start = Instant::now();
                while start.elapsed() < timeout {
                    match q.status() {
                        Ok(s) if s == "shutdown" => {
                            clean = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let _ = q.execute("quit", serde_json::json!({}));
    }
    if !wait_gone(pid, &st.qmp, Duration::from_secs(10)) {
        signal(rustix::process::Signal::TERM);
        if !wait_gone(pid, &st.qmp, Duration::from_secs(5)) {
            signal(rustix::process::Signal::KILL);
            if !wait_gone(pid, &st.qmp, Duration::from_secs(5)) {
                bail!("QEMU (pid {pid}) does not exit");
            }
        }
    }
    Ok(clean)
}

fn wait_gone(pid: u32, qmp: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !alive(pid, qmp) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid, qmp)
}

/// Build the disks and configuration of a new VM in `dir` (which exists and is empty).
pub fn prepare_disks(
    store: &LocalStore,
    snap: &snapshot::store::Snapshot,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<DiskState>> {
    let mut disks = Vec::new();
    for (d, idx) in snap.manifest.disks.iter().zip(&snap.indexes) {
        let base = format!("disk{}.base.raw", d.number);
        progress(&format!(
            "disk {}: materializing {} bytes from the store",
            d.number, d.size
        ));
        materialize(store, idx, &dir.join(&base))?;
        let overlay = format!("disk{}.0.qcow2", d.number);
        create_overlay(&dir.join(&base), "raw", &dir.join(&overlay))?;
        disks.push(DiskState {
            number: d.number,
            size: d.size,
            base,
            overlays: vec![overlay],
        });
    }
    Ok(disks)
}

/// The firmware to boot the snapshot with: OVMF for UEFI sources, SeaBIOS otherwise.
pub fn firmware(m: &snapshot::Manifest) -> String {
    match m.firmware {
        snapshot::manifest::Firmware::Uefi => "uefi",
        _ => "bios",
    }
    .to_string()
}

pub fn config_summary(c: &VmConfig) -> String {
    format!(
        "{} vCPU, {} MiB, {} firmware, {} ({}), net {}",
        c.cpus,
        c.memory_mib,
        c.firmware,
        c.accel,
        if c.virtio { "virtio" } else { "AHCI + e1000" },
        c.net
    )
}

/// A stable locally administered MAC in QEMU's 52:54:00 range, derived from the VM name.
fn mac_for(name: &str) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(name.as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}
