//! `bootimg build`: kernel + initrd, then the requested media around them.

use crate::bootcfg;
use crate::cli::BuildArgs;
use crate::initrd::{self, elf_is_dynamic};
use crate::kernel::{self, Kernel};
use crate::recipe::{self, Recipe};
use crate::{iso, pxe, usb};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Kernel plus initrd must fit in this (issue 4): small enough for slow TFTP and BMC media.
const MAX_BOOT_BYTES: u64 = 80 << 20;

#[derive(serde::Serialize)]
struct Summary {
    kernel: Kernel,
    restorer: PathBuf,
    initrd: initrd::Initrd,
    vmlinuz_bytes: u64,
    cmdline: String,
    outputs: Vec<(String, u64)>,
    seconds: f64,
}

pub fn run(a: &BuildArgs) -> Result<()> {
    let t0 = Instant::now();
    // mtools refuses image files whose size is not a multiple of its idea of the geometry.
    std::env::set_var("MTOOLS_SKIP_CHECK", "1");
    let recipe = Recipe::load(&recipe::locate(a.cache.recipe.as_deref()))?;
    let restorer = match &a.restorer {
        Some(r) => r.clone(),
        None => default_restorer()?,
    };
    let kernel = kernel::fetch(&recipe, &kernel::cache_dir(&a.cache))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let work = a.out.join(".work");
    std::fs::create_dir_all(&work)?;

    let initrd_path = work.join("initrd.img");
    let initrd = initrd::build(
        &initrd::Inputs {
            recipe: &recipe,
            kernel: &kernel,
            restorer: &restorer,
            pubkey: a.pubkey.as_deref(),
            ca: a.ca.as_deref(),
            compress: &a.compress,
        },
        &work,
        &initrd_path,
    )?;
    let vmlinuz_bytes = std::fs::metadata(&kernel.vmlinuz)?.len();
    if vmlinuz_bytes + initrd.bytes > MAX_BOOT_BYTES {
        bail!(
            "kernel {} + initrd {} bytes exceed the {} MiB budget",
            vmlinuz_bytes,
            initrd.bytes,
            MAX_BOOT_BYTES >> 20
        );
    }
    let cmdline = bootcfg::kernel_cmdline(a.appliance_url.as_deref(), &a.cmdline);
    let mut outputs = Vec::new();
    for f in &a.format {
        let (name, path) = match f.as_str() {
            "pxe" => {
                let d = a.out.join("pxe");
                pxe::write(&recipe, &d, &kernel.vmlinuz, &initrd_path, &cmdline)?;
                ("pxe", d.join("initrd.img"))
            }
            "usb" => {
                let p = a.out.join("usb.img");
                usb::write(&recipe, &p, &kernel.vmlinuz, &initrd_path, &cmdline)?;
                ("usb", p)
            }
            "iso" => {
                let p = a.out.join("restore.iso");
                iso::write(&recipe, &work, &p, &kernel.vmlinuz, &initrd_path, &cmdline)?;
                ("iso", p)
            }
            other => bail!("unknown format {other}"),
        };
        let bytes = if name == "pxe" {
            vmlinuz_bytes + initrd.bytes
        } else {
            std::fs::metadata(&path)?.len()
        };
        let label = if name == "pxe" {
            format!(
                "{}/ (vmlinuz + initrd.img, boot.ipxe, pxelinux, GRUB)",
                a.out.join("pxe").display()
            )
        } else {
            path.display().to_string()
        };
        outputs.push((label, bytes));
    }
    std::fs::remove_dir_all(&work)?;

    let s = Summary {
        kernel,
        restorer,
        initrd,
        vmlinuz_bytes,
        cmdline,
        outputs,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!("kernel    {} ({})", s.kernel.release, s.kernel.package);
        println!(
            "restorer  {} ({})",
            s.restorer.display(),
            if s.initrd.restorer_static {
                "static"
            } else {
                "dynamic, libraries copied"
            }
        );
        println!("vmlinuz   {:7.1} MiB", mib(s.vmlinuz_bytes));
        println!(
            "initrd    {:7.1} MiB ({:.1} MiB uncompressed, {} modules)",
            mib(s.initrd.bytes),
            mib(s.initrd.uncompressed_bytes),
            s.initrd.modules
        );
        println!(
            "boot size {:7.1} MiB (kernel + initrd, limit {} MiB)",
            mib(s.vmlinuz_bytes + s.initrd.bytes),
            MAX_BOOT_BYTES >> 20
        );
        for (p, b) in &s.outputs {
            println!("wrote     {p} ({:.1} MiB)", mib(*b));
        }
        println!("cmdline   {}", s.cmdline);
        println!("built in {:.1} s", s.seconds);
    }
    Ok(())
}

/// The restorer to embed when `--restorer` is not given: $BMR_RESTORER, else the static musl
/// release build of this source tree, else the restorer next to this bootimg binary.
fn default_restorer() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BMR_RESTORER") {
        return Ok(p.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let mut candidates = vec![target.join("x86_64-unknown-linux-musl/release/restorer")];
    if let Ok(exe) = std::env::current_exe() {
        candidates.push(exe.with_file_name("restorer"));
    }
    for c in &candidates {
        if c.is_file() {
            if elf_is_dynamic(c)? {
                eprintln!(
                    "bootimg: {} is dynamically linked; its libraries are copied (scripts/build-restorer builds a static one)",
                    c.display()
                );
            }
            return Ok(c.clone());
        }
    }
    bail!(
        "no restorer binary (looked at {}): pass --restorer or run scripts/build-restorer",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}
