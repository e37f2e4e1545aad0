//! Targets: the disks a snapshot is written to. Block devices are described from sysfs; plain
//! files are disks too (their current size is the disk size). This module also owns the safety
//! rules that decide whether a target may be written at all.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where the kernel's view of the machine is read: `/sys` and `/proc`, or a fake tree of the same
/// shape in tests (the wrong-disk checks run on made-up machines there).
#[derive(Debug, Clone)]
pub struct Kernel {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl Kernel {
    /// This machine.
    pub fn host() -> Kernel {
        Kernel {
            sys: "/sys".into(),
            proc: "/proc".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Block,
}

/// A disk this machine can write.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub path: PathBuf,
    pub kind: Kind,
    pub size: u64,
    /// Logical sector size of a block device; `None` for files (they take the source's).
    pub logical_sector: Option<u32>,
    pub physical_sector: Option<u32>,
    /// sysfs name (`sda`, `nvme0n1`, `loop3`) of a block device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `major:minor` of a block device.
    #[serde(skip)]
    pub devno: Option<(u32, u32)>,
    pub transport: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub serial: String,
    pub rotational: bool,
    pub removable: bool,
    pub read_only: bool,
    /// A file target's own identity (device and inode).
    #[serde(skip)]
    pub inode: Option<Identity>,
    /// The file behind a loop-device target.
    #[serde(skip)]
    pub backing: Option<Backing>,
}

/// What a target is beneath its path. Paths are many (hard links, a second device node, a second
/// loop device over one file, a renamed or unlinked backing file); these are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// A block device, by (major, minor).
    Block((u32, u32)),
    /// A file, by the (major, minor) of its filesystem and its inode number.
    File { dev: (u32, u32), ino: u64 },
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Identity {
        let d = meta.dev();
        Identity::File {
            dev: (libc::major(d), libc::minor(d)),
            ino: meta.ino(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Identity::Block((a, b)) => format!("block device {a}:{b}"),
            Identity::File { dev: (a, b), ino } => format!("inode {ino} on device {a}:{b}"),
        }
    }
}

/// The file a loop device reads and writes: its path as sysfs shows it (`NAME (deleted)` once its
/// name is gone) and its identities, from the kernel's loop status (`LOOP_GET_STATUS64`, which
/// survives renames and unlinks) and from a stat of the path.
#[derive(Debug, Clone)]
pub struct Backing {
    pub path: String,
    pub ids: Vec<Identity>,
}

/// The backing file of loop device `name` (sysfs name, under `sys`), asked through the device
/// node `node`. `None` when no file is bound.
fn loop_backing(sys: &Path, name: &str, node: &Path) -> Option<Backing> {
    let path = fs::read_to_string(sys.join(format!("block/{name}/loop/backing_file"))).ok()?;
    let path = path.trim_end_matches('\n').to_string();
    let mut ids = Vec::new();
    let status = fs::File::open(node)
        .ok()
        .and_then(|f| snapshot::sys::loop_backing(&f).ok().flatten());
    if let Some(b) = status {
        ids.push(Identity::File {
            dev: b.dev,
            ino: b.ino,
        });
        if b.rdev != (0, 0) {
            ids.push(Identity::Block(b.rdev));
        }
    }
    // The path names the file only while it is not deleted (another file may have its name now).
    if !path.ends_with(" (deleted)") {
        if let Ok(m) = fs::metadata(&path) {
            ids.push(Identity::of(&m));
            if m.file_type().is_block_device() {
                let r = m.rdev();
                ids.push(Identity::Block((libc::major(r), libc::minor(r))));
            }
        }
    }
    ids.dedup();
    Some(Backing { path, ids })
}

impl Target {
    /// Open the description of `spec`: a block device node or a regular file.
    pub fn from_path(spec: &str) -> Result<Target> {
        Target::from_path_in(spec, &Kernel::host())
    }

