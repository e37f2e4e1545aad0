//! Kernel modules for the devices present: every `modalias` under /sys/devices is matched against
//! the image's modules.alias (glob patterns), the matches are loaded with their dependencies from
//! modules.dep (finit_module), and the walk repeats until no new device shows up, since a loaded
//! controller driver (xhci, ahci, virtio) brings new devices that need drivers of their own.

use anyhow::{Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Modules {
    dir: PathBuf,
    aliases: Vec<(String, String)>,
    deps: HashMap<String, (String, Vec<String>)>,
    /// Failures by module, for the log (ENODEV from a driver without its hardware is normal).
    pub failed: Vec<(String, String)>,
    pub loaded: Vec<String>,
}

fn norm(s: &str) -> String {
    s.replace('-', "_")
}

fn name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    norm(base.split(".ko").next().unwrap_or(base))
}

impl Modules {
    pub fn open() -> Result<Modules> {
        let release = uname_release();
        let dir = Path::new("/lib/modules").join(&release);
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("reading {}", dir.join(f).display()))
        };
        let aliases = read("modules.alias")?
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("alias")).then_some(())?;
                Some((w.next()?.to_string(), norm(w.next()?)))
            })
            .collect();
        let deps = read("modules.dep")?
            .lines()
            .filter_map(|l| {
                let (m, d) = l.split_once(':')?;
                let deps = d.split_whitespace().map(name_of).collect();
                Some((name_of(m), (m.to_string(), deps)))
            })
            .collect();
        Ok(Modules {
            dir,
            aliases,
            deps,
            failed: Vec::new(),
            loaded: Vec::new(),
        })
    }

    /// Modules whose alias patterns match `modalias`.
    fn matching(&self, modalias: &str) -> Vec<String> {
        self.aliases
            .iter()
            .filter(|(pat, _)| glob(pat.as_bytes(), modalias.as_bytes()))
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Loads `name` after its dependencies. Already loaded is fine.
    pub fn load(&mut self, name: &str) -> bool {
        let name = norm(name);
        if is_loaded(&name) {
            return true;
        }
        let Some((path, deps)) = self.deps.get(&name).cloned() else {
            return false;
        };
        // modules.dep lists the deepest dependency last.
        for d in deps.iter().rev() {
            self.load(d);
        }
        match finit_module(&self.dir.join(&path)) {
            Ok(()) => {
                self.loaded.push(name);
                true
            }
            Err(e) => {
                self.failed.push((name, e.to_string()));
                false
            }
        }
    }

    /// Loads drivers until the set of devices stops changing (or `limit` passes).
    pub fn load_for_devices(&mut self, limit: Duration) -> usize {
        let t0 = Instant::now();
        let mut seen = BTreeSet::new();
        let mut quiet_since = Instant::now();
        while t0.elapsed() < limit {
            let aliases = modaliases();
            let new: Vec<String> = aliases.difference(&seen).cloned().collect();
            if new.is_empty() {
                // Settled when nothing new appeared for a while (USB enumeration takes ~1 s).
                if quiet_since.elapsed() > Duration::from_millis(1500) {
                    break;
                }
            } else {
                quiet_since = Instant::now();
                for a in &new {
                    for m in self.matching(a) {
                        self.load(&m);
                    }
                }
                seen.extend(new);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.loaded.len()
    }
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module")
        .join(name)
        .join("initstate")
        .exists()
}

fn finit_module(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    // MODULE_INIT_COMPRESSED_FILE: let the kernel decompress.
    let flags = if compressed { 4 } else { 0 };
    match rustix::system::finit_module(&f, c"", flags) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Every modalias under /sys/devices (not following symlinks: the tree has none that matter).
fn modaliases() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![PathBuf::from("/sys/devices")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if e.file_name() == "modalias" {
                if let Ok(s) = std::fs::read_to_string(e.path()) {
                    let s = s.trim();
                    if !s.is_empty() {
                        out.insert(s.to_string());
                    }
                }
            }
        }
    }
    out
}

/// fnmatch(3) without flags: `*`, `?` and `[...]` classes (with ranges and `!`/`^`).
pub fn glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| glob(&pat[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && glob(&pat[1..], &s[1..]),
        Some(b'[') => {
            let Some(c) = s.first() else { return false };
            let mut i = 1;
            let negate = matches!(pat.get(1), Some(b'!' | b'^'));
            if negate {
                i += 1;
            }
            let mut hit = false;
            let mut first = true;
            while i < pat.len() && (first || pat[i] != b']') {
                first = false;
                if i + 2 < pat.len() && pat[i + 1] == b'-' && pat[i + 2] != b']' {
                    hit |= (pat[i]..=pat[i + 2]).contains(c);
                    i += 3;
                } else {
                    hit |= pat[i] == *c;
                    i += 1;
                }
            }
            if i >= pat.len() {
                return pat[0] == *c && glob(&pat[1..], &s[1..]); // unterminated: literal '['
            }
            hit != negate && glob(&pat[i + 1..], &s[1..])
        }
        Some(p) => s.first() == Some(p) && glob(&pat[1..], &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn modalias_globs() {
        let m = |p: &str, s: &str| glob(p.as_bytes(), s.as_bytes());
        assert!(m(
            "pci:v*d*sv*sd*bc01sc08i02*",
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"
        ));
        assert!(!m(
            "pci:v*d*sv*sd*bc01sc08i02*",
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc06i01"
        ));
        assert!(m("virtio:d00000002v*", "virtio:d00000002v00001AF4"));
        assert!(m(
            "usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*",
            "usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00"
        ));
        assert!(m("acpi*:PNP0[Cc]0[Aa]:*", "acpi:PNP0C0A:"));
        assert!(!m("a[!b]c", "abc"));
        assert!(m("a[!b]c", "axc"));
        assert!(m("x[0-9]", "x7"));
    }
}
