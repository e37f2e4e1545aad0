//! A restored Windows volume, offline: its `SYSTEM` and `SOFTWARE` hives (found
//! case-insensitively: an ntfs-3g mount is case-sensitive on lookup), the Windows version and
//! architecture they describe, the control set Windows boots (`Select\Current`, never assumed
//! to be `ControlSet001`), and the refusals that keep an edit from being lost or from
//! corrupting the system: a hive whose transaction logs are dirty, and a hibernated or
//! Fast-Startup volume (both overridable with `force`).

use super::hive::Hive;
use super::repo::WindowsTarget;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const SYSTEM_PREFIX: &str = "HKEY_LOCAL_MACHINE\\SYSTEM";
pub const SOFTWARE_PREFIX: &str = "HKEY_LOCAL_MACHINE\\SOFTWARE";

/// `rel` (`/`-separated) below `base`, each component matched case-insensitively; None when a
/// component is missing. An exact match wins over a case-insensitive one.
pub fn find_ci(base: &Path, rel: &str) -> Result<Option<PathBuf>> {
    let mut at = base.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        let exact = at.join(part);
        if exact.symlink_metadata().is_ok() {
            at = exact;
            continue;
        }
        if !at.is_dir() {
            return Ok(None);
        }
        let mut found = None;
        for e in std::fs::read_dir(&at).with_context(|| format!("listing {}", at.display()))? {
            let e = e.with_context(|| format!("listing {}", at.display()))?;
            if e.file_name().to_string_lossy().eq_ignore_ascii_case(part) {
                found = Some(e.path());
                break;
            }
        }
        match found {
            Some(p) => at = p,
            None => return Ok(None),
        }
    }
    Ok(Some(at))
}

fn read_head(path: &Path, n: usize) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0; n];
    let mut got = 0;
    while got < n {
        let r = f
            .read(&mut buf[got..])
            .with_context(|| format!("reading {}", path.display()))?;
        if r == 0 {
            break;
        }
        got += r;
    }
    buf.truncate(got);
    Ok(buf)
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The primary and secondary sequence numbers of a regf base block.
fn sequences(head: &[u8]) -> Option<(u32, u32)> {
    if head.get(..4) != Some(b"regf") {
        return None;
    }
    Some((le32(head, 4)?, le32(head, 8)?))
}