    /// [`Target::from_path`], a block device described from `k`'s sysfs.
    pub fn from_path_in(spec: &str, k: &Kernel) -> Result<Target> {
        let path = PathBuf::from(spec);
        let meta = fs::metadata(&path).with_context(|| {
            format!("target {spec}: cannot stat it (create a file target with `truncate -s SIZE {spec}`)")
        })?;
        if meta.file_type().is_block_device() {
            let rdev = meta.rdev();
            let devno = (libc::major(rdev), libc::minor(rdev));
            let sys = k.sys.join(format!("dev/block/{}:{}", devno.0, devno.1));
            let sys = fs::canonicalize(&sys)
                .with_context(|| format!("target {spec}: no sysfs entry {}", sys.display()))?;
            if sys.join("partition").exists() {
                let parent = sys
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                bail!("target {spec} is a partition of /dev/{parent}: give the whole disk");
            }
            let mut t = from_sysfs(&sys)?;
            if t.name.as_deref().is_some_and(|n| n.starts_with("loop")) {
                t.backing = loop_backing(&k.sys, t.name.as_deref().unwrap_or_default(), &path);
            }
            t.path = path;
            Ok(t)
        } else if meta.is_file() {
            Ok(Target {
                path,
                kind: Kind::File,
                size: meta.len(),
                logical_sector: None,
                physical_sector: None,
                name: None,
                devno: None,
                transport: "file".into(),
                model: String::new(),
                serial: String::new(),
                rotational: false,
                removable: false,
                read_only: meta.permissions().readonly(),
                inode: Some(Identity::of(&meta)),
                backing: None,
            })
        } else {
            bail!("target {spec} is neither a block device nor a regular file");
        }
    }

    /// One line for the plan: `/dev/sdb (sata, WDC WD40, 4.0 TB, 512-byte sectors)`.
    pub fn describe(&self) -> String {
        let mut parts = vec![self.transport.clone()];
        if !self.model.is_empty() {
            parts.push(self.model.clone());
        }
        if !self.serial.is_empty() {
            parts.push(format!("serial {}", self.serial));
        }
        parts.push(crate::report::bytes(self.size));
        if let Some(s) = self.logical_sector {
            parts.push(format!("{s}-byte sectors"));
        }
        if self.rotational {
            parts.push("rotational".into());
        }
        if self.removable {
            parts.push("removable".into());
        }
        format!("{} ({})", self.path.display(), parts.join(", "))
    }

