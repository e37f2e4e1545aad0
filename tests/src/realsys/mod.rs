//! Real Debian 12 (bookworm) servers as raw disk images: the test subjects of the dissimilar
//! hardware work (issue 11). Unlike [`crate::fixtures`] these are whole installed systems, built
//! from the Debian mirror with `debootstrap` and then booted on their *source* hardware (q35,
//! virtio-blk disk, virtio-net NIC with a fixed MAC) so that what depends on the hardware is made
//! there, as on a real server:
//!
//! 1. `build.sh` (root): debootstrap, the variant's packages, configuration, a GPT disk image
//!    (FAT32 ESP with Debian's signed shim and GRUB or a BIOS boot partition, ext4 root made with
//!    `mkfs.ext4 -d`: nothing is loop-mounted). A variant with its own layout brings it in
//!    `layout-<name>.sh`: RHEL's (`layout-lvm.sh`: `/boot` XFS, root XFS and swap on LVM) is made
//!    on loop devices over the partitions and the LVs' extents, lvm2 never activating anything,
//!    so the build host needs no device-mapper.
//! 2. The *prepare* boot: `realsys-prepare.service` switches the initramfs to what only this
//!    hardware needs (initramfs-tools `MODULES=dep`, dracut `hostonly="yes"`), installs GRUB on
//!    BIOS, runs `update-grub`, disables itself and powers off.
//! 3. The *proof* boot (a throwaway overlay): the marker on the serial console and the HTTP page
//!    fetched from the host through a user-network port forward.
//!
//! The prepared image is cached as `/var/cache/bmr/realsys/<host>-<recipe hash>.img` (or under
//! `$BMR_REALSYS_DIR`) with a `.json` description; the hash covers the scripts and every
//! constant of the recipe. Images appear by atomic rename: an interrupted build leaves none.
//! Boot logs of a build stay in `<workspace>/target/e2e/realsys-build-<variant>/`.

use crate::qemu::{self, Bus, Disk, Firmware, Nic, Vm, VmSpec};
use crate::util::{self, Workspace};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const BUILD_SH: &str = include_str!("build.sh");
const PREPARE_SH: &str = include_str!("realsys-prepare");
const MARKER_SH: &str = include_str!("realsys-marker");
const LAYOUT_LVM_SH: &str = include_str!("layout-lvm.sh");

/// Bump when the output changes for the same scripts and constants.
const BUILDER_VERSION: u32 = 1;
const MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
const SIZE_MIB: u64 = 2048;

