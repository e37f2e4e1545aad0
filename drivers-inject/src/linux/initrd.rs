//! The restored kernels' initramfs images: which boot-path modules each lacks, and a new image
//! made the way the distribution makes it (initramfs-tools or dracut in a chroot of the restored
//! system), with the modules named in its own config so that later kernel updates keep them.

use super::modules::KernelModules;
use super::system::{Generator, Kernel};
use super::Ctx;
use crate::initramfs;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct KernelCheck {
    pub version: String,
    pub initramfs: Option<String>,
    /// Modules this machine's boot path needs (with their dependencies).
    pub needed: BTreeSet<String>,
    /// Of those, what the image lacks.
    pub missing: BTreeSet<String>,
    pub rebuilt_seconds: Option<f64>,
}

/// Modules for the boot path: per modalias on the way to each boot disk, the driver the boot
/// image bound if the restored kernel has it, else every module whose alias matches; plus the
/// root and /boot filesystems' modules; closed over dependencies.
pub fn needed(
    km: &KernelModules,
    modaliases: &[(String, Option<String>)],
    fstypes: &[String],
) -> BTreeSet<String> {
    let mut top = BTreeSet::new();
    for (alias, bound) in modaliases {
        let m = km.for_modalias(alias);
        match bound.as_ref().map(|b| b.replace('-', "_")) {
            Some(b) if m.contains(&b) => {
                top.insert(b);
            }
            _ => top.extend(m),
        }
    }
    for f in fstypes {
        let f = f.replace('-', "_");
        if km.exists(&f) {
            top.insert(f);
        }
    }
    km.closure(&top)
}

pub fn check(ctx: &Ctx, k: &Kernel, needed: BTreeSet<String>) -> Result<KernelCheck> {
    let km = KernelModules::open(&ctx.changes.path(&k.modules))?;
    let have = match &k.initramfs {
        Some(p) => initramfs::read(&ctx.changes.path(p))?.modules(),
        None => BTreeSet::new(),
    };
    let missing = needed
        .iter()
        .filter(|m| !have.contains(*m) && !km.is_builtin(m))
        .cloned()
        .collect();
    Ok(KernelCheck {
        version: k.version.clone(),
        initramfs: k.initramfs.clone(),
        needed,
        missing,
        rebuilt_seconds: None,
    })
}

const MARK: &str = "# Added by the bmr restorer:";

/// Names the modules in the generator's own config (so later rebuilds keep them).
pub fn configure(
    ctx: &mut Ctx,
    generator: Generator,
    modules: &BTreeSet<String>,
    why: &str,
) -> Result<()> {
    match generator {
        Generator::InitramfsTools => {
            let f = "etc/initramfs-tools/modules";
            let old = ctx.changes.read(f).unwrap_or_default();
            let listed: BTreeSet<&str> = old
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|w| !w.starts_with('#'))
                .collect();
            let add: Vec<&String> = modules
                .iter()
                .filter(|m| {
                    !listed.contains(m.as_str()) && !listed.contains(m.replace('_', "-").as_str())
                })
                .collect();
            if add.is_empty() {
                return Ok(());
            }
            let mut new = old.clone();
            if !new.is_empty() && !new.ends_with('\n') {
                new.push('\n');
            }
            new.push_str(&format!("{MARK} {why}\n"));
            for m in add {
                new.push_str(m);
                new.push('\n');
            }
            ctx.changes.write(f, &new, why)
        }
        Generator::Dracut => {
            let list: Vec<&str> = modules.iter().map(String::as_str).collect();
            let mut content = format!(
                "{MARK} {why}\n# (dracut reads this on every rebuild, so kernel updates keep them)\nadd_drivers+=\" {} \"\n",
                list.join(" ")
            );
            if ctx.on_lvm {
                content.push_str("# the root is on LVM\nadd_dracutmodules+=\" lvm \"\n");
            }
            ctx.changes
                .write("etc/dracut.conf.d/90-bmr-restore.conf", &content, why)
        }
        g => bail!("rebuilding an initramfs with {g:?} is not supported"),
    }
}