    /// Everything this target is: its device number or inode, and a loop device's backing file.
    pub fn identities(&self) -> Vec<Identity> {
        let mut v: Vec<Identity> = self.devno.map(Identity::Block).into_iter().collect();
        v.extend(self.inode);
        if let Some(b) = &self.backing {
            v.extend(b.ids.iter().copied());
        }
        v
    }
}

/// Refuse two targets that are one disk underneath: the same device, hard links to one file, a
/// loop device and its backing file, two loop devices over one file. The second would overwrite
/// the first.
pub fn check_distinct(targets: &[Target]) -> Result<()> {
    for (j, b) in targets.iter().enumerate() {
        for a in &targets[..j] {
            let ids = b.identities();
            let Some(id) = a.identities().into_iter().find(|i| ids.contains(i)) else {
                continue;
            };
            if a.path == b.path {
                bail!("target {} is given twice", b.path.display());
            }
            // A target's own identity (its device number, a file's inode), not what is under it.
            let own = |t: &Target| t.devno.map(Identity::Block).or(t.inode);
            let backing = |t: &Target| {
                t.backing
                    .as_ref()
                    .map(|k| k.path.clone())
                    .unwrap_or_default()
            };
            let why = match (own(a) == Some(id), own(b) == Some(id)) {
                (true, true) if a.kind == Kind::File => {
                    format!("hard links to one file ({})", id.describe())
                }
                (true, true) => format!("both are {}", id.describe()),
                (true, false) => format!(
                    "{} is a loop device over it ({})",
                    b.path.display(),
                    id.describe()
                ),
                (false, true) => format!(
                    "{} is a loop device over it ({})",
                    a.path.display(),
                    id.describe()
                ),
                (false, false) => format!(
                    "both are loop devices over one {} ({}, {})",
                    if matches!(id, Identity::Block(_)) {
                        "block device"
                    } else {
                        "file"
                    },
                    backing(b),
                    id.describe()
                ),
            };
            bail!(
                "target {} is the same disk as target {}: {why}; each disk needs its own target",
                b.path.display(),
                a.path.display()
            );
        }
    }
    Ok(())
}

/// Describe the whole-disk block device at sysfs directory `sys` (`/sys/devices/.../block/sda`).
fn from_sysfs(sys: &Path) -> Result<Target> {
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let read = |rel: &str| -> String {
        fs::read_to_string(sys.join(rel))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let num = |rel: &str| -> Option<u64> { read(rel).parse().ok() };
    let sectors = num("size").with_context(|| format!("{}: no size", sys.display()))?;
    let dev = read("dev");
    let devno = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    let mut serial = read("device/serial");
    if serial.is_empty() {
        serial = read("serial");
    }
    if serial.is_empty() {
        serial = read("device/wwid");
    }
    Ok(Target {
        path: PathBuf::from(format!("/dev/{name}")),
        kind: Kind::Block,
        size: sectors * 512,
        logical_sector: num("queue/logical_block_size").map(|v| v as u32),
        physical_sector: num("queue/physical_block_size").map(|v| v as u32),
        transport: transport(sys, &name),
        model: read("device/model"),
        serial,
        rotational: read("queue/rotational") == "1",
        removable: read("removable") == "1",
        read_only: read("ro") == "1",
        name: Some(name),
        devno,
        inode: None,
        backing: None,
    })
}

/// The bus a disk hangs off, read from its place in the device tree.
fn transport(sys: &Path, name: &str) -> String {
    let p = sys.to_string_lossy();
    let t = if name.starts_with("nvme") || p.contains("/nvme") {
        "nvme"
    } else if p.contains("/usb") {
        "usb"
    } else if name.starts_with("loop") {
        "loop"
    } else if name.starts_with("vd") || (p.contains("/virtio") && !p.contains("/host")) {
        "virtio"
    } else if p.contains("/ata") {
        "sata"
    } else if p.contains("/end_device") || p.contains("/sas") {
        "sas"
    } else if name.starts_with("mmcblk") {
        "mmc"
    } else if p.contains("/host") {
        "scsi"
    } else if p.contains("/virtual/") {
        "virtual"
    } else {
        "unknown"
    };
    t.to_string()
}

/// Every whole disk the kernel knows, except the kinds that are never restore targets
/// (RAM disks, zram, device-mapper, md, optical, floppy, network block devices, unbound loops).
pub fn discover() -> Result<Vec<Target>> {
    discover_in(&Kernel::host())
}

/// [`discover`] on `k`.
pub fn discover_in(k: &Kernel) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    let block = k.sys.join("block");
    let what = || format!("listing {}", block.display());
    for e in fs::read_dir(&block).with_context(what)? {
        let e = e.with_context(what)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let skip = ["ram", "zram", "dm-", "md", "sr", "fd", "nbd", "loop"];
        if skip.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let sys = fs::canonicalize(e.path()).with_context(|| e.path().display().to_string())?;
        let t = from_sysfs(&sys)?;
        if t.size > 0 {
            out.push(t);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// `--target auto`: pick one disk per source disk (sizes in source disk order).
///
/// The rule, stable and documented in docs/restore.md: candidates are the discovered disks that
/// are not removable, not USB, not read-only, not in use (see [`Safety`]) and at least as big as
/// the smallest source disk. There must be exactly as many candidates as source disks; they are
/// then matched largest to largest (ties by device path). Anything else is ambiguous and the error
/// lists the candidates.
pub fn auto_assign(sources: &[u64], disks: Vec<Target>, safety: &Safety) -> Result<Vec<Target>> {
    let min = sources.iter().copied().min().unwrap_or(0);
    let mut cands: Vec<Target> = Vec::new();
    let mut left_out: Vec<String> = Vec::new();
    for t in disks {
        let why = if t.removable {
            Some("removable".to_string())
        } else if t.transport == "usb" {
            Some("USB".to_string())
        } else if t.size < min {
            Some(format!("smaller than {}", crate::report::bytes(min)))
        } else {
            safety.check(&t).err().map(|e| {
                let s = e.to_string();
                s.strip_prefix(&format!("{} ", t.path.display()))
                    .unwrap_or(&s)
                    .to_string()
            })
        };
        match why {
            Some(w) => left_out.push(format!("{}: {w}", t.path.display())),
            None => cands.push(t),
        }
    }
    let list = |c: &[Target]| {
        if c.is_empty() {
            "none".to_string()
        } else {
            c.iter()
                .map(|t| t.describe())
                .collect::<Vec<_>>()
                .join("; ")
        }
    };
    if cands.len() != sources.len() {
        let out = if left_out.is_empty() {
            String::new()
        } else {
            format!("; left out: {}", left_out.join("; "))
        };
        bail!(
            "--target auto: {} source disk(s) but {} candidate disk(s) ({}){out}; name the targets with --target DEV[,DEV...]",
            sources.len(),
            cands.len(),
            list(&cands)
        );
    }
    // Largest source to largest candidate.
    cands.sort_by(|a, b| b.size.cmp(&a.size).then(a.path.cmp(&b.path)));
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by(|&a, &b| sources[b].cmp(&sources[a]).then(a.cmp(&b)));
    let mut out: Vec<Option<Target>> = vec![None; sources.len()];
    for (k, &i) in order.iter().enumerate() {
        if cands[k].size < sources[i] {
            bail!(
                "--target auto: source disk {i} needs {} but the candidate for it is {}",
                crate::report::bytes(sources[i]),
                cands[k].describe()
            );
        }
        out[i] = Some(cands[k].clone());
    }
    Ok(out.into_iter().map(|t| t.expect("all assigned")).collect())
}

/// Comma-separated whole-disk devices never to write, set by the boot image's init for the boot
/// medium: `restorer restore --target auto` skips them; an explicit target naming one is refused.
pub const EXCLUDE_ENV: &str = "BMR_EXCLUDE_DEVICES";

/// What this machine is using right now: mounted filesystems, active swap, the root and the
/// medium the program runs from, loop devices and their backing files. Read once, checked per
/// target. Everything is compared by device number and inode, never by path.
pub struct Safety {
    /// Whole disks (major:minor) in use, each with the reason.
    disks: Vec<((u32, u32), String)>,
    /// Every loop device bound to a file.
    loops: Vec<LoopDev>,
    /// The sysfs they were read from (holders are read when checked).
    sys: PathBuf,
    /// Active swap files, with their path.
    swap_files: Vec<(Identity, String)>,
}

/// A bound loop device.
struct LoopDev {
    /// `/dev/loopN`.
    path: String,
    name: String,
    devno: Option<(u32, u32)>,
    backing: Backing,
}

impl Safety {
    pub fn scan() -> Result<Safety> {
        Safety::scan_in(&Kernel::host())
    }

    /// [`Safety::scan`] on `k`.
    pub fn scan_in(k: &Kernel) -> Result<Safety> {
        let sys = k.sys.as_path();
        let mut disks = Vec::new();
        let mountinfo = k.proc.join("self/mountinfo");
        let info = fs::read_to_string(&mountinfo)
            .with_context(|| format!("reading {}", mountinfo.display()))?;
        for line in info.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 5 {
                continue;
            }
            let mnt = unescape(f[4]);
            let why = if mnt == "/" {
                "holds the running system's root filesystem (mounted on /)".to_string()
            } else {
                format!("is mounted (on {mnt})")
            };
            let mut devs = Vec::new();
            if let Some((maj, min)) = f[2].split_once(':') {
                if let (Ok(maj), Ok(min)) = (maj.parse::<u32>(), min.parse::<u32>()) {
                    if maj != 0 {
                        devs.push((maj, min));
                    }
                }
            }
            // btrfs and others show an anonymous 0:N device: the mount source names the disk.
            let source = line
                .split_once(" - ")
                .and_then(|(_, r)| r.split(' ').nth(1))
                .map(unescape);
            if let Some(src) = source.filter(|s| s.starts_with("/dev/")) {
                if let Ok(m) = fs::metadata(&src) {
                    if m.file_type().is_block_device() {
                        devs.push((libc::major(m.rdev()), libc::minor(m.rdev())));
                    }
                }
            }
            for dev in devs {
                for d in whole_disks(sys, dev) {
                    disks.push((d, why.clone()));
                }
            }
        }
        let mut swap_files = Vec::new();
        if let Ok(swaps) = fs::read_to_string(k.proc.join("swaps")) {
            for line in swaps.lines().skip(1) {
                let Some(dev) = line.split_whitespace().next() else {
                    continue;
                };
                let dev = unescape(dev);
                if let Ok(m) = fs::metadata(&dev) {
                    if m.file_type().is_block_device() {
                        let r = m.rdev();
                        for d in whole_disks(sys, (libc::major(r), libc::minor(r))) {
                            disks.push((d, format!("is in use as swap ({dev})")));
                        }
                    } else {
                        swap_files.push((Identity::of(&m), dev));
                    }
                }
            }
        }
        // The boot medium, as the boot image's init names it (see init/job.rs).
        if let Ok(list) = std::env::var(EXCLUDE_ENV) {
            for dev in list.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                if let Ok(m) = fs::metadata(dev) {
                    if m.file_type().is_block_device() {
                        let r = m.rdev();
                        for d in whole_disks(sys, (libc::major(r), libc::minor(r))) {
                            disks.push((d, format!("is the boot medium ({dev})")));
                        }
                    }
                }
            }
        }
        // The medium this program runs from.
        if let Ok(m) = fs::metadata(k.proc.join("self/exe")) {
            let d = m.dev();
            let (maj, min) = (libc::major(d), libc::minor(d));
            if maj != 0 {
                for d in whole_disks(sys, (maj, min)) {
                    disks.push((d, "is the medium this program runs from".into()));
                }
            }
        }
        let mut loops = Vec::new();
        if let Ok(rd) = fs::read_dir(sys.join("block")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let node = PathBuf::from(format!("/dev/{name}"));
                if let Some(backing) = loop_backing(sys, &name, &node) {
                    loops.push(LoopDev {
                        path: node.display().to_string(),
                        devno: read_devno(&e.path()),
                        name,
                        backing,
                    });
                }
            }
        }
        Ok(Safety {
            disks,
            loops,
            swap_files,
            sys: sys.to_path_buf(),
        })
    }

    /// Why whole disk `devno` (sysfs name `name`) is in use, if it is.
    fn busy(&self, devno: (u32, u32), name: Option<&str>) -> Option<String> {
        if let Some((_, why)) = self.disks.iter().find(|(d, _)| *d == devno) {
            return Some(why.clone());
        }
        let held = name.map(|n| holders(&self.sys, n)).unwrap_or_default();
        (!held.is_empty()).then(|| {
            format!(
                "is held by {} (device-mapper, md or LVM on top of it)",
                held.join(", ")
            )
        })
    }

    /// Why `t` must not be written, if it must not.
    pub fn check(&self, t: &Target) -> Result<()> {
        let p = t.path.display();
        if t.read_only {
            bail!("{p} is read-only");
        }
        if let Some(devno) = t.devno {
            if let Some(why) = self.busy(devno, t.name.as_deref()) {
                bail!("{p} {why}");
            }
        }
        // What is underneath: a file target's own inode, a loop target's backing file (and the
        // block device it stands for, when a loop device is over a block device), a block
        // device itself (another loop device may be over it).
        let (under, over): (Vec<Identity>, String) = match (&t.inode, &t.backing, t.devno) {
            (Some(i), _, _) => (vec![*i], String::new()),
            (None, Some(b), _) => (
                b.ids.clone(),
                format!("{p} is a loop device over {}, ", b.path),
            ),
            (None, None, Some(d)) => (vec![Identity::Block(d)], String::new()),
            (None, None, None) => return Ok(()),
        };
        for id in &under {
            if let Identity::Block(d) = id {
                if Some(*d) != t.devno {
                    if let Some(why) = self.busy(*d, None) {
                        bail!("{over}a block device that {why}");
                    }
                }
            }
            if let Some((_, swap)) = self.swap_files.iter().find(|(s, _)| s == id) {
                if over.is_empty() {
                    bail!("{p} is in use as swap ({swap}, {})", id.describe());
                }
                bail!(
                    "{over}the same file as the active swap file {swap} ({})",
                    id.describe()
                );
            }
            let Some(l) = self
                .loops
                .iter()
                .find(|l| l.devno != t.devno && l.backing.ids.contains(id))
            else {
                continue;
            };
            let state = l
                .devno
                .and_then(|d| self.busy(d, Some(&l.name)))
                .map(|why| format!(", which {why}"))
                .unwrap_or_default();
            if over.is_empty() && t.kind == Kind::Block {
                bail!("{p} is the backing device of {}{state}", l.path);
            }
            if over.is_empty() && Path::new(&l.backing.path) == t.path {
                bail!("{p} is in use as the backing file of {}{state}", l.path);
            }
            if over.is_empty() {
                bail!(
                    "{p} is the same file ({}) as {}, the backing file of {}{state}",
                    id.describe(),
                    l.backing.path,
                    l.path
                );
            }
            let named = match &t.backing {
                Some(b) if b.path == l.backing.path => String::new(),
                _ => format!(" ({})", l.backing.path),
            };
            bail!(
                "{over}the same file ({}) as the backing file of {}{named}{state}",
                id.describe(),
                l.path
            );
        }
        Ok(())
    }
}

/// Holders of a disk and of its partitions (`dm-0`, `md127`), as sysfs lists them.
fn holders(sys: &Path, name: &str) -> Vec<String> {
    let base = sys.join("block").join(name);
    let mut dirs = vec![base.join("holders")];
    if let Ok(rd) = fs::read_dir(&base) {
        for e in rd.flatten() {
            if e.path().join("partition").exists() {
                dirs.push(e.path().join("holders"));
            }
        }
    }
    let mut out = BTreeSet::new();
    for d in dirs {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                out.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.into_iter().collect()
}

/// The whole disks under a block device: itself, its parent when it is a partition, the disks
/// beneath device-mapper or md devices (their `slaves`) and beneath a loop device over a block
/// device, recursively.
fn whole_disks(sys_root: &Path, devno: (u32, u32)) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![devno];
    let mut seen = BTreeSet::new();
    while let Some(d) = todo.pop() {
        if !seen.insert(d) {
            continue;
        }
        let Ok(sys) = fs::canonicalize(sys_root.join(format!("dev/block/{}:{}", d.0, d.1))) else {
            out.push(d);
            continue;
        };
        let disk = if sys.join("partition").exists() {
            sys.parent().map(Path::to_path_buf).unwrap_or(sys.clone())
        } else {
            sys.clone()
        };
        if let Some(dd) = read_devno(&disk) {
            out.push(dd);
        }
        if let Ok(rd) = fs::read_dir(sys.join("slaves")) {
            for e in rd.flatten() {
                if let Ok(s) = fs::canonicalize(e.path()) {
                    if let Some(sd) = read_devno(&s) {
                        todo.push(sd);
                    }
                }
            }
        }
        let name = disk.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name.filter(|n| n.starts_with("loop")) {
            if let Some(b) = loop_backing(sys_root, &name, Path::new(&format!("/dev/{name}"))) {
                for id in b.ids {
                    if let Identity::Block(bd) = id {
                        todo.push(bd);
                    }
                }
            }
        }
    }
    out
}

fn read_devno(sys: &Path) -> Option<(u32, u32)> {
    let s = fs::read_to_string(sys.join("dev")).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, size: u64) -> Target {
        Target {
            path: PathBuf::from(path),
            kind: Kind::Block,
            size,
            logical_sector: Some(512),
            physical_sector: Some(512),
            name: None,
            devno: None,
            transport: "sata".into(),
            model: String::new(),
            serial: String::new(),
            rotational: false,
            removable: false,
            read_only: false,
            inode: None,
            backing: None,
        }
    }