/// The static address every variant has on its source NIC (gateway 10.0.2.2, DNS 10.0.2.3):
/// QEMU's user network forwards `hostfwd` ports to it.
pub const IP: &str = "10.0.2.15";
/// The name systemd's udev gives the source NIC (virtio-net in q35 slot 3, the next free slot
/// after the VGA and the disk); checked in the prepare boot.
pub const SOURCE_NIC: &str = "enp0s3";
/// The PCI slot of the source NIC on `pcie.0` (made explicit so the name cannot drift).
pub const SOURCE_NIC_SLOT: u8 = 3;
/// What the marker line starts with (then ` host=<name> root=... ip=... state=... failed=...`).
pub const MARKER_PREFIX: &str = "REALSYS-UP";
/// What a boot that stopped early prints (initramfs-tools, dracut, systemd, the kernel).
pub const STOPPED: &[&str] = &[
    "Gave up waiting for root",
    "ALERT!",
    "Dropping to a shell",
    "dracut-initqueue[",
    "Warning: /dev/",
    "You are in emergency mode",
    "Kernel panic",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// UEFI (shim, GRUB), initramfs-tools `MODULES=dep`, ifupdown on the NIC's name, fstab and
    /// GRUB by UUID.
    InitramfsTools,
    /// UEFI, dracut hostonly, systemd-networkd matching the source MAC, fstab by `/dev/vdaN`.
    Dracut,
    /// BIOS (GRUB i386-pc on GPT with a BIOS boot partition), initramfs-tools `MODULES=dep`,
    /// netplan (networkd) matching the source MAC with `set-name`.
    BiosNetplan,
    /// RHEL's default layout (`layout-lvm.sh`): UEFI, `/boot` on XFS, root XFS and swap on LVs of
    /// VG `rhel`, fstab by `/dev/mapper` names, `rd.lvm.lv=` on the command line; dracut
    /// hostonly, systemd-networkd matching the source MAC.
    RhelLvm,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::InitramfsTools,
        Variant::Dracut,
        Variant::BiosNetplan,
        Variant::RhelLvm,
    ];

    /// Short name used by the scripts and in file names.
    pub fn tag(self) -> &'static str {
        match self {
            Variant::InitramfsTools => "itools",
            Variant::Dracut => "dracut",
            Variant::BiosNetplan => "bios",
            Variant::RhelLvm => "rhel",
        }
    }

    pub fn host(self) -> &'static str {
        match self {
            Variant::InitramfsTools => "rs-itools",
            Variant::Dracut => "rs-dracut",
            Variant::BiosNetplan => "rs-bios",
            Variant::RhelLvm => "rs-rhel",
        }
    }

    pub fn firmware(self) -> Firmware {
        match self {
            Variant::BiosNetplan => Firmware::Bios,
            _ => Firmware::Uefi,
        }
    }

    /// The source NIC's MAC.
    pub fn mac(self) -> &'static str {
        match self {
            Variant::InitramfsTools => "52:54:00:5e:ed:01",
            Variant::Dracut => "52:54:00:5e:ed:02",
            Variant::BiosNetplan => "52:54:00:5e:ed:03",
            Variant::RhelLvm => "52:54:00:5e:ed:04",
        }
    }

    fn n(self) -> u8 {
        match self {
            Variant::InitramfsTools => 1,
            Variant::Dracut => 2,
            Variant::BiosNetplan => 3,
            Variant::RhelLvm => 4,
        }
    }

    /// What the root is mounted from on the source hardware (a prefix).
    pub fn source_root(self) -> &'static str {
        match self {
            Variant::RhelLvm => "/dev/mapper/rhel-root",
            _ => "/dev/vda",
        }
    }

    /// The variant's own disk layout script, if any (`layout-<name>.sh`).
    fn layout(self) -> Option<(&'static str, &'static str)> {
        match self {
            Variant::RhelLvm => Some(("layout-lvm.sh", LAYOUT_LVM_SH)),
            _ => None,
        }
    }

    /// The root filesystem's UUID (also on GRUB's and, but for dracut, fstab's lines).
    pub fn root_uuid(self) -> String {
        format!("5eed{:04x}-0000-4000-8000-000000000002", self.n())
    }

    /// The ESP's FAT volume id (`blkid` UUID), UEFI variants.
    pub fn esp_uuid(self) -> String {
        format!("5EED-{:04X}", self.n())
    }

    /// UUIDs of the `/boot` filesystem, the swap LV and the PV (RhelLvm).
    fn lvm_uuids(self) -> (String, String, String) {
        let n = self.n();
        (
            format!("5eed{n:04x}-0000-4000-8000-00000000000b"),
            format!("5eed{n:04x}-0000-4000-8000-00000000000c"),
            format!("5eed{n:04x}00004000800000000000000d"),
        )
    }

    fn disk_guid(self) -> String {
        format!("5eed{:04x}-0000-4000-8000-000000000000", self.n())
    }

    fn machine_id(self) -> String {
        format!("5eed{:04x}00004000800000000000000a", self.n())
    }
}

/// Figures of one build, in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    /// `build.sh`: debootstrap, packages, configuration, image.
    pub build: f64,
    /// The debootstrap step alone.
    pub debootstrap: f64,
    /// Power-on to power-off of the prepare boot (initramfs, GRUB), TCG.
    pub prepare_boot: f64,
    /// Power-on to the marker in the proof boot, TCG.
    pub proof_marker: f64,
    /// From the marker to the HTTP page fetched from the host.
    pub proof_http: f64,
}

