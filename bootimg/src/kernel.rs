//! The kernel: Debian's signed image package, downloaded with `apt-get download`, unpacked into
//! the cache with `dpkg-deb -x`, and indexed once with `depmod` so module dependencies can be
//! resolved from `modules.dep`.

use crate::cli::{CacheArgs, FetchArgs};
use crate::recipe::{self, Recipe};
use crate::run::{self as sh, require_tools};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// An unpacked kernel package.
#[derive(serde::Serialize)]
pub struct Kernel {
    pub package: String,
    /// `uname -r` of the kernel, the directory name under lib/modules.
    pub release: String,
    /// Signed EFI-stub kernel image.
    pub vmlinuz: PathBuf,
    /// lib/modules/<release> of the unpacked package, with modules.dep.
    pub modules: PathBuf,
}

pub fn cache_dir(a: &CacheArgs) -> PathBuf {
    a.cache
        .clone()
        .or_else(|| std::env::var_os("BMR_CACHE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/cache/bmr"))
}

pub fn run(a: &FetchArgs) -> Result<()> {
    let recipe = Recipe::load(&recipe::locate(a.cache.recipe.as_deref()))?;
    let k = fetch(&recipe, &cache_dir(&a.cache))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&k)?);
    } else {
        println!("kernel {} ({})", k.release, k.package);
        println!("vmlinuz {}", k.vmlinuz.display());
        println!("modules {}", k.modules.display());
    }
    Ok(())
}

/// Returns the recipe's kernel, downloading and unpacking it unless the cache has it.
pub fn fetch(recipe: &Recipe, cache: &Path) -> Result<Kernel> {
    require_tools(&[("apt-get", "apt"), ("dpkg-deb", "dpkg"), ("depmod", "kmod")])?;
    let kernels = cache.join("kernel");
    let package = match resolve_package(&recipe.kernel_package).or_else(|e| {
        // A machine whose package lists predate the kernel series (or were never fetched).
        if is_root() {
            eprintln!("bootimg: {e:#}; running apt-get update");
            sh::run(Command::new("apt-get").args(["update", "-qq"]))?;
            resolve_package(&recipe.kernel_package)
        } else {
            Err(e)
        }
    }) {
        Ok(p) => p,
        Err(e) => {
            // Offline: the newest kernel already unpacked will do.
            let cached = newest_cached(&kernels)
                .with_context(|| format!("resolving {}: {e:#}", recipe.kernel_package))?;
            eprintln!(
                "bootimg: cannot resolve {} ({e:#}); using cached {cached}",
                recipe.kernel_package
            );
            cached
        }
    };
    let dir = kernels.join(&package);
    if !dir.join(".complete").exists() {
        unpack(&package, cache, &dir)?;
    }
    open(&package, &dir)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn newest_cached(kernels: &Path) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(kernels)
        .with_context(|| format!("reading {}", kernels.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(".complete").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by_key(|n| version_key(n));
    names.pop().context("no kernel in the cache")
}

/// Numeric parts of a name, so 6.12.117 sorts after 6.12.99.
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Follows metapackages (`linux-image-6.12-amd64` depends on `linux-image-6.12.N+deb12-amd64`)
/// down to the package holding the image.
fn resolve_package(name: &str) -> Result<String> {
    let mut name = name.to_string();
    for _ in 0..4 {
        let show = sh::run(Command::new("apt-cache").args(["show", "--no-all-versions", &name]))?;
        if show.trim().is_empty() {
            bail!("apt-cache knows no package {name} (run apt-get update)");
        }
        let depends = show
            .lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .unwrap_or("");
        let next = depends
            .split(',')
            .map(|d| d.split_whitespace().next().unwrap_or(""))
            .find(|d| d.starts_with("linux-image-"));
        match next {
            Some(n) => name = n.to_string(),
            None => return Ok(name),
        }
    }
    bail!("{name}: metapackage chain too long")
}

fn unpack(package: &str, cache: &Path, dir: &Path) -> Result<()> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = find_deb(&debs, package)?;
    let deb = match deb {
        Some(d) => d,
        None => {
            eprintln!("bootimg: downloading {package}");
            sh::run(
                Command::new("apt-get")
                    .args(["download", "-q", package])
                    .current_dir(&debs),
            )?;
            find_deb(&debs, package)?.context("apt-get download left no .deb")?
        }
    };
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    eprintln!("bootimg: unpacking {}", deb.display());
    sh::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let release = module_release(&tmp)?;
    sh::run(Command::new("depmod").arg("-b").arg(&tmp).arg(&release))?;
    std::fs::write(tmp.join(".complete"), package)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming to {}", dir.display()))?;
    Ok(())
}

fn find_deb(debs: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    Ok(std::fs::read_dir(debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&prefix) && n.ends_with(".deb")
        }))
}

fn module_release(root: &Path) -> Result<String> {
    let mods = root.join("lib/modules");
    let mut rel: Vec<_> = std::fs::read_dir(&mods)
        .with_context(|| format!("{}: the package has no modules", mods.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    rel.sort();
    rel.pop().context("no lib/modules/<release>")
}

fn open(package: &str, dir: &Path) -> Result<Kernel> {
    let release = module_release(dir)?;
    let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} missing", vmlinuz.display());
    }
    Ok(Kernel {
        package: package.to_string(),
        modules: dir.join("lib/modules").join(&release),
        release,
        vmlinuz,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_sort_numerically() {
        let mut v = [
            "linux-image-6.12.99+deb12-amd64",
            "linux-image-6.12.117+deb12-amd64",
        ];
        v.sort_by_key(|s| super::version_key(s));
        assert_eq!(v[1], "linux-image-6.12.117+deb12-amd64");
    }
}