    #[test]
    fn auto_matches_largest_to_largest() {
        let safety = Safety {
            disks: vec![],
            loops: vec![],
            swap_files: vec![],
            sys: "/nonexistent".into(),
        };
        let got = auto_assign(
            &[100, 500],
            vec![
                disk("/dev/sda", 600),
                disk("/dev/sdb", 200),
                disk("/dev/sdc", 50),
            ],
            &safety,
        )
        .unwrap();
        assert_eq!(got[0].path, PathBuf::from("/dev/sdb"));
        assert_eq!(got[1].path, PathBuf::from("/dev/sda"));
        let err = auto_assign(
            &[100],
            vec![disk("/dev/sda", 600), disk("/dev/sdb", 200)],
            &safety,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/dev/sda") && err.contains("/dev/sdb"),
            "{err}"
        );
        let mut usb = disk("/dev/sdd", 900);
        usb.transport = "usb".into();
        let got = auto_assign(&[100], vec![disk("/dev/sda", 600), usb], &safety).unwrap();
        assert_eq!(got[0].path, PathBuf::from("/dev/sda"));
        assert!(auto_assign(
            &[700, 100],
            vec![disk("/dev/sda", 600), disk("/dev/sdb", 800)],
            &safety
        )
        .is_ok());
        assert!(auto_assign(
            &[700, 700],
            vec![disk("/dev/sda", 600), disk("/dev/sdb", 800)],
            &safety
        )
        .is_err());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }

