//! The initramfs: the restorer as /init's program, the recipe's kernel modules (dependencies
//! from modules.dep, then `depmod` for the image), tools with their libraries, the overlay, the
//! appliance key; one deterministic newc cpio, compressed.

use crate::cpio;
use crate::kernel::Kernel;
use crate::recipe::Recipe;
use crate::run::run;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Inputs<'a> {
    pub recipe: &'a Recipe,
    pub kernel: &'a Kernel,
    pub restorer: &'a Path,
    pub pubkey: Option<&'a Path>,
    pub ca: Option<&'a Path>,
    pub compress: &'a str,
}

#[derive(serde::Serialize)]
pub struct Initrd {
    pub path: PathBuf,
    pub bytes: u64,
    pub uncompressed_bytes: u64,
    pub modules: usize,
    pub restorer_static: bool,
}

/// `/init`: hands over to the restorer; if that cannot even start, a shell rather than a panic.
const INIT: &str = "#!/bin/sh\n\
exec /bin/restorer init\n\
echo 'restorer: cannot start /bin/restorer; rescue shell' > /dev/console\n\
exec /bin/sh </dev/console >/dev/console 2>&1\n";

pub fn build(inp: &Inputs, work: &Path, out: &Path) -> Result<Initrd> {
    let root = work.join("initrd-root");
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc/bmr", "dev", "proc", "sys", "run", "tmp",
        "root", "mnt", "lib64", "var",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    write(&root, "init", INIT.as_bytes(), 0o755)?;

    let restorer_static = !elf_is_dynamic(inp.restorer)?;
    copy_program(&root, inp.restorer, "/bin/restorer")?;
    // A debug build carries ~70 MiB of DWARF; symbol names stay for backtraces.
    if crate::run::which("strip").is_some() {
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg(root.join("bin/restorer")))?;
    }

    for t in &inp.recipe.tools {
        if !t.source.exists() {
            bail!(
                "{} missing on this build host: apt-get install {}",
                t.source.display(),
                t.package
            );
        }
        copy_program(&root, &t.source, &t.dest)?;
    }
    busybox_links(&root)?;
    copy_tree(&inp.recipe.overlay, &root)?;
    if let Some(k) = inp.pubkey {
        let key = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
        write(&root, "etc/bmr/appliance.pub", &key, 0o644)?;
    }
    if let Some(ca) = inp.ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            bail!("--ca {}: no PEM certificate in it", ca.display());
        }
        write(&root, "etc/bmr/appliance-ca.pem", &pem, 0o644)?;
    }
    let modules = install_modules(inp.recipe, inp.kernel, &root)?;
    let info = serde_json::json!({
        "kernel": inp.kernel.release,
        "kernel_package": inp.kernel.package,
        "modules": modules,
        "restorer_static": restorer_static,
        "module_groups": inp.recipe.module_groups.iter().map(|g| &g.name).collect::<Vec<_>>(),
    });
    write(
        &root,
        "etc/bmr/image.json",
        serde_json::to_string_pretty(&info)?.as_bytes(),
        0o644,
    )?;

    let raw = work.join("initrd.cpio");
    let f = std::fs::File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
    let mut w = cpio::Writer::new(std::io::BufWriter::new(f), source_date_epoch());
    w.tree(&root)?;
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.finish()?;
    let uncompressed_bytes = std::fs::metadata(&raw)?.len();
    compress(&raw, out, inp.compress)?;
    std::fs::remove_file(&raw)?;
    std::fs::remove_dir_all(&root)?;
    Ok(Initrd {
        path: out.to_path_buf(),
        bytes: std::fs::metadata(out)?.len(),
        uncompressed_bytes,
        modules,
        restorer_static,
    })
}

/// The cpio's mtime: $SOURCE_DATE_EPOCH for reproducible builds, else 0.
fn source_date_epoch() -> u32 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn compress(raw: &Path, out: &Path, how: &str) -> Result<()> {
    match how {
        // The kernel's xz decoder wants CRC32 checks, not xz's default CRC64.
        "xz" => {
            let f = std::fs::File::create(out)?;
            let st = Command::new("xz")
                .args(["--check=crc32", "-9", "-T0", "-c"])
                .arg(raw)
                .stdout(f)
                .status()
                .context("running xz")?;
            if !st.success() {
                bail!("xz failed: {st}");
            }
        }
        _ => {
            run(Command::new("zstd")
                .args(["-q", "-f", "-15", "-T0", "-o"])
                .arg(out)
                .arg(raw))?;
        }
    }
    Ok(())
}

fn write(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let p = root.join(rel.trim_start_matches('/'));
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Whether an ELF file has a program interpreter (is dynamically linked).
pub fn elf_is_dynamic(path: &Path) -> Result<bool> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        bail!("{}: not a 64-bit ELF executable", path.display());
    }
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16at(0x36), u16at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > b.len() {
            bail!("{}: truncated program headers", path.display());
        }
        if u32::from_le_bytes(b[o..o + 4].try_into()?) == 3 {
            return Ok(true); // PT_INTERP
        }
    }
    Ok(false)
}

/// Copies a program (or data file) into the image, with every library `ldd` names for it.
fn copy_program(root: &Path, src: &Path, dest: &str) -> Result<()> {
    let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    let mode = std::fs::metadata(src)?.permissions().mode() & 0o7777;
    write(root, dest, &data, mode)?;
    if !data.starts_with(b"\x7fELF") || !elf_is_dynamic(src)? {
        return Ok(());
    }
    for lib in ldd(src)? {
        let rel = lib.to_string_lossy().into_owned();
        if !root.join(rel.trim_start_matches('/')).exists() {
            let bytes =
                std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            write(root, &rel, &bytes, 0o755)?;
        }
    }
    Ok(())
}

