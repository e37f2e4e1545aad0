//! Adapting the restored OS to this machine (drivers-inject): after a restore, or alone on
//! already-restored disks (`restorer adapt`, also the way to move a disk image onto new
//! hardware). Image-file targets get loop devices with partition scanning for the time of it.

use crate::cli::{AdaptArgs, AdaptOptions};
use anyhow::{bail, Context, Result};
use drivers_inject::linux::{self, network::OldNic, Options, Report};
use drivers_inject::{Inventory, Volume};
use serde::Serialize;
use std::path::Path;
use std::process::Command;

/// Loop devices attached for image files, detached when dropped.
#[derive(Default)]
struct Loops(Vec<String>);

impl Drop for Loops {
    fn drop(&mut self) {
        for l in self.0.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
    }
}

fn attach(file: &Path, loops: &mut Loops) -> Result<String> {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--partscan"])
        .arg(file)
        .output()
        .context("running losetup")?;
    if !out.status.success() {
        bail!(
            "losetup {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    loops.0.push(dev.clone());
    // Some kernels do not scan a loop device's table (partscan or not): add the partitions
    // with BLKPG (partx) when none appeared.
    let name = dev.trim_start_matches("/dev/");
    let has_parts = |n: &str| {
        std::fs::read_dir(format!("/sys/class/block/{n}"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("partition").exists())
    };
    if !has_parts(name) {
        let _ = Command::new("partx").args(["-a", &dev]).output();
    }
    Ok(dev)
}

/// Where this machine's hardware is read: `/sys`, or `$BMR_SYSFS` (a test seam: a tree shaped
/// like sysfs that describes another machine).
fn sysfs() -> std::path::PathBuf {
    std::env::var_os("BMR_SYSFS").map_or_else(|| "/sys".into(), Into::into)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn is_block(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

fn parse_map(o: &AdaptOptions) -> Result<Vec<(String, String)>> {
    o.nic_map
        .iter()
        .map(|m| {
            // OLD may itself be a MAC (with ':'), so split at the first '=' only.
            m.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("--nic-map {m}: expected OLD=NEW"))
        })
        .collect()
}

/// What the adaptation did: the Linux half's report and each Windows found.
#[derive(Debug, Serialize, Default)]
pub struct Adapted {
    #[serde(flatten)]
    pub linux: Report,
    pub windows: Vec<crate::windows::Outcome>,
}

/// Adapts the system on `targets` (in disk order) to this machine; prints the report unless
/// `json`. `net` is how a `--drivers` URL is fetched.
pub fn adapt(
    targets: &[&Path],
    old_nics: Vec<OldNic>,
    o: &AdaptOptions,
    net: snapshot::store::http::Options,
    dry_run: bool,
    json: bool,
) -> Result<Adapted> {
    let t0 = std::time::Instant::now();
    let inventory = Inventory::scan(&sysfs());
    let inventory_secs = t0.elapsed().as_secs_f64();
    let mut loops = Loops::default();
    let mut disks = Vec::new();
    let mut hardware = true;
    for t in targets {
        if is_block(t) {
            let dev = std::fs::canonicalize(t).with_context(|| format!("{}", t.display()))?;
            let dev = dev.to_string_lossy().into_owned();
            hardware &= !dev.starts_with("/dev/loop");
            disks.push(dev);
        } else {
            hardware = false;
            match attach(t, &mut loops) {
                Ok(d) => disks.push(d),
                // A restore into image files needs no root; adapting them does.
                Err(e) if !is_root() => {
                    let r = Report {
                        lines: vec![format!("skipped: {e:#} (adapting image files needs root)")],
                        ..Default::default()
                    };
                    if !json {
                        print(&r);
                    }
                    return Ok(Adapted {
                        linux: r,
                        ..Default::default()
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut volumes: Vec<Volume> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        volumes.extend(drivers_inject::volumes::probe(i, d)?);
    }
    // The LVs of the restored VGs are volumes too (a root on LVM), active for the time of it.
    let pvs: Vec<String> = volumes
        .iter()
        .filter(|v| v.fstype.as_deref() == Some("LVM2_member"))
        .map(|v| v.device.clone())
        .collect();
    let mut active = crate::lvm::activate(&pvs)?;
    for (name, dev, pv) in &active.lvs {
        let mut v = drivers_inject::volumes::blkid(dev)?;
        v.disk = volumes
            .iter()
            .find(|p| &p.device == pv)
            .map_or(0, |p| p.disk);
        v.lv = Some(name.clone());
        volumes.push(v);
    }
    let base = if Path::new("/run/bmr").is_dir() {
        Path::new("/run/bmr").to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let work = base.join(format!("adapt-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // The controllers the restored disks hang off: a restored Windows must boot from them.
    // Image files may go onto any of this machine's: all of them.
    let boot: Vec<String> = if hardware {
        disks
            .iter()
            .filter_map(|d| inventory.disk(d).and_then(|d| d.controller.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let opts = Options {
        dry_run,
        nic_map: parse_map(o)?,
        old_nics,
        disks,
        hardware,
        work: work.clone(),
    };
    if !json {
        for l in inventory.lines() {
            println!("adapt: this machine: {l}");
        }
    }
    let r = linux::adapt(&volumes, &inventory, &opts);
    let t1 = std::time::Instant::now();
    let mut win_warnings = Vec::new();
    let win = r.as_ref().ok().map(|_| {
        let req = crate::windows::Request {
            inventory: &inventory,
            boot,
            options: o,
            net,
            dry_run,
            work: &work,
        };
        crate::windows::adapt(&volumes, &req, &mut win_warnings)
    });
    let _ = std::fs::remove_dir_all(&work);
    let lvm_warnings = std::mem::take(&mut active.warnings);
    drop(active);
    let mut r = r?;
    let windows = win.transpose()?.unwrap_or_default();
    r.warnings.splice(0..0, lvm_warnings);
    r.warnings.extend(win_warnings);
    for w in &windows {
        r.warnings
            .extend(w.missing.iter().map(|m| format!("windows: {m}")));
    }
    if !windows.is_empty() {
        r.steps.push(linux::Step {
            step: "windows",
            seconds: t1.elapsed().as_secs_f64(),
        });
    }
    r.steps.insert(
        0,
        linux::Step {
            step: "inventory",
            seconds: inventory_secs,
        },
    );
    r.steps.push(linux::Step {
        step: "total",
        seconds: t0.elapsed().as_secs_f64(),
    });
    let a = Adapted { linux: r, windows };
    if !json {
        for w in &a.windows {
            for l in crate::windows::lines(w, dry_run) {
                println!("adapt: {l}");
            }
        }
        print(&a.linux);
    }
    Ok(a)
}

pub fn print(r: &Report) {
    for l in &r.lines {
        println!("adapt: {l}");
    }
    for w in &r.warnings {
        println!("adapt: warning: {w}");
    }
    for c in &r.changes {
        use drivers_inject::changes::Action;
        let verb = match (&c.action, r.dry_run) {
            (Action::Changed, false) => "changed",
            (Action::Created, false) => "created",
            (Action::Removed, false) => "removed",
            (Action::Changed, true) => "would change",
            (Action::Created, true) => "would create",
            (Action::Removed, true) => "would remove",
        };
        println!(
            "adapt: {verb} {} ({}){}",
            c.path,
            c.why,
            c.original
                .as_ref()
                .map(|o| format!("; original kept as {o}"))
                .unwrap_or_default()
        );
    }
    if r.os.is_some() && !r.changed() {
        println!("adapt: no adaptation needed: the restored system fits this machine");
    }
    let steps: Vec<String> = r
        .steps
        .iter()
        .map(|s| format!("{} {:.1} s", s.step, s.seconds))
        .collect();
    println!("adapt: timings: {}", steps.join(", "));
}

/// The source's NICs as the manifest lists them.
pub fn old_nics(m: &snapshot::Manifest) -> Vec<OldNic> {
    m.hardware
        .nics
        .iter()
        .map(|n| OldNic {
            name: Some(n.name.clone()).filter(|s| !s.is_empty()),
            mac: Some(n.mac.to_ascii_lowercase()).filter(|s| !s.is_empty()),
            from: "the snapshot's manifest".into(),
        })
        .collect()
}

/// What the plan says about the adaptation before anything is written.
pub fn plan_lines(m: &snapshot::Manifest) -> Vec<String> {
    let inv = Inventory::scan(&sysfs());
    let mut v: Vec<String> = inv
        .lines()
        .into_iter()
        .map(|l| format!("this machine: {l}"))
        .collect();
    let src: Vec<&str> = m
        .hardware
        .storage
        .iter()
        .map(|d| d.pci_id.as_str())
        .collect();
    let here: Vec<&str> = inv.storage.iter().map(|d| d.pci_id.as_str()).collect();
    if src.is_empty() {
        v.push("source hardware: not in the snapshot (an ingested image); the restored system itself is checked after the write".into());
    } else if src != here {
        v.push(format!(
            "storage controllers differ: source {}, here {}",
            src.join(" "),
            here.join(" ")
        ));
    }
    v.push("after the write the restored OS is adapted to this machine (Linux: drivers in its initramfs, device names, NIC configs, UEFI fallback loader; Windows: boot-start drivers for the storage controllers, NIC packages staged for the first boot; --no-adapt skips it)".into());
    v
}

pub fn run(a: &AdaptArgs) -> Result<()> {
    let targets: Vec<&Path> = a.target.iter().map(Path::new).collect();
    let r = adapt(
        &targets,
        Vec::new(),
        &a.adapt,
        a.net.http_options(),
        a.dry_run,
        a.json,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    if r.linux.os.is_none() && r.windows.is_empty() {
        bail!(
            "no Linux or Windows system found on {}",
            a.target.join(", ")
        );
    }
    Ok(())
}