/// Refuses a hive that Windows did not close cleanly: its base block's sequence numbers differ,
/// or a `.LOG1`/`.LOG2` beside it holds a base block newer than the hive's (changes Windows
/// would replay at boot, over ours). `shown` names the file in the message.
pub fn check_hive_clean(path: &Path, shown: &str) -> Result<()> {
    let head = read_head(path, 512)?;
    let Some((primary, secondary)) = sequences(&head) else {
        bail!("{shown}: not a registry hive (no regf signature)");
    };
    let advice = "boot this Windows once and shut it down cleanly (shutdown /s, not Fast \
                  Startup), or pass --force to edit it anyway";
    if primary != secondary {
        bail!(
            "{shown}: the hive was not closed cleanly (sequence numbers {primary} and \
             {secondary} differ): {advice}"
        );
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for ext in ["LOG1", "LOG2"] {
        let Some(log) = find_ci(dir, &format!("{name}.{ext}"))? else {
            continue;
        };
        let lhead = read_head(&log, 512)?;
        if lhead.iter().all(|b| *b == 0) {
            continue;
        }
        if let Some((lp, ls)) = sequences(&lhead) {
            let newest = lp.max(ls);
            if newest > secondary {
                bail!(
                    "{shown}.{ext}: the transaction log holds changes newer than the hive \
                     (log sequence {newest}, hive {secondary}): {advice}"
                );
            }
        }
    }
    Ok(())
}

/// Refuses a volume whose `hiberfil.sys` holds a hibernated session (Fast Startup included):
/// Windows would resume it and drop or corrupt offline changes. Its first 4 bytes say so
/// (`hibr`, `wake`, any case); a zeroed or missing file is fine.
pub fn check_not_hibernated(root: &Path) -> Result<()> {
    let Some(h) = find_ci(root, "hiberfil.sys")? else {
        return Ok(());
    };
    let head = read_head(&h, 4)?;
    let sig = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if sig == "hibr" || sig == "wake" {
        bail!(
            "hiberfil.sys: this Windows is hibernated or was shut down with Fast Startup \
             (hiberfil.sys starts with {:?}): boot it and shut it down fully (shutdown /s /t 0, \
             or turn Fast Startup off), or pass --force (the hibernated session is then lost)",
            String::from_utf8_lossy(&head)
        );
    }
    Ok(())
}

/// The restored Windows, as its hives describe it.
#[derive(Debug, Clone)]
pub struct WindowsVolume {
    pub root: PathBuf,
    /// The `Windows` folder as spelled on the volume.
    pub windows: PathBuf,
    pub system: Hive,
    pub software: Hive,
    /// `Select\Current`.
    pub control_set: u32,
    pub target: WindowsTarget,
    pub product_name: String,
    /// `HKLM\SYSTEM\DriverDatabase` exists (Windows 8 / Server 2012 and later).
    pub driver_database: bool,
    /// What `force` let through.
    pub forced: Vec<String>,
}

impl WindowsVolume {
    /// `ControlSet00N` of the current control set.
    pub fn control_set_key(&self) -> String {
        format!("ControlSet{:03}", self.control_set)
    }

    /// Opens the Windows on a mounted volume. With `force`, dirty hives and hibernation are
    /// listed in [`WindowsVolume::forced`] instead of refused.
    pub fn open(root: &Path, force: bool) -> Result<WindowsVolume> {
        let windows = find_ci(root, "Windows")?
            .filter(|p| p.is_dir())
            .with_context(|| format!("{}: no Windows folder on this volume", root.display()))?;
        let hive = |name: &str| -> Result<PathBuf> {
            find_ci(&windows, &format!("System32/config/{name}"))?
                .filter(|p| p.is_file())
                .with_context(|| {
                    format!("{}: no Windows/System32/config/{name} hive", root.display())
                })
        };
        let (system_path, software_path) = (hive("SYSTEM")?, hive("SOFTWARE")?);
        let mut forced = Vec::new();
        let mut check = |r: Result<()>| -> Result<()> {
            match r {
                Err(e) if force => {
                    forced.push(format!("{e:#}"));
                    Ok(())
                }
                other => other,
            }
        };
        check(check_not_hibernated(root))?;
        check(check_hive_clean(
            &system_path,
            "Windows/System32/config/SYSTEM",
        ))?;
        check(check_hive_clean(
            &software_path,
            "Windows/System32/config/SOFTWARE",
        ))?;
        let system = Hive::new(&system_path, SYSTEM_PREFIX);
        let software = Hive::new(&software_path, SOFTWARE_PREFIX);

        let select = system
            .key("Select")?
            .context("SYSTEM hive: no Select key (is this a Windows SYSTEM hive?)")?;
        let control_set = select
            .get("Current")
            .and_then(|d| d.as_dword())
            .context("SYSTEM hive: Select has no REG_DWORD Current value")?;
        let cs = format!("ControlSet{control_set:03}");
        let cs_control = system.key(&format!("{cs}\\Control"))?;
        if cs_control.is_none() || system.key(&cs)?.is_none() {
            bail!("SYSTEM hive: Select\\Current is {control_set} but {cs}\\Control does not exist");
        }

        let cv = "Microsoft\\Windows NT\\CurrentVersion";
        let ver = software
            .key(cv)?
            .with_context(|| format!("SOFTWARE hive: no {cv} key"))?;
        let product_name = ver
            .get("ProductName")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_string();
        let build = ver
            .get("CurrentBuildNumber")
            .or_else(|| ver.get("CurrentBuild"))
            .and_then(|d| d.as_str())
            .and_then(|s| s.trim().parse::<u32>().ok())
            .with_context(|| format!("SOFTWARE hive: {cv} has no CurrentBuildNumber"))?;
        let (major, minor) = match (
            ver.get("CurrentMajorVersionNumber")
                .and_then(|d| d.as_dword()),
            ver.get("CurrentMinorVersionNumber")
                .and_then(|d| d.as_dword()),
        ) {
            (Some(a), b) => (a, b.unwrap_or(0)),
            (None, _) => {
                let v = ver
                    .get("CurrentVersion")
                    .and_then(|d| d.as_str())
                    .with_context(|| format!("SOFTWARE hive: {cv} has no CurrentVersion"))?;
                let mut p = v.split('.').map(|s| s.trim().parse::<u32>().ok());
                match (p.next().flatten(), p.next().flatten()) {
                    (Some(a), Some(b)) => (a, b),
                    _ => bail!("SOFTWARE hive: {cv}\\CurrentVersion is {v:?}, not major.minor"),
                }
            }
        };
        let env = format!("{cs}\\Control\\Session Manager\\Environment");
        let arch = system
            .value(&env, "PROCESSOR_ARCHITECTURE")?
            .and_then(|d| d.as_str().map(str::to_ascii_lowercase))
            .with_context(|| format!("SYSTEM hive: no {env}\\PROCESSOR_ARCHITECTURE"))?;
        let product = system
            .value(&format!("{cs}\\Control\\ProductOptions"), "ProductType")?
            .and_then(|d| d.as_str().map(str::to_ascii_lowercase));
        let product_type = match product.as_deref() {
            Some("winnt") => 1,
            Some("lanmannt") => 2,
            Some("servernt") => 3,
            _ if product_name.to_ascii_lowercase().contains("server") => 3,
            _ => 1,
        };
        let driver_database = system.key("DriverDatabase")?.is_some();
        Ok(WindowsVolume {
            root: root.to_path_buf(),
            windows,
            system,
            software,
            control_set,
            target: WindowsTarget {
                arch,
                major,
                minor,
                build,
                product_type,
            },
            product_name,
            driver_database,
            forced,
        })
    }
}