    /// A made-up machine: sysfs and procfs as the kernel lays them out.
    struct FakeMachine {
        dir: tempfile::TempDir,
    }

    impl FakeMachine {
        fn new() -> FakeMachine {
            let m = FakeMachine {
                dir: tempfile::tempdir().unwrap(),
            };
            for d in ["sys/block", "sys/dev/block", "proc/self"] {
                fs::create_dir_all(m.dir.path().join(d)).unwrap();
            }
            m
        }

        fn kernel(&self) -> Kernel {
            Kernel {
                sys: self.dir.path().join("sys"),
                proc: self.dir.path().join("proc"),
            }
        }

        fn write(&self, rel: &Path, text: &str) {
            let p = self.dir.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("{text}\n")).unwrap();
        }

        fn link(&self, from: &str, to: &Path) {
            std::os::unix::fs::symlink(self.dir.path().join(to), self.dir.path().join(from))
                .unwrap();
        }

        /// A whole disk at `devpath` (below `sys/devices`) with its partitions, each
        /// `(name, minor, holders)`.
        fn disk(
            &self,
            devpath: &str,
            name: &str,
            dev: (u32, u32),
            gib: u64,
            parts: &[(&str, u32, &[&str])],
        ) {
            let d = Path::new("sys/devices")
                .join(devpath)
                .join("block")
                .join(name);
            self.write(&d.join("dev"), &format!("{}:{}", dev.0, dev.1));
            self.write(&d.join("size"), &(gib << 21).to_string());
            self.write(
                &d.join("removable"),
                if devpath.contains("usb") { "1" } else { "0" },
            );
            self.write(&d.join("ro"), "0");
            self.write(&d.join("queue/logical_block_size"), "512");
            self.write(&d.join("device/model"), "FAKE DISK");
            fs::create_dir_all(self.dir.path().join(d.join("holders"))).unwrap();
            self.link(&format!("sys/block/{name}"), &d);
            self.link(&format!("sys/dev/block/{}:{}", dev.0, dev.1), &d);
            for (part, minor, holders) in parts {
                let p = d.join(part);
                self.write(&p.join("partition"), "1");
                self.write(&p.join("dev"), &format!("{}:{minor}", dev.0));
                fs::create_dir_all(self.dir.path().join(p.join("holders"))).unwrap();
                for h in *holders {
                    fs::create_dir_all(self.dir.path().join(p.join("holders").join(h))).unwrap();
                }
                self.link(&format!("sys/dev/block/{}:{minor}", dev.0), &p);
            }
        }