/// The libraries (and the loader) a dynamic program needs, by the paths `ldd` prints.
fn ldd(prog: &Path) -> Result<Vec<PathBuf>> {
    let out = run(Command::new("ldd").arg(prog))?;
    Ok(parse_ldd(&out))
}

fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, r)) => r.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A symlink to /bin/busybox for every applet whose path the tools do not already fill.
fn busybox_links(root: &Path) -> Result<()> {
    let list = run(Command::new(root.join("bin/busybox")).arg("--list-full"))?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let p = root.join(applet);
        let name = p.file_name().unwrap_or_default();
        let taken = ["bin", "sbin", "usr/bin", "usr/sbin"]
            .iter()
            .any(|d| root.join(d).join(name).exists());
        if !taken {
            std::fs::create_dir_all(p.parent().unwrap())?;
            std::os::unix::fs::symlink("/bin/busybox", &p)?;
        }
    }
    Ok(())
}

fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let (s, d) = (e.path(), dest.join(e.file_name()));
        let ft = e.file_type()?;
        if ft.is_dir() {
            std::fs::create_dir_all(&d)?;
            copy_tree(&s, &d)?;
        } else if ft.is_symlink() {
            let _ = std::fs::remove_file(&d);
            std::os::unix::fs::symlink(std::fs::read_link(&s)?, &d)?;
        } else {
            std::fs::copy(&s, &d).with_context(|| format!("copying {}", s.display()))?;
        }
    }
    Ok(())
}

/// Module name as the kernel spells it (`-` and `_` are the same).
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    norm(base.split(".ko").next().unwrap_or(base))
}

/// Dependencies of every module (modules.dep) plus soft dependencies (modules.softdep).
struct ModuleIndex {
    path: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    fn load(dir: &Path) -> Result<Self> {
        let read = |f: &str| -> Result<String> {
            let p = dir.join(f);
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let (mut path, mut deps) = (BTreeMap::new(), BTreeMap::new());
        for line in read("modules.dep")?.lines() {
            let Some((m, d)) = line.split_once(':') else {
                continue;
            };
            let name = module_name(m);
            path.insert(name.clone(), m.to_string());
            deps.insert(
                name,
                d.split_whitespace().map(module_name).collect::<Vec<_>>(),
            );
        }
        for line in read("modules.softdep").unwrap_or_default().lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("softdep") {
                continue;
            }
            let Some(m) = w.next() else { continue };
            let soft: Vec<String> = w.filter(|x| !x.ends_with(':')).map(String::from).collect();
            deps.entry(norm(m)).or_default().extend(soft);
        }
        // Soft dependencies name aliases (`crypto-crc32c`): resolve the plain ones.
        let mut alias: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in read("modules.alias")?.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let ["alias", a, m] = w[..] {
                if !a.contains(['*', '?', '[']) {
                    alias.entry(a.to_string()).or_default().push(norm(m));
                }
            }
        }
        for d in deps.values_mut() {
            let resolved: Vec<String> = d
                .iter()
                .flat_map(|n| match alias.get(n) {
                    Some(ms) if !path.contains_key(n) => ms.clone(),
                    _ => vec![n.clone()],
                })
                .collect();
            *d = resolved;
        }
        let builtin = read("modules.builtin")?.lines().map(module_name).collect();
        Ok(ModuleIndex {
            path,
            deps,
            builtin,
        })
    }

    /// Adds `name` and everything it needs to `out`.
    fn close(&self, name: &str, out: &mut BTreeSet<String>) {
        if self.path.contains_key(name) && out.insert(name.to_string()) {
            for d in self.deps.get(name).into_iter().flatten() {
                self.close(d, out);
            }
        }
    }
}

/// Copies the recipe's module groups (decompressed: the initrd compresses better as a whole, and
/// the appended signature stays valid) and runs `depmod` for the image.
fn install_modules(recipe: &Recipe, k: &Kernel, root: &Path) -> Result<usize> {
    let idx = ModuleIndex::load(&k.modules)?;
    let mut wanted = BTreeSet::new();
    for g in &recipe.module_groups {
        for (m, optional) in &g.modules {
            let m = norm(m);
            if idx.path.contains_key(&m) {
                idx.close(&m, &mut wanted);
            } else if !idx.builtin.contains(&m) && !optional {
                bail!(
                    "module {m} (group {}) is neither a module nor built into kernel {}",
                    g.name,
                    k.release
                );
            }
        }
    }
    let dest = root.join("lib/modules").join(&k.release);
    std::fs::create_dir_all(&dest)?;
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        std::fs::copy(k.modules.join(f), dest.join(f)).with_context(|| format!("copying {f}"))?;
    }
    for m in &wanted {
        let rel = &idx.path[m];
        let src = k.modules.join(rel);
        let (rel_out, data) = match rel.strip_suffix(".xz") {
            Some(plain) => (plain, run_bytes(Command::new("xz").arg("-dc").arg(&src))?),
            None => (rel.as_str(), std::fs::read(&src)?),
        };
        let p = dest.join(rel_out);
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
    }
    run(Command::new("depmod").arg("-b").arg(root).arg(&k.release))?;
    Ok(wanted.len())
}

fn run_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libext2fs.so.2"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn module_names_normalise() {
        assert_eq!(
            module_name("kernel/drivers/block/xen-blkfront.ko.xz"),
            "xen_blkfront"
        );
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko"), "ext4");
    }
}