/// A built, prepared and proven real server image (read-only: boot it with a throwaway overlay
/// or a copy).
#[derive(Debug, Clone)]
pub struct RealServer {
    pub image: PathBuf,
    pub size: u64,
    pub host: String,
    pub variant: Variant,
    /// Static address on the source NIC: [`IP`].
    pub ip: &'static str,
    pub source_mac: String,
    /// The source NIC's kernel name on the source hardware: [`SOURCE_NIC`].
    pub source_nic: String,
    /// Exact text the marker unit prints: `REALSYS-UP host=<host>` (the line goes on with
    /// ` root=<device> ip=<nic>=<addr>/<len>,... state=<systemd state> failed=<units> nics=...`).
    pub marker: String,
    /// The installed kernel (`uname -r`).
    pub kernel: String,
    pub root_uuid: String,
    /// The ESP's volume id (UEFI variants).
    pub esp_uuid: Option<String>,
    pub recipe_hash: String,
    /// How long the cached build took (zeros are never cached).
    pub timings: Timings,
    /// What the prepare boot printed about the initramfs images (`REALSYS-INITRD` lines).
    pub initrds: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Description {
    variant: Variant,
    size: u64,
    kernel: String,
    recipe_hash: String,
    timings: Timings,
    initrds: Vec<String>,
}

impl RealServer {
    fn from(d: Description, image: PathBuf) -> RealServer {
        let v = d.variant;
        RealServer {
            image,
            size: d.size,
            host: v.host().into(),
            variant: v,
            ip: IP,
            source_mac: v.mac().into(),
            source_nic: SOURCE_NIC.into(),
            marker: format!("{MARKER_PREFIX} host={}", v.host()),
            kernel: d.kernel,
            root_uuid: v.root_uuid(),
            esp_uuid: (v.firmware() != Firmware::Bios).then(|| v.esp_uuid()),
            recipe_hash: d.recipe_hash,
            timings: d.timings,
            initrds: d.initrds,
        }
    }
}

/// The parsed marker line.
#[derive(Debug, Clone, PartialEq)]
pub struct Up {
    pub line: String,
    pub host: String,
    /// `findmnt -no SOURCE /`, e.g. `/dev/vda2`, `/dev/nvme0n1p2`.
    pub root: String,
    /// `nic=addr/len` pairs, or `none`.
    pub ip: String,
    /// `systemctl is-system-running` (`running`, `degraded`).
    pub state: String,
    /// Failed units, or `none`.
    pub failed: String,
    /// `name=mac` pairs.
    pub nics: String,
}

impl Up {
    /// Parses the last marker line in `serial` (complete lines only).
    pub fn parse(serial: &str) -> Option<Up> {
        let complete = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
        let line = complete.lines().rev().find_map(|l| {
            l.find(MARKER_PREFIX)
                .map(|at| l[at..].trim_end().to_string())
        })?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap_or_default()
        };
        Some(Up {
            host: field("host"),
            root: field("root"),
            ip: field("ip"),
            state: field("state"),
            failed: field("failed"),
            nics: field("nics"),
            line,
        })
    }

    /// Whether the static address is up.
    pub fn has_static_ip(&self) -> bool {
        self.ip.contains(&format!("={IP}/"))
    }
}

/// Where the prepared images are cached: `$BMR_REALSYS_DIR` or `/var/cache/bmr/realsys`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("BMR_REALSYS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/bmr/realsys"))
}

/// Whether real servers can be built or booted here: QEMU with the variant's firmware, and, for a
/// build, root and the tools `scripts/setup` installs. `Err` says what is missing.
pub fn available(v: Variant) -> Result<()> {
    if !qemu::available(v.firmware()) {
        bail!(
            "QEMU or its firmware for {:?} is not installed",
            v.firmware()
        );
    }
    if cached(v).is_some() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("building a real server needs root (debootstrap, chroot)");
    }
    let layout_tools: &[&str] = match v.layout() {
        Some(_) => &["lvm", "mkfs.xfs", "mkswap", "losetup"],
        None => &[],
    };
    for tool in [
        "debootstrap",
        "sgdisk",
        "mkfs.vfat",
        "mcopy",
        "mmd",
        "mkfs.ext4",
    ]
    .iter()
    .chain(layout_tools)
    {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            bail!("{tool} is not installed (scripts/setup)");
        }
    }
    Ok(())
}

/// The recipe hash: builder version, scripts, every constant the build and the prepare boot use.
pub fn recipe_hash(v: Variant) -> String {
    let mut h = sha2::Sha256::new();
    let consts = format!(
        "bmr-realsys-v{BUILDER_VERSION}\n{MIRROR} {SUITE} {SIZE_MIB}\n{} {} {} {} {} {} {} {SOURCE_NIC} {SOURCE_NIC_SLOT} {IP}\n",
        v.tag(),
        v.host(),
        v.mac(),
        v.root_uuid(),
        v.esp_uuid(),
        v.disk_guid(),
        v.machine_id()
    );
    for part in [consts.as_str(), BUILD_SH, PREPARE_SH, MARKER_SH] {
        h.update(sha2::Sha256::digest(part.as_bytes()));
    }
    // A layout script and its UUIDs count for its own variant only.
    if let Some((_, script)) = v.layout() {
        let (boot, swap, pv) = v.lvm_uuids();
        h.update(sha2::Sha256::digest(
            format!("{boot} {swap} {pv}\n").as_bytes(),
        ));
        h.update(sha2::Sha256::digest(script.as_bytes()));
    }
    hex::encode(h.finalize())[..16].to_string()
}