        /// A device-mapper device over `slaves` (sysfs paths of partitions).
        fn dm(&self, name: &str, dev: (u32, u32), slaves: &[&Path]) {
            let d = Path::new("sys/devices/virtual/block").join(name);
            self.write(&d.join("dev"), &format!("{}:{}", dev.0, dev.1));
            self.write(&d.join("size"), "2048");
            for s in slaves {
                fs::create_dir_all(self.dir.path().join(d.join("slaves"))).unwrap();
                let n = s.file_name().unwrap().to_string_lossy().into_owned();
                self.link(&d.join("slaves").join(n).to_string_lossy(), s);
            }
            self.link(&format!("sys/block/{name}"), &d);
            self.link(&format!("sys/dev/block/{}:{}", dev.0, dev.1), &d);
        }
    }

    /// The wrong-disk rules on a machine with its root on sda, a dm device over sdb mounted,
    /// an md array holding sdd, a USB stick and one free NVMe disk: discovery finds the disks
    /// (not dm, loop), the safety scan names why each busy disk is refused, and `--target auto`
    /// picks the only free one.
    #[test]
    fn wrong_disk_rules_on_a_fake_machine() {
        let m = FakeMachine::new();
        let ata = "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0";
        m.disk(
            ata,
            "sda",
            (8, 0),
            100,
            &[("sda1", 1, &[]), ("sda2", 2, &[])],
        );
        let ata2 = "pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0";
        m.disk(ata2, "sdb", (8, 16), 100, &[("sdb1", 17, &["dm-0"])]);
        let ata3 = "pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0";
        m.disk(ata3, "sdd", (8, 48), 100, &[("sdd1", 49, &["md127"])]);
        let usb = "pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0";
        m.disk(usb, "sdc", (8, 32), 200, &[]);
        let nvme = "pci0000:00/0000:00:04.0/nvme/nvme0";
        m.disk(nvme, "nvme0n1", (259, 0), 100, &[]);
        let sdb1 = Path::new("sys/devices").join(ata2).join("block/sdb/sdb1");
        m.dm("dm-0", (253, 0), &[&sdb1]);
        m.write(
            Path::new("proc/self/mountinfo"),
            "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n\
             30 22 253:0 / /srv\\040data rw shared:2 - xfs /dev/mapper/vg-srv rw\n\
             31 22 0:25 / /proc rw - proc proc rw",
        );
        let k = m.kernel();
        let disks = discover_in(&k).unwrap();
        let names: Vec<String> = disks.iter().map(|t| t.describe()).collect();
        assert_eq!(
            names,
            [
                "/dev/nvme0n1 (nvme, FAKE DISK, 100 GiB, 512-byte sectors)",
                "/dev/sda (sata, FAKE DISK, 100 GiB, 512-byte sectors)",
                "/dev/sdb (sata, FAKE DISK, 100 GiB, 512-byte sectors)",
                "/dev/sdc (usb, FAKE DISK, 200 GiB, 512-byte sectors, removable)",
                "/dev/sdd (sata, FAKE DISK, 100 GiB, 512-byte sectors)",
            ]
        );
        let safety = Safety::scan_in(&k).unwrap();
        let why = |name: &str| {
            let t = disks
                .iter()
                .find(|t| t.name.as_deref() == Some(name))
                .unwrap();
            safety.check(t).err().map(|e| e.to_string())
        };
        assert_eq!(
            why("sda").as_deref(),
            Some("/dev/sda holds the running system's root filesystem (mounted on /)")
        );
        assert_eq!(
            why("sdb").as_deref(),
            Some("/dev/sdb is mounted (on /srv data)")
        );
        assert_eq!(
            why("sdd").as_deref(),
            Some("/dev/sdd is held by md127 (device-mapper, md or LVM on top of it)")
        );
        assert_eq!(why("nvme0n1"), None);
        assert_eq!(why("sdc"), None, "removable is auto's rule, not a refusal");
        let got = auto_assign(&[50 << 30], disks.clone(), &safety).unwrap();
        assert_eq!(got[0].path, PathBuf::from("/dev/nvme0n1"));
        let e = auto_assign(&[50 << 30, 50 << 30], disks, &safety)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 source disk(s) but 1 candidate disk(s)"),
            "{e}"
        );
        assert!(e.contains("/dev/sdc: removable"), "{e}");
        assert!(e.contains("/dev/sdb: is mounted (on /srv data)"), "{e}");
    }
}
