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
            let content = format!(
                "{MARK} {why}\n# (dracut reads this on every rebuild, so kernel updates keep them)\nadd_drivers+=\" {} \"\n",
                list.join(" ")
            );
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

/// Makes a new initramfs for `k` with the distribution's tool, keeping the old one as
/// `.pre-restore`, and checks that it now has `must_have`.
pub fn rebuild(
    ctx: &mut Ctx,
    generator: Generator,
    k: &Kernel,
    must_have: &BTreeSet<String>,
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
    match generator {
        Generator::InitramfsTools => {
            let mode = if k.initramfs.is_some() { "-u" } else { "-c" };
            chroot(ctx, &["update-initramfs", mode, "-k", &k.version])?;
        }
        Generator::Dracut => {
            let drivers: Vec<&str> = must_have.iter().map(String::as_str).collect();
            let path = format!("/{image}");
            chroot(
                ctx,
                &[
                    "dracut",
                    "-f",
                    "--kver",
                    &k.version,
                    "--add-drivers",
                    &drivers.join(" "),
                    &path,
                ],
            )?;
        }
        g => bail!("rebuilding an initramfs with {g:?} is not supported"),
    }
    let have = initramfs::read(&ctx.changes.path(&image))?.modules();
    let km = KernelModules::open(&ctx.changes.path(&k.modules))?;
    let still: Vec<&String> = must_have
        .iter()
        .filter(|m| !have.contains(*m) && !km.is_builtin(m))
        .collect();
    if !still.is_empty() {
        bail!(
            "the new initramfs /{image} still lacks {}",
            still
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(t0.elapsed().as_secs_f64())
}