fn paths(v: Variant) -> (PathBuf, PathBuf, String) {
    let stem = format!("{}-{}", v.host(), recipe_hash(v));
    let dir = cache_dir();
    (
        dir.join(format!("{stem}.img")),
        dir.join(format!("{stem}.json")),
        stem,
    )
}

fn cached(v: Variant) -> Option<RealServer> {
    let (img, json, _) = paths(v);
    let d: Description = serde_json::from_slice(&fs::read(&json).ok()?).ok()?;
    if d.variant != v || fs::metadata(&img).ok()?.len() != d.size {
        return None;
    }
    Some(RealServer::from(d, img))
}

/// The real server of variant `v`: from the cache, or built, prepared on its source hardware and
/// proven there (minutes: debootstrap from the mirror and two TCG boots; printed).
pub fn real_server(v: Variant) -> Result<RealServer> {
    if let Some(s) = cached(v) {
        return Ok(s);
    }
    let dir = cache_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (img, json, stem) = paths(v);
    let lock = File::create(dir.join(format!("{stem}.lock")))
        .with_context(|| format!("creating the lock file in {}", dir.display()))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!("locking {stem}.lock: {}", std::io::Error::last_os_error());
    }
    if let Some(s) = cached(v) {
        return Ok(s);
    }
    available(v)?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let work = dir.join(format!(".build-{stem}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let cleanup = RemoveWork(work.clone());
    let logs = Workspace::root()
        .join("target")
        .join("e2e")
        .join(format!("realsys-build-{}", v.tag()));
    let _ = fs::remove_dir_all(&logs);
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let d = build_prepare_prove(v, &work, &logs).with_context(|| {
        format!(
            "building the real server {} (logs in {})",
            v.host(),
            logs.display()
        )
    })?;
    let desc = serde_json::to_vec_pretty(&d).context("describing the image")?;
    let tmp_json = work.join("server.json");
    fs::write(&tmp_json, desc).with_context(|| format!("writing {}", tmp_json.display()))?;
    fs::rename(work.join("disk.img"), &img)
        .with_context(|| format!("renaming the image to {}", img.display()))?;
    fs::rename(&tmp_json, &json)
        .with_context(|| format!("renaming the description to {}", json.display()))?;
    drop(cleanup);
    let s = RealServer::from(d, img);
    let t = &s.timings;
    println!(
        "realsys: {} ready: build {:.0} s (debootstrap {:.0} s), prepare boot {:.0} s, proof boot: marker at {:.0} s, HTTP {:.1} s later (TCG); {}",
        s.host,
        t.build,
        t.debootstrap,
        t.prepare_boot,
        t.proof_marker,
        t.proof_http,
        s.image.display()
    );
    Ok(s)
}

fn build_prepare_prove(v: Variant, work: &Path, logs: &Path) -> Result<Description> {
    let mut timings = Timings::default();
    let scripts = work.join("scripts");
    fs::create_dir_all(&scripts)?;
    fs::write(scripts.join("build.sh"), BUILD_SH)?;
    fs::write(scripts.join("realsys-prepare"), PREPARE_SH)?;
    fs::write(scripts.join("realsys-marker"), MARKER_SH)?;
    if let Some((name, script)) = v.layout() {
        fs::write(scripts.join(name), script)?;
    }
    let (boot_uuid, swap_uuid, pv_uuid) = v.lvm_uuids();
    let debs = cache_dir().join("debs");
    println!(
        "realsys: building {} ({}): debootstrap {SUITE} from {MIRROR} in {}",
        v.host(),
        v.tag(),
        work.display()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(scripts.join("build.sh"))
        .env("VARIANT", v.tag())
        .env("HOST", v.host())
        .env("WORK", work)
        .env("SIZE_MIB", SIZE_MIB.to_string())
        .env("ROOT_UUID", v.root_uuid())
        .env("ESP_VOLID", v.esp_uuid())
        .env("DISK_GUID", v.disk_guid())
        .env("MAC", v.mac())
        .env("NIC", SOURCE_NIC)
        .env("MACHINE_ID", v.machine_id())
        .env("DEBS", &debs)
        .env("MIRROR", MIRROR)
        .env("SUITE", SUITE)
        .env("SCRIPTS", &scripts)
        .env("BOOT_UUID", boot_uuid)
        .env("SWAP_UUID", swap_uuid)
        .env("PV_UUID", pv_uuid);
    let out = util::exec(&mut cmd, Duration::from_secs(60 * 60))?;
    fs::write(logs.join("build.log"), out.all())?;
    for f in ["debootstrap.log", "apt.log"] {
        let _ = fs::copy(work.join(f), logs.join(f));
    }
    if !out.success() {
        bail!("build.sh failed\n{}", out.describe());
    }
    timings.build = out.elapsed.as_secs_f64();
    timings.debootstrap = step_seconds(&out.stdout, "configuring").unwrap_or(0.0);
    println!("{}", out.stdout.trim_end());
    let kernel = fs::read_to_string(work.join("kver"))
        .context("reading the kernel version the build wrote")?
        .trim()
        .to_string();
    let size = fs::metadata(work.join("disk.img"))
        .context("the build made no disk.img")?
        .len();

    // The prepare boot, writable, on the source hardware.
    let mut spec = source_spec(v, &work.join("disk.img"), "prepare", vec![]);
    spec.disks[0].readonly = false;
    if v.firmware() == Firmware::Bios {
        // no boot loader yet: the prepare boot installs GRUB from the system itself
        spec.kernel = Some((
            work.join("vmlinuz"),
            work.join("initrd.img"),
            format!("root=UUID={} ro console=ttyS0,115200n8", v.root_uuid()),
        ));
    }
    let mut vm = Vm::start(spec, logs)?;
    let (i, _) = vm.wait_for_any(
        &["REALSYS-PREPARED", "REALSYS-PREPARE-FAILED"],
        Duration::from_secs(40 * 60),
    )?;
    if i != 0 {
        let _ = vm.wait_for("\n", Duration::from_secs(10));
        bail!(
            "the prepare boot failed: {}; serial log {}",
            last_line(&vm.output(), "REALSYS-PREPARE-FAILED"),
            vm.log.display()
        );
    }
    let st = vm.wait_exit(Duration::from_secs(5 * 60))?;
    timings.prepare_boot = vm.started.elapsed().as_secs_f64();
    let serial = vm.output();
    drop(vm);
    if !st.success() {
        bail!("QEMU exited with {st} after the prepare boot");
    }
    // the lines come through the journal to the console: `[ time] realsys-prepare[pid]: ...`
    let tagged = |tag: &str| -> Vec<String> {
        serial
            .lines()
            .filter_map(|l| l.find(tag).map(|at| l[at + tag.len()..].trim().to_string()))
            .collect()
    };
    let nics = tagged("REALSYS-NIC ");
    let want = format!("name={SOURCE_NIC} mac={}", v.mac());
    if !nics.iter().any(|l| l.starts_with(&want)) {
        bail!(
            "the source NIC is not {SOURCE_NIC} with {}: the prepare boot saw {nics:?}",
            v.mac()
        );
    }
    let initrds = tagged("REALSYS-INITRD ");
    println!(
        "realsys: prepare boot of {} took {:.0} s: {}; initramfs {}",
        v.host(),
        timings.prepare_boot,
        nics.join(" "),
        initrds.join(", ")
    );

    // The proof boot: a throwaway overlay, so the cached image is the prepared one.
    let port = util::free_port();
    let spec = source_spec(v, &work.join("disk.img"), "proof", vec![(port, 80)]);
    let mut vm = Vm::start(spec, logs)?;
    let up = wait_up(&mut vm, Duration::from_secs(20 * 60))?;
    timings.proof_marker = vm.started.elapsed().as_secs_f64();
    check_source_up(v, &up)?;
    let t = Instant::now();
    let page = http_get(port, Duration::from_secs(120))?;
    timings.proof_http = t.elapsed().as_secs_f64();
    if !page.contains(v.host()) {
        bail!("the page on port 80 does not name {}: {page:?}", v.host());
    }
    println!(
        "realsys: proof boot of {}: {} ({:.0} s); HTTP page fetched",
        v.host(),
        up.line,
        timings.proof_marker
    );
    vm.kill();
    Ok(Description {
        variant: v,
        size,
        kernel,
        recipe_hash: recipe_hash(v),
        timings,
        initrds,
    })
}

/// What a boot on the source hardware must show: the host, the root on virtio-blk, the address.
fn check_source_up(v: Variant, up: &Up) -> Result<()> {
    if up.host != v.host() || !up.root.starts_with(v.source_root()) || !up.has_static_ip() {
        bail!(
            "the source boot came up wrong (want host={} root={}* ip {SOURCE_NIC}={IP}/24): {}",
            v.host(),
            v.source_root(),
            up.line
        );
    }
    Ok(())
}

fn step_seconds(log: &str, step: &str) -> Option<f64> {
    log.lines().find_map(|l| {
        let rest = l.strip_prefix("realsys-build: +")?;
        let (secs, what) = rest.split_once("s ")?;
        what.starts_with(step).then(|| secs.parse().ok()).flatten()
    })
}

fn last_line(serial: &str, prefix: &str) -> String {
    serial
        .lines()
        .rev()
        .find(|l| l.contains(prefix))
        .unwrap_or("")
        .trim()
        .to_string()
}

fn source_spec(v: Variant, image: &Path, name: &str, hostfwd: Vec<(u16, u16)>) -> VmSpec {
    let mut spec = VmSpec::new(name, v.firmware());
    spec.disks
        .push(Disk::new(image, Bus::Virtio).readonly().boot(1));
    spec.nics.push(Nic {
        mac: Some(v.mac().into()),
        addr: Some(SOURCE_NIC_SLOT),
        hostfwd,
        ..Nic::new("virtio-net-pci")
    });
    spec
}

/// The source hardware of `s`: q35 with its firmware, the image on virtio-blk (read-only: a
/// throwaway overlay; clear `disks[0].readonly` to boot a copy for real), a virtio-net NIC with
/// the source MAC in slot [`SOURCE_NIC_SLOT`], and the guest's port 80 forwarded from
/// `127.0.0.1:<nics[0].hostfwd[0].0>` (a free port).
pub fn source_vm(s: &RealServer, name: &str) -> VmSpec {
    source_spec(s.variant, &s.image, name, vec![(util::free_port(), 80)])
}

/// Waits for the marker line (complete) and parses it.
pub fn wait_up(vm: &mut Vm, timeout: Duration) -> Result<Up> {
    let deadline = Instant::now() + timeout;
    vm.wait_for(MARKER_PREFIX, timeout)?;
    vm.wait_for("\n", deadline.saturating_duration_since(Instant::now()))?;
    Up::parse(&vm.output()).context("the marker line does not parse")
}

/// `GET /` on `127.0.0.1:port`, retried until an HTTP 200 answer or `timeout` (QEMU's user network
/// accepts forwarded connections before the guest listens). Returns the body.
pub fn http_get(port: u16, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get_once(port) {
            Ok((status, body)) if status.contains(" 200") => return Ok(body),
            Ok((status, _)) => format!("answer {status:?}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("no HTTP 200 from 127.0.0.1:{port} within {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn http_get_once(port: u16) -> Result<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).context("reading the answer")?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP answer")?;
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

/// Removes a build directory, but only once nothing is mounted under it (a killed build can
/// leave the chroot's bind mounts of /dev, /proc, /sys: removing through them would be a
/// disaster).
struct RemoveWork(PathBuf);

impl Drop for RemoveWork {
    fn drop(&mut self) {
        if let Err(e) = remove_work(&self.0) {
            eprintln!("realsys: leaving {}: {e:#}", self.0.display());
        }
    }
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort();
    v.reverse();
    v
}

fn remove_work(dir: &Path) -> Result<()> {
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        bail!("still mounted under it: {left:?}");
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_line_parses() {
        let serial = "x\nREALSYS-UP host=rs-itools root=/dev/vda2 ip=enp0s3=10.0.2.15/24 state=running failed=none nics=enp0s3=52:54:00:5e:ed:01\n";
        let up = Up::parse(serial).unwrap();
        assert_eq!(up.host, "rs-itools");
        assert_eq!(up.root, "/dev/vda2");
        assert!(up.has_static_ip());
        assert_eq!(up.state, "running");
        assert!(Up::parse("REALSYS-UP host=x").is_none(), "incomplete line");
    }

    #[test]
    fn recipes_differ() {
        let h: Vec<String> = Variant::ALL.iter().map(|v| recipe_hash(*v)).collect();
        assert_ne!(h[0], h[1]);
        assert_ne!(h[1], h[2]);
        assert_ne!(h[2], h[3]);
        assert_eq!(h[0], recipe_hash(Variant::InitramfsTools));
    }

    #[test]
    fn step_seconds_read() {
        let log = "realsys-build: +0s debootstrap\nrealsys-build: +187s configuring\n";
        assert_eq!(step_seconds(log, "configuring"), Some(187.0));
    }
}