/// Runs a command inside the restored system (its /dev, /proc, /sys and /run are set up by
/// the caller) and returns its output; on failure, the last lines of it.
pub fn chroot(ctx: &Ctx, args: &[&str]) -> Result<String> {
    let out = Command::new("chroot")
        .arg(&ctx.root)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C")
        .env("HOME", "/root")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .with_context(|| format!("running chroot {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(4).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "`{}` in the restored system failed ({}): {}",
            args.join(" "),
            out.status,
            tail.join(" | ")
        );
    }
    Ok(text)
}

/// Makes a new initramfs for `k` with the distribution's tool (adding `c.missing`, and for
/// dracut the rest of the boot path's modules), keeping the old one as `.pre-restore`, and
/// checks that it has every module of the boot path (`c.needed`), and lvm2 when the root is on
/// an LV.
pub fn rebuild(
    ctx: &mut Ctx,
    generator: Generator,
    k: &Kernel,
    c: &KernelCheck,
    why: &str,
) -> Result<f64> {
    let t0 = Instant::now();
    let image = k
        .initramfs
        .clone()
        .unwrap_or_else(|| format!("boot/initrd.img-{}", k.version));
    ctx.changes.regenerated(&image, why)?;
    if ctx.dry_run {
        return Ok(0.0);
    }
    let km = KernelModules::open(&ctx.changes.path(&k.modules))?;
    match generator {
        Generator::InitramfsTools => {
            let mode = if k.initramfs.is_some() { "-u" } else { "-c" };
            chroot(ctx, &["update-initramfs", mode, "-k", &k.version])?;
        }
        Generator::Dracut => {
            // The whole boot path, not only what was missing: hostonly dracut in a chroot
            // does not see every layer (device-mapper under an LV root).
            let drivers: Vec<&str> = c
                .needed
                .iter()
                .filter(|m| !km.is_builtin(m))
                .map(String::as_str)
                .collect();
            let drivers = drivers.join(" ");
            let path = format!("/{image}");
            let mut args = vec!["dracut", "-f", "--kver", &k.version];
            if !drivers.is_empty() {
                args.extend(["--add-drivers", &drivers]);
            }
            // In a chroot, hostonly dracut may not see that the root is on an LV.
            if ctx.on_lvm {
                args.extend(["--add", "lvm"]);
            }
            args.push(&path);
            chroot(ctx, &args)?;
        }
        g => bail!("rebuilding an initramfs with {g:?} is not supported"),
    }
    let listing = initramfs::read(&ctx.changes.path(&image))?;
    let have = listing.modules();
    let mut still: Vec<&str> = c
        .needed
        .iter()
        .filter(|m| !have.contains(*m) && !km.is_builtin(m))
        .map(String::as_str)
        .collect();
    if ctx.on_lvm && !has_lvm(&listing.files) {
        still.push("lvm (the root is on LVM)");
    }
    if !still.is_empty() {
        bail!("the new initramfs /{image} lacks {}", still.join(", "));
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Whether an initramfs holds lvm2's tool (dracut, initramfs-tools: `[usr/]sbin/lvm`).
fn has_lvm(files: &[String]) -> bool {
    files.iter().any(|f| {
        let f = f.trim_start_matches("./").trim_start_matches('/');
        f == "sbin/lvm" || f == "usr/sbin/lvm"
    })
}

#[cfg(test)]
mod tests {
    use super::has_lvm;

    #[test]
    fn lvm_in_an_initramfs_listing() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(has_lvm(&l(&["usr/bin/udevadm", "usr/sbin/lvm"])));
        assert!(has_lvm(&l(&["./sbin/lvm"])));
        assert!(!has_lvm(&l(&["usr/sbin/lvmetad", "etc/lvm/lvm.conf"])));
    }
}
