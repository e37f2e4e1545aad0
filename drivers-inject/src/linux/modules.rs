//! The restored kernel's own module tables (`modules.alias`, `modules.dep`, `modules.softdep`,
//! `modules.builtin`): which modules a device's modalias needs, with what they depend on.

use anyhow::{Context, Result};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

pub struct KernelModules {
    aliases: Vec<(String, String)>,
    deps: HashMap<String, Vec<String>>,
    /// Module name -> its file, relative to the modules directory.
    paths: HashMap<String, String>,
    softdeps: HashMap<String, Vec<String>>,
    builtin: HashSet<String>,
}

/// `kernel/drivers/nvme/host/nvme-core.ko.xz` -> `nvme_core`.
pub fn name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

impl KernelModules {
    /// Reads the tables of `dir` (`/lib/modules/VER` of the restored system).
    pub fn open(dir: &Path) -> Result<KernelModules> {
        let text = |f: &str| -> Result<String> {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("reading {}", dir.join(f).display()))
        };
        let aliases = text("modules.alias")?
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == "alias").then_some(())?;
                Some((w.next()?.to_string(), w.next()?.replace('-', "_")))
            })
            .collect();
        let deps = text("modules.dep")?
            .lines()
            .filter_map(|l| {
                let (m, d) = l.split_once(':')?;
                Some((name_of(m), d.split_whitespace().map(name_of).collect()))
            })
            .collect();
        let paths = text("modules.dep")?
            .lines()
            .filter_map(|l| {
                let (m, _) = l.split_once(':')?;
                Some((name_of(m), m.to_string()))
            })
            .collect();
        let softdeps = text("modules.softdep")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == "softdep").then_some(())?;
                let m = w.next()?.replace('-', "_");
                // Only `pre:` modules are needed before the module works.
                let mut pre = Vec::new();
                let mut in_pre = false;
                for t in w {
                    match t {
                        "pre:" => in_pre = true,
                        "post:" => in_pre = false,
                        t if in_pre => pre.push(t.replace('-', "_")),
                        _ => {}
                    }
                }
                Some((m, pre))
            })
            .collect();
        let builtin = text("modules.builtin")
            .unwrap_or_default()
            .lines()
            .map(name_of)
            .collect();
        Ok(KernelModules {
            aliases,
            deps,
            paths,
            softdeps,
            builtin,
        })
    }

    /// Modules whose alias matches `modalias` (as `modprobe` resolves it).
    pub fn for_modalias(&self, modalias: &str) -> BTreeSet<String> {
        self.aliases
            .iter()
            .filter(|(pat, _)| glob(pat.as_bytes(), modalias.as_bytes()))
            .map(|(_, m)| m.clone())
            .collect()
    }

    pub fn is_builtin(&self, m: &str) -> bool {
        self.builtin.contains(m)
    }

    /// The file of loadable module `m`, relative to the modules directory.
    pub fn path(&self, m: &str) -> Option<&str> {
        self.paths.get(m).map(String::as_str)
    }

    pub fn exists(&self, m: &str) -> bool {
        self.deps.contains_key(m) || self.builtin.contains(m)
    }

    /// `names` with everything they depend on (hard and `pre:` soft dependencies), loadable
    /// modules only: built-in ones need nothing.
    pub fn closure<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo: Vec<String> = names.into_iter().cloned().collect();
        while let Some(m) = todo.pop() {
            if self.builtin.contains(&m) || !self.deps.contains_key(&m) || !out.insert(m.clone()) {
                continue;
            }
            todo.extend(self.deps[&m].iter().cloned());
            if let Some(s) = self.softdeps.get(&m) {
                todo.extend(s.iter().filter(|s| self.deps.contains_key(*s)).cloned());
            }
        }
        out
    }
}

/// fnmatch(3) without flags: `*`, `?`, `[...]` (with `!` or `^` negation and ranges), as
/// modules.alias patterns use.
pub fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, end)) = class(&p[pi..], s[si]) {
                        if matched {
                            pi += end;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == b'[' {
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at the start of `p`: whether `c` matches and the class's length; `None`
/// when the bracket is not closed (then it is a literal `[`).
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_like_modprobe() {
        assert!(glob(
            b"pci:v*d*sv*sd*bc01sc08i02*",
            b"pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"
        ));
        assert!(!glob(
            b"pci:v*d*sv*sd*bc01sc08i02*",
            b"pci:v00001B36d00000010sv00001AF4sd00001100bc01sc06i01"
        ));
        assert!(glob(b"scsi:t-0x00*", b"scsi:t-0x00"));
        assert!(glob(b"virtio:d00000002v*", b"virtio:d00000002v00001AF4"));
        assert!(glob(b"a[0-9]c", b"a5c"));
        assert!(!glob(b"a[!0-9]c", b"a5c"));
        assert!(glob(b"a[c", b"a[c"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"?", b""));
    }

    /// The boot image kernel's real tables (bootimg's cache), when present: the NVMe, AHCI and
    /// virtio controllers QEMU emulates map to the modules the kernel uses for them.
    #[test]
    fn real_modules_alias() {
        let Some(dir) = std::fs::read_dir("/var/cache/bmr/kernel")
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|e| std::fs::read_dir(e.path().join("lib/modules")).ok())
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("modules.alias").exists())
        else {
            eprintln!("SKIPPED: no unpacked kernel under /var/cache/bmr/kernel");
            return;
        };
        let k = KernelModules::open(&dir).unwrap();
        let nvme = k.for_modalias("pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02");
        assert!(nvme.contains("nvme"), "{nvme:?}");
        let ahci = k.for_modalias("pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01");
        assert!(ahci.contains("ahci"), "{ahci:?}");
        assert!(k.for_modalias("scsi:t-0x00").contains("sd_mod"));
        assert!(k
            .for_modalias("virtio:d00000002v00001AF4")
            .contains("virtio_blk"));
        let c = k.closure(&nvme);
        assert!(
            c.contains("nvme_core") || k.is_builtin("nvme_core"),
            "{c:?}"
        );
    }
}
