//! The image recipe in `buildroot/`, read as data: kernel package, module groups, tools, overlay.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct Recipe {
    /// Debian package of the kernel (a metapackage is resolved to the image it depends on).
    pub kernel_package: String,
    /// Module groups by name (file stem of `modules/*.txt`), in name order.
    pub module_groups: Vec<ModuleGroup>,
    pub tools: Vec<Tool>,
    /// Boot loaders by name (`loaders.txt`).
    pub loaders: Vec<(String, Tool)>,
    /// Files copied into the image as they are.
    pub overlay: PathBuf,
}

pub struct ModuleGroup {
    pub name: String,
    /// Module names; `optional` ones may be missing from the kernel.
    pub modules: Vec<(String, bool)>,
}

/// A program or data file copied from the build host's installed Debian package.
pub struct Tool {
    pub dest: String,
    pub source: PathBuf,
    pub package: String,
}

/// The recipe directory: the flag, $BMR_RECIPE, or `buildroot/` of this source tree.
pub fn locate(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("BMR_RECIPE").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../buildroot"))
}

/// Lines of a recipe file without comments and blank lines, with their line numbers.
fn data_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim().to_string()))
        .filter(|(_, l)| !l.is_empty())
        .collect())
}

impl Recipe {
    pub fn load(dir: &Path) -> Result<Recipe> {
        let kernel_file = dir.join("kernel.txt");
        let mut kernel_package = None;
        for (n, line) in data_lines(&kernel_file)? {
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["package", p] => kernel_package = Some(p.to_string()),
                _ => bail!("{}:{n}: expected `package NAME`", kernel_file.display()),
            }
        }
        let kernel_package = kernel_package
            .with_context(|| format!("{}: no `package` line", kernel_file.display()))?;

        let mut module_groups = Vec::new();
        let mods_dir = dir.join("modules");
        let mut files: Vec<_> = std::fs::read_dir(&mods_dir)
            .with_context(|| format!("reading {}", mods_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        for f in files {
            let name = f.file_stem().unwrap().to_string_lossy().into_owned();
            let modules = data_lines(&f)?
                .into_iter()
                .map(|(_, l)| match l.strip_suffix('?') {
                    Some(m) => (m.to_string(), true),
                    None => (l, false),
                })
                .collect();
            module_groups.push(ModuleGroup { name, modules });
        }

        let tools = read_tools(&dir.join("tools.txt"))?;
        if let Some(t) = tools.iter().find(|t| !t.dest.starts_with('/')) {
            bail!("tools.txt: {} is not an absolute path", t.dest);
        }
        let loaders = read_tools(&dir.join("loaders.txt"))?
            .into_iter()
            .map(|t| (t.dest.clone(), t))
            .collect();
        Ok(Recipe {
            kernel_package,
            module_groups,
            tools,
            loaders,
            overlay: dir.join("overlay"),
        })
    }

    /// The host file of boot loader `name`, or which package to install.
    pub fn loader(&self, name: &str) -> Result<&Path> {
        let (_, t) = self
            .loaders
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("loaders.txt has no `{name}`"))?;
        if !t.source.is_file() {
            bail!(
                "{} ({name}) missing: apt-get install {}",
                t.source.display(),
                t.package
            );
        }
        Ok(&t.source)
    }
}

/// `NAME SOURCE PACKAGE` lines.
fn read_tools(path: &Path) -> Result<Vec<Tool>> {
    let mut tools = Vec::new();
    for (n, line) in data_lines(path)? {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [dest, source, package] => tools.push(Tool {
                dest: dest.to_string(),
                source: source.into(),
                package: package.to_string(),
            }),
            _ => bail!("{}:{n}: expected `NAME SOURCE PACKAGE`", path.display()),
        }
    }
    Ok(tools)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_recipe_loads() {
        let r = Recipe::load(&locate(None)).unwrap();
        assert!(r.kernel_package.starts_with("linux-image-"));
        let storage = r
            .module_groups
            .iter()
            .find(|g| g.name == "storage")
            .unwrap();
        assert!(storage.modules.iter().any(|(m, _)| m == "nvme"));
        assert!(r.tools.iter().any(|t| t.dest == "/bin/busybox"));
    }
}
