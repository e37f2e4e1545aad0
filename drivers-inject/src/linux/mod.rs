//! Linux adaptation: find the restored Linux, then, in this order, fix device names, map the
//! NICs, give every kernel an initramfs with the drivers of this machine's boot path (rebuilt
//! by the distribution's own tool in a chroot), and make sure UEFI finds the loader. Every
//! change is listed with its original kept (see [`crate::changes`]).

mod devnames;
mod efi;
mod initrd;
pub mod modules;
mod mount;
pub mod network;
mod segment;
mod system;

use crate::changes::{Change, Changes};
use crate::inventory::Inventory;
use crate::volumes::Volume;
use anyhow::{bail, Context, Result};
use mount::Mounts;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;
pub use system::Generator;

/// What the adaptation needs besides the restored partitions.
#[derive(Clone)]
pub struct Options {
    /// Analyse and report; write nothing (filesystems are mounted read-only).
    pub dry_run: bool,
    /// `OLD=NEW` NIC pairs (names or MACs; NEW also a PCI address) that override the order.
    pub nic_map: Vec<(String, String)>,
    /// The source's NICs when the snapshot's manifest lists them.
    pub old_nics: Vec<network::OldNic>,
    /// Whole-disk device of each target disk, in snapshot order.
    pub disks: Vec<String>,
    /// The targets are this machine's disks (not image files for another machine): adapt the
    /// drivers and NICs to this machine. Device names are fixed either way.
    pub hardware: bool,
    /// An empty directory to mount the restored system under.
    pub work: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub seconds: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct Report {
    /// The machine adapted to.
    pub machine: Option<Inventory>,
    /// `Debian GNU/Linux 12 (bookworm)`; `None` when no Linux was found.
    pub os: Option<String>,
    pub root: Option<String>,
    pub generator: Option<Generator>,
    pub kernels: Vec<initrd::KernelCheck>,
    pub nics: Vec<network::NicMapping>,
    pub lines: Vec<String>,
    pub changes: Vec<Change>,
    pub warnings: Vec<String>,
    pub steps: Vec<Step>,
    pub dry_run: bool,
}

impl Report {
    /// Whether anything was (or, in a dry run, would be) changed.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// The state the steps share: the mounted root and the change list.
pub struct Ctx<'a> {
    pub root: PathBuf,
    pub changes: Changes,
    pub inventory: &'a Inventory,
    pub volumes: &'a [Volume],
    /// The restored kernel command line does not turn predictable names off.
    pub net_ifnames: bool,
    /// A `.link` file was written: the initramfs (whose udev names NICs too) must get it.
    pub pinned_links: bool,
    /// The root or a filesystem the initramfs mounts is on an LVM2 LV: a new initramfs must
    /// activate it (a generator in a chroot cannot always tell).
    pub on_lvm: bool,
    pub warnings: Vec<String>,
    pub dry_run: bool,
}

#[cfg(test)]
impl<'a> Ctx<'a> {
    /// A context over `root` for unit tests: this machine is `inventory` (with `nics`).
    pub fn for_test(root: &Path, inventory: &'a Inventory) -> Ctx<'a> {
        Ctx {
            root: root.to_path_buf(),
            changes: Changes::new(root, false),
            inventory,
            volumes: &[],
            net_ifnames: true,
            pinned_links: false,
            on_lvm: false,
            warnings: vec![],
            dry_run: false,
        }
    }
}

#[cfg(test)]
pub fn test_inventory(nics: Vec<crate::inventory::Nic>) -> Inventory {
    Inventory {
        firmware: "uefi".into(),
        secure_boot: None,
        storage: vec![],
        network: vec![],
        disks: vec![],
        nics,
    }
}

const LINUX_FS: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs"];

/// Finds the volume holding the root filesystem: a Linux filesystem with os-release and an
/// fstab, preferring one whose fstab mounts it as `/`.
fn find_root<'v>(
    volumes: &'v [Volume],
    work: &Path,
    unreadable: &mut Vec<String>,
) -> Result<Option<(&'v Volume, String)>> {
    let mut fallback = None;
    for (i, v) in volumes.iter().enumerate() {
        let Some(t) = v.fstype.as_deref().filter(|t| LINUX_FS.contains(t)) else {
            continue;
        };
        let dir = work.join(format!("probe{i}"));
        let mut m = Mounts::default();
        if let Err(e) = m.mount(&v.device, &dir, t, true) {
            // A type this kernel cannot read is not looked into (said as a warning by the
            // caller only if nothing else is found).
            if !mount::unsupported(&e) {
                unreadable.push(format!("{e:#}"));
            }
            continue;
        }
        let found = system::is_root(&dir)
            .then(|| std::fs::read_to_string(dir.join("etc/fstab")).unwrap_or_default());
        m.unmount_all()?;
        let _ = std::fs::remove_dir(&dir);
        let Some(fstab) = found else { continue };
        let mounts_itself = system::fstab(&fstab)
            .iter()
            .any(|e| e.dir == "/" && system::resolve(&e.spec, volumes) == Some(v));
        if mounts_itself {
            return Ok(Some((v, fstab)));
        }
        fallback.get_or_insert((v, fstab));
    }
    Ok(fallback)
}

/// Adapts the restored system on `volumes` to this machine. The analysis runs first with
/// every filesystem mounted read-only; only when something must change is the system mounted
/// read-write, so a system that fits is left bit for bit as restored.
pub fn adapt(volumes: &[Volume], inventory: &Inventory, opts: &Options) -> Result<Report> {
    let dry = Options {
        dry_run: true,
        ..opts.clone()
    };
    let mut probe = run(volumes, inventory, &dry, &[])?;
    if opts.dry_run || !probe.changed() {
        probe.dry_run = opts.dry_run;
        return Ok(probe);
    }
    // What the read-only pass learnt of the initramfs images still holds: not read twice.
    run(volumes, inventory, opts, &probe.kernels)
}

fn run(
    volumes: &[Volume],
    inventory: &Inventory,
    opts: &Options,
    prior: &[initrd::KernelCheck],
) -> Result<Report> {
    let mut report = Report {
        dry_run: opts.dry_run,
        machine: Some(inventory.clone()),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut unreadable = Vec::new();
    let Some((root_vol, fstab_text)) = find_root(volumes, &opts.work, &mut unreadable)? else {
        if !unreadable.is_empty() {
            // A Linux filesystem we could not look into: not "nothing to do".
            bail!(
                "cannot look for the restored system: {}",
                unreadable.join("; ")
            );
        }
        report
            .lines
            .push("no Linux system found on the restored disks".into());
        return Ok(report);
    };
    let root = opts.work.join("root");
    let mut mounts = Mounts::default();
    let fstype = root_vol.fstype.clone().unwrap_or_default();
    mounts.mount(&root_vol.device, &root, &fstype, opts.dry_run)?;
    report.root = Some(root_vol.device.clone());
    // What the system mounts at boot that the adaptation reads or writes.
    let fstab = system::fstab(&fstab_text);
    let mut esp = None;
    let mut boot_vol = root_vol;
    // The modules the root and /boot need besides the disk's driver: their filesystems', and
    // device-mapper's for an LV (whose tools the distribution's generator adds itself).
    let mut fstypes = vec![fstype.clone()];
    let mut on_lvm = root_vol.lv.is_some();
    for dir in ["/usr", "/var", "/boot", "/boot/efi", "/efi"] {
        let Some(e) = fstab.iter().find(|e| e.dir == dir) else {
            continue;
        };
        let Some(v) = system::resolve(&e.spec, volumes) else {
            report.warnings.push(format!(
                "fstab mounts {} from {}, which is not on the restored disks",
                e.dir, e.spec
            ));
            continue;
        };
        let t = v.fstype.clone().unwrap_or_else(|| e.fstype.clone());
        let is_esp = t == "vfat" && (dir == "/boot/efi" || dir == "/efi");
        match mounts.mount(&v.device, &root.join(&dir[1..]), &t, opts.dry_run) {
            Ok(()) => {}
            // Nothing but the fallback loader needs the ESP.
            Err(e) if is_esp => {
                report
                    .warnings
                    .push(format!("{e:#}: the UEFI fallback loader is not checked"));
                continue;
            }
            Err(e) => return Err(e.context(format!("mounting the restored {dir}"))),
        }
        if dir == "/boot" {
            boot_vol = v;
            fstypes.push(t.clone());
            on_lvm |= v.lv.is_some();
        }
        if is_esp {
            esp = Some(dir[1..].to_string());
        }
    }
    if on_lvm {
        fstypes.push("dm_mod".into());
    }
    let sys = system::describe(&root);
    report.os = Some(sys.name.clone());
    report.generator = Some(sys.generator);
    report.lines.push(format!(
        "restored system: {} on {} ({fstype}); kernels {}; initramfs generator {}",
        sys.name,
        root_vol.device,
        if sys.kernels.is_empty() {
            "none found".to_string()
        } else {
            sys.kernels
                .iter()
                .map(|k| k.version.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
        sys.generator.name()
    ));
    let cmdline_text = std::fs::read_to_string(root.join("etc/default/grub")).unwrap_or_default();
    let mut ctx = Ctx {
        root: root.clone(),
        changes: Changes::new(&root, opts.dry_run),
        inventory,
        volumes,
        net_ifnames: !cmdline_text.contains("net.ifnames=0"),
        pinned_links: false,
        on_lvm,
        warnings: std::mem::take(&mut report.warnings),
        dry_run: opts.dry_run,
    };
    report.steps.push(Step {
        step: "find the restored system",
        seconds: t0.elapsed().as_secs_f64(),
    });

    let result = steps(
        &mut ctx,
        &mut report,
        &sys,
        opts,
        prior,
        root_vol,
        boot_vol,
        &fstypes,
        esp.as_deref(),
    );
    report.warnings.append(&mut ctx.warnings);
    report.changes = std::mem::take(&mut ctx.changes.list);
    if result.is_ok() && !opts.dry_run {
        let record = serde_json::to_string_pretty(&report)?;
        let _ = std::fs::create_dir_all(root.join("var/lib/bmr"));
        std::fs::write(root.join("var/lib/bmr/adapt.json"), record)
            .context("writing /var/lib/bmr/adapt.json")?;
    }
    drop(ctx);
    let unmounted = mounts.unmount_all();
    result?;
    unmounted?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn steps(
    ctx: &mut Ctx,
    report: &mut Report,
    sys: &system::System,
    opts: &Options,
    prior: &[initrd::KernelCheck],
    root_vol: &Volume,
    boot_vol: &Volume,
    fstypes: &[String],
    esp: Option<&str>,
) -> Result<()> {
    // 1. Device names.
    let t = Instant::now();
    device_names(ctx, report, sys)?;
    report.steps.push(Step {
        step: "device names",
        seconds: t.elapsed().as_secs_f64(),
    });
    if !opts.hardware {
        report.lines.push("targets are image files: drivers and NICs are adapted when the image boots on its machine (restorer adapt there)".into());
        return Ok(());
    }
    // 2. NICs.
    let t = Instant::now();
    let mut old = opts.old_nics.clone();
    for n in network::discover(ctx) {
        if !old
            .iter()
            .any(|o| (o.mac.is_some() && o.mac == n.mac) || (o.name.is_some() && o.name == n.name))
        {
            old.push(n);
        }
    }
    let (maps, warnings) = network::map(&old, &ctx.inventory.nics, &opts.nic_map);
    ctx.warnings.extend(warnings);
    let lines = network::apply(ctx, &maps)?;
    if maps.iter().all(|m| m.same) && !maps.is_empty() {
        report.lines.push("network: same NICs as the source".into());
    }
    report
        .lines
        .extend(lines.into_iter().map(|l| format!("network: {l}")));
    report.nics = maps;
    report.steps.push(Step {
        step: "network configs",
        seconds: t.elapsed().as_secs_f64(),
    });

    // 3. Drivers of the boot path in every kernel's initramfs.
    let t = Instant::now();
    let mut aliases: Vec<(String, Option<String>)> = Vec::new();
    for d in [root_vol.disk, boot_vol.disk] {
        let Some(dev) = opts.disks.get(d) else {
            continue;
        };
        let Some(disk) = ctx.inventory.disk(dev) else {
            ctx.warnings.push(format!(
                "{dev}: not in this machine's inventory; its drivers are not checked"
            ));
            continue;
        };
        let bound = |alias: &str| {
            ctx.inventory
                .storage
                .iter()
                .find(|p| p.modalias == alias)
                .and_then(|p| p.driver.clone())
        };
        for a in &disk.modaliases {
            if !aliases.iter().any(|(x, _)| x == a) {
                aliases.push((a.clone(), bound(a)));
            }
        }
    }
    let mut checks = Vec::new();
    for k in &sys.kernels {
        let km = modules::KernelModules::open(&ctx.changes.path(&k.modules))?;
        let need = initrd::needed(&km, &aliases, fstypes);
        let known = prior
            .iter()
            .find(|c| c.version == k.version && c.initramfs == k.initramfs && c.needed == need);
        checks.push(match known {
            Some(c) => c.clone(),
            None => initrd::check(ctx, k, need)?,
        });
    }
    let missing: BTreeSet<String> = checks
        .iter()
        .flat_map(|c| c.missing.iter().cloned())
        .collect();
    for c in &checks {
        report.lines.push(if c.missing.is_empty() {
            format!(
                "initramfs of {}: has the drivers this machine's boot disk needs",
                c.version
            )
        } else {
            format!(
                "initramfs of {}: lacks {} for this machine's boot disk",
                c.version,
                c.missing.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        });
    }
    report.steps.push(Step {
        step: "initramfs check",
        seconds: t.elapsed().as_secs_f64(),
    });
    if !missing.is_empty() || ctx.pinned_links {
        let why = if missing.is_empty() {
            "the NIC names pinned above must hold in the initramfs too".to_string()
        } else {
            format!(
                "drivers for this machine's boot disk ({})",
                missing.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        if !missing.is_empty() {
            initrd::configure(ctx, sys.generator, &missing, &why)?;
        }
        let t = Instant::now();
        let mut env = Mounts::default();
        if !ctx.dry_run {
            chroot_env(&mut env, &ctx.root)?;
        }
        let mut rebuilt = Vec::new();
        for (k, c) in sys.kernels.iter().zip(checks.iter_mut()) {
            if k.initramfs.is_none() && c.missing.is_empty() {
                continue;
            }
            match initrd::rebuild(ctx, sys.generator, k, c, &why) {
                Ok(secs) => {
                    c.rebuilt_seconds = Some(secs);
                    rebuilt.push(format!("{} ({secs:.1} s)", k.version));
                }
                Err(e) if !c.missing.is_empty() => {
                    // The distribution's way failed: the image it left is replaced by the
                    // original, extended with the modules instead.
                    if let Some(img) = &k.initramfs {
                        let keep = ctx.changes.path(&format!("{img}.pre-restore"));
                        if !ctx.dry_run && keep.exists() {
                            std::fs::copy(&keep, ctx.changes.path(img))
                                .with_context(|| format!("putting back /{img}"))?;
                        }
                    }
                    segment::append(ctx, k, &c.missing, &why).with_context(|| {
                        format!("rebuilding the initramfs of {} failed ({e:#}), and extending it", k.version)
                    })?;
                    ctx.warnings.push(format!(
                        "rebuilding the initramfs of {} failed ({e:#}); the modules were appended to it as an extra cpio segment instead",
                        k.version
                    ));
                    rebuilt.push(format!("{} (extended)", k.version));
                }
                Err(e) => ctx.warnings.push(format!(
                    "the initramfs of {} was not rebuilt ({e:#}): it may name NICs differently until the next rebuild",
                    k.version
                )),
            }
        }
        env.unmount_all()?;
        report.lines.push(format!(
            "initramfs {} with {}: {}",
            if ctx.dry_run {
                "would be rebuilt"
            } else {
                "rebuilt"
            },
            sys.generator.name(),
            rebuilt.join(", ")
        ));
        report.steps.push(Step {
            step: "initramfs rebuild",
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    report.kernels = checks;

    // 4. UEFI fallback loader.
    if let (Some(esp), "uefi") = (esp, ctx.inventory.firmware.as_str()) {
        if let Some(l) = efi::fallback(ctx, esp)? {
            report.lines.push(format!("UEFI: {l}"));
        }
    }
    Ok(())
}

/// /dev, /proc, /sys and a private /run inside the restored root, for its tools.
fn chroot_env(m: &mut Mounts, root: &Path) -> Result<()> {
    m.bind(Path::new("/dev"), &root.join("dev"))?;
    m.mount("proc", &root.join("proc"), "proc", false)?;
    m.mount("sysfs", &root.join("sys"), "sysfs", false)?;
    m.mount("tmpfs", &root.join("run"), "tmpfs", false)?;
    if Path::new("/run/udev").is_dir() {
        m.bind(Path::new("/run/udev"), &root.join("run/udev"))?;
    }
    Ok(())
}

fn device_names(ctx: &mut Ctx, report: &mut Report, sys: &system::System) -> Result<()> {
    let why = "kernel device name that no longer names this partition on this machine";
    let mut regen_grub = false;
    for (f, field) in [("etc/fstab", 0), ("etc/crypttab", 1)] {
        let Some(text) = ctx.changes.read(f) else {
            continue;
        };
        let (new, changed, unknown) = devnames::table(&text, field, ctx.volumes);
        for u in unknown {
            ctx.warnings.push(format!(
                "/{f} names {u}, which is not on the restored disks"
            ));
        }
        if !changed.is_empty() {
            report.lines.push(format!("/{f}: {}", changed.join(", ")));
            ctx.changes.write(f, &new, why)?;
        }
    }
    for f in [
        "etc/default/grub",
        "etc/kernel/cmdline",
        "etc/initramfs-tools/conf.d/resume",
    ] {
        let Some(text) = ctx.changes.read(f) else {
            continue;
        };
        let (new, changed) = devnames::cmdline(&text, ctx.volumes);
        if !changed.is_empty() {
            report.lines.push(format!("/{f}: {}", changed.join(", ")));
            ctx.changes.write(f, &new, why)?;
            regen_grub |= f == "etc/default/grub";
        }
    }
    let mut bls: Vec<String> = std::fs::read_dir(ctx.changes.path("boot/loader/entries"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| format!("boot/loader/entries/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".conf"))
        .collect();
    bls.sort();
    for f in bls {
        let Some(text) = ctx.changes.read(&f) else {
            continue;
        };
        let (new, changed) = devnames::cmdline(&text, ctx.volumes);
        if !changed.is_empty() {
            ctx.changes.write(&f, &new, why)?;
        }
    }
    if let Some(cfg) = &sys.grub_cfg {
        let text = ctx.changes.read(cfg).unwrap_or_default();
        let (new, changed) = devnames::cmdline(&text, ctx.volumes);
        if regen_grub || !changed.is_empty() {
            regenerate_grub(ctx, report, cfg, &new)?;
        }
    }
    for f in [
        "etc/lvm/devices/system.devices",
        "etc/blkid.tab",
        "etc/blkid/blkid.tab",
        "etc/lvm/cache/.cache",
    ] {
        ctx.changes.remove(f, "cache of the source's devices")?;
    }
    Ok(())
}

/// Regenerates the GRUB config in the restored system (its own `update-grub` or
/// `grub-mkconfig`); if that cannot run, writes the textually rewritten one and says so.
fn regenerate_grub(ctx: &mut Ctx, report: &mut Report, cfg: &str, rewritten: &str) -> Result<()> {
    let tool: Vec<String> = if ctx.changes.path("usr/sbin/update-grub").exists() {
        vec!["update-grub".into()]
    } else if ctx.changes.path("usr/sbin/grub2-mkconfig").exists() {
        vec!["grub2-mkconfig".into(), "-o".into(), format!("/{cfg}")]
    } else {
        vec!["grub-mkconfig".into(), "-o".into(), format!("/{cfg}")]
    };
    let why = "the GRUB config named a device that moved";
    if ctx.dry_run {
        report
            .lines
            .push(format!("/{cfg}: would be regenerated with {}", tool[0]));
        return ctx.changes.write(cfg, rewritten, why);
    }
    let mut env = Mounts::default();
    chroot_env(&mut env, &ctx.root)?;
    let args: Vec<&str> = tool.iter().map(String::as_str).collect();
    // Keep the original before the tool replaces it.
    let keep = format!("{}/{cfg}", crate::changes::BACKUP_DIR);
    if let Some(p) = ctx.changes.path(&keep).parent() {
        std::fs::create_dir_all(p)?;
    }
    if !ctx.changes.path(&keep).exists() {
        std::fs::copy(ctx.changes.path(cfg), ctx.changes.path(&keep))?;
    }
    match initrd::chroot(ctx, &args) {
        Ok(_) => {
            ctx.changes.list.push(Change {
                path: format!("/{cfg}"),
                action: crate::changes::Action::Changed,
                original: Some(format!("/{keep}")),
                why: format!("{why}: regenerated by {}", tool[0]),
            });
            report
                .lines
                .push(format!("/{cfg}: regenerated by {}", tool[0]));
        }
        Err(e) => {
            ctx.warnings.push(format!(
                "{e:#}; the kernel command line in /{cfg} was rewritten in place"
            ));
            ctx.changes.write(cfg, rewritten, why)?;
        }
    }
    env.unmount_all()
}
