//! The plan: every file and registry value an injection writes, each with its original.

use super::firstboot::{plan_first_boot, static_ipv4};
use super::*;
use crate::windows::hive::{Data, Hive, Key};
use crate::windows::offline::{find_ci, WindowsVolume};
use crate::windows::repo::{Install, Package, RegLine};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(super) fn rel_to(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

pub(super) fn hive_of(vol: &WindowsVolume, h: HiveName) -> &Hive {
    match h {
        HiveName::System => &vol.system,
        HiveName::Software => &vol.software,
    }
}

/// The registry values of an INF `AddReg` line: None for a key-only line.
pub(super) fn addreg_data(l: &RegLine) -> Result<Option<Data>> {
    const KEYONLY: u32 = 0x10;
    if l.flags & KEYONLY != 0 {
        return Ok(None);
    }
    let first = l.values.first().map(String::as_str).unwrap_or("");
    let bytes = || -> Result<Vec<u8>> {
        l.values
            .iter()
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                let v = v.trim();
                let v = v
                    .strip_prefix("0x")
                    .or_else(|| v.strip_prefix("0X"))
                    .unwrap_or(v);
                u8::from_str_radix(v, 16).with_context(|| format!("{v:?} is not a hex byte"))
            })
            .collect()
    };
    let number = |s: &str| -> Result<u32> {
        let s = s.trim();
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(h) => u32::from_str_radix(h, 16),
            None => s.parse(),
        }
        .with_context(|| format!("{s:?} is not a number"))
    };
    let data = match l.flags & 0xFFFF_0001 {
        0x0000_0000 => Data::Sz(first.to_string()),
        0x0002_0000 => Data::ExpandSz(first.to_string()),
        0x0001_0000 => Data::MultiSz(l.values.iter().filter(|v| !v.is_empty()).cloned().collect()),
        0x0001_0001 => {
            if l.values.len() == 4 {
                match bytes()?[..] {
                    [a, b, c, d] => Data::Dword(u32::from_le_bytes([a, b, c, d])),
                    _ => bail!("a REG_DWORD of four bytes has an empty byte"),
                }
            } else {
                Data::Dword(number(first)?)
            }
        }
        0x0000_0001 => Data::Binary(bytes()?),
        0x0002_0001 => Data::Raw {
            kind: 0,
            bytes: bytes()?,
        },
        f => Data::Raw {
            kind: f >> 16,
            bytes: bytes()?,
        },
    };
    Ok(Some(data))
}

/// `ImagePath` of a service from its INF `ServiceBinary` (`%12%\viostor.sys`).
pub(super) fn image_path(binary: &str) -> String {
    let b = binary.trim();
    let lower = b.to_ascii_lowercase();
    for (dirid, path) in [
        ("%12%", "System32\\drivers"),
        ("%11%", "System32"),
        ("%10%", "\\SystemRoot"),
    ] {
        if lower.starts_with(dirid) {
            return format!("{path}{}", &b[dirid.len()..]);
        }
    }
    b.to_string()
}

/// The folder below the Windows folder an INF dirid names, when it is one we copy to.
pub(super) fn dirid_folder(dirid: &str) -> Option<&'static str> {
    match dirid.trim() {
        "12" => Some("System32/drivers"),
        "11" => Some("System32"),
        "10" => Some(""),
        _ => None,
    }
}

pub(super) fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let t = e
            .file_type()
            .with_context(|| format!("reading {}", p.display()))?;
        if t.is_dir() {
            list_files(&p, out)?;
        } else if t.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

pub(super) struct Planner<'v> {
    pub(super) vol: &'v WindowsVolume,
    pub(super) cs: String,
    /// Keys as read (depth 1) and as the plan leaves them; None: missing.
    pub(super) keys: HashMap<(HiveName, String), Option<Key>>,
    pub(super) previous: Vec<Plan>,
    pub(super) plan: Plan,
}

impl<'v> Planner<'v> {
    pub(super) fn key(&mut self, h: HiveName, key: &str) -> Result<Option<Key>> {
        let id = (h, key.to_lowercase());
        if let Some(k) = self.keys.get(&id) {
            return Ok(k.clone());
        }
        let k = hive_of(self.vol, h)
            .key(key)
            .with_context(|| format!("reading {}\\{key}", h.file()))?;
        self.keys.insert(id, k.clone());
        Ok(k)
    }

    pub(super) fn value(&mut self, h: HiveName, key: &str, name: &str) -> Result<Option<Data>> {
        Ok(self.key(h, key)?.and_then(|k| k.get(name).cloned()))
    }

    /// Plans the creation of `key` and its missing ancestors.
    pub(super) fn ensure_key(&mut self, h: HiveName, key: &str) -> Result<()> {
        let parts: Vec<&str> = key.split('\\').filter(|p| !p.is_empty()).collect();
        // The deepest existing ancestor: everything below it is created.
        let mut exists = parts.len();
        while exists > 0 && self.key(h, &parts[..exists].join("\\"))?.is_none() {
            exists -= 1;
        }
        for n in exists + 1..=parts.len() {
            let k = parts[..n].join("\\");
            self.plan.keys_created.push(KeyRef {
                hive: h,
                key: k.clone(),
            });
            self.keys.insert(
                (h, k.to_lowercase()),
                Some(Key {
                    path: k,
                    values: Default::default(),
                }),
            );
        }
        Ok(())
    }

    /// Plans `key\name = data` unless it is already so.
    pub(super) fn set(
        &mut self,
        h: HiveName,
        key: &str,
        name: &str,
        data: Data,
        why: &str,
    ) -> Result<()> {
        self.ensure_key(h, key)?;
        let current = self.value(h, key, name)?;
        if current.as_ref() == Some(&data) {
            return Ok(());
        }
        if let Some(w) = self.plan.registry.iter_mut().find(|w| {
            w.hive == h && w.key.eq_ignore_ascii_case(key) && w.name.eq_ignore_ascii_case(name)
        }) {
            w.data = data.clone();
        } else {
            self.plan.registry.push(RegWrite {
                hive: h,
                key: key.to_string(),
                name: name.to_string(),
                data: data.clone(),
                original: current,
                why: why.to_string(),
            });
        }
        if let Some(Some(k)) = self.keys.get_mut(&(h, key.to_lowercase())) {
            k.values
                .insert(name.to_lowercase(), (name.to_string(), data));
        }
        Ok(())
    }

    /// Plans writing `dest` (relative to the volume root) unless it already holds these bytes.
    pub(super) fn file(&mut self, dest: &Path, source: Source, why: &str) -> Result<()> {
        let root = self.vol.root.clone();
        let bytes = match &source {
            Source::Copy(p) => {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))?
            }
            Source::Text(t) => t.as_bytes().to_vec(),
        };
        // An existing file of another case is the one replaced.
        let rel = rel_to(&root, dest);
        let dest = find_ci(&root, &rel)?.unwrap_or_else(|| dest.to_path_buf());
        let rel = rel_to(&root, &dest);
        let original = match std::fs::read(&dest) {
            Ok(old) if old == bytes => return Ok(()),
            Ok(_) => Some(format!(
                "{}/{STAGING}/originals/{}",
                rel_to(&root, &self.vol.windows),
                rel
            )),
            Err(_) => None,
        };
        if let Some(f) = self.plan.files.iter_mut().find(|f| f.path == rel) {
            f.source = source;
            return Ok(());
        }
        self.plan.files.push(FileWrite {
            path: rel,
            source,
            original,
            why: why.to_string(),
        });
        Ok(())
    }

    /// The value a previous run found before it changed it, else the current one.
    pub(super) fn first_original(
        &mut self,
        h: HiveName,
        key: &str,
        name: &str,
    ) -> Result<Option<Data>> {
        for p in &self.previous {
            if let Some(w) = p.registry.iter().find(|w| {
                w.hive == h && w.key.eq_ignore_ascii_case(key) && w.name.eq_ignore_ascii_case(name)
            }) {
                return Ok(w.original.clone());
            }
        }
        self.value(h, key, name)
    }
}

/// A package's ID in the DriverDatabase (`viostor.inf_amd64_<16 hex>`); Windows derives the
/// hex from the signature, ours from the package's bytes so that it is stable across runs.
pub(super) fn package_id(inf_name: &str, arch: &str, files: &[PathBuf]) -> Result<String> {
    let mut a = crc32fast::Hasher::new();
    let mut b = crc32fast::Hasher::new();
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        if f.file_name()
            .is_some_and(|n| n.to_string_lossy().eq_ignore_ascii_case(inf_name))
        {
            a.update(&bytes);
        } else {
            b.update(&bytes);
        }
    }
    Ok(format!(
        "{inf_name}_{arch}_{:08x}{:08x}",
        a.finalize(),
        b.finalize()
    ))
}

/// Plans the injection of `devices` into the Windows on `vol`; writes nothing.
pub fn plan(vol: &WindowsVolume, devices: &[Device], opts: &Options) -> Result<Plan> {
    let cs = vol.control_set_key();
    let t = &vol.target;
    let mut p = Planner {
        vol,
        cs: cs.clone(),
        keys: HashMap::new(),
        previous: read_record(vol)?,
        plan: Plan {
            windows: format!(
                "{} ({}.{}.{}, {})",
                if vol.product_name.is_empty() {
                    "Windows"
                } else {
                    &vol.product_name
                },
                t.major,
                t.minor,
                t.build,
                t.arch
            ),
            control_set: cs.clone(),
            notes: vol.forced.iter().map(|f| format!("forced: {f}")).collect(),
            ..Default::default()
        },
    };
    let mut staged_dirs: HashMap<PathBuf, String> = HashMap::new();
    for d in devices {
        match &d.driver {
            Driver::InBox { service } => plan_in_box(&mut p, d, service)?,
            Driver::Package {
                package,
                install,
                description,
            } => {
                let staged = stage(&mut p, package, &mut staged_dirs)?;
                if d.boot_critical {
                    plan_package(&mut p, d, package, install, description, &staged)?;
                } else {
                    p.plan.notes.push(format!(
                        "{}: {} staged for pnputil at first boot (not boot-critical)",
                        d.hardware_id, description
                    ));
                }
            }
        }
    }
    let ipv4 = if opts.carry_ipv4 {
        static_ipv4(&mut p)?
    } else {
        None
    };
    let mut staged: Vec<String> = p.previous.iter().flat_map(|r| r.staged.clone()).collect();
    for s in std::mem::take(&mut p.plan.staged) {
        if !staged.iter().any(|x| x.eq_ignore_ascii_case(&s)) {
            staged.push(s);
        }
    }
    p.plan.staged = staged;
    if !p.plan.staged.is_empty() || ipv4.is_some() {
        plan_first_boot(&mut p, ipv4.as_ref())?;
    }
    Ok(p.plan)
}

/// Copies a package's folder to `Windows/bmr-drivers/<name>`; returns the staged folder name.
pub(super) fn stage(
    p: &mut Planner,
    package: &Package,
    staged_dirs: &mut HashMap<PathBuf, String>,
) -> Result<String> {
    let dir = package
        .inf_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if let Some(n) = staged_dirs.get(&dir) {
        return Ok(n.clone());
    }
    let stem = package
        .inf_path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_else(|| "driver".into());
    let mut name = stem.clone();
    let mut n = 2;
    while staged_dirs.values().any(|v| v == &name) {
        name = format!("{stem}-{n}");
        n += 1;
    }
    staged_dirs.insert(dir.clone(), name.clone());
    let mut files = Vec::new();
    list_files(&dir, &mut files)?;
    let base = p.vol.windows.join(STAGING).join(&name);
    for f in files {
        let rel = f.strip_prefix(&dir).unwrap_or(&f).to_path_buf();
        p.file(
            &base.join(rel),
            Source::Copy(f.clone()),
            &format!("stage {name} for pnputil at first boot"),
        )?;
    }
    let inf = package
        .inf_path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    p.plan.staged.push(format!("{STAGING}/{name}/{inf}"));
    Ok(name)
}

pub(super) fn plan_in_box(p: &mut Planner, d: &Device, service: &str) -> Result<()> {
    let svc_key = format!("{}\\Services\\{service}", p.cs);
    if p.key(HiveName::System, &svc_key)?.is_none() {
        bail!(
            "SYSTEM\\{svc_key}: this Windows has no in-box {service} service (older than \
             Windows 8 / Server 2012?): a driver package is needed for {}",
            d.hardware_id
        );
    }
    p.set(
        HiveName::System,
        &svc_key,
        "Start",
        Data::Dword(0),
        &format!("{service} boot-start: it drives the boot disk's controller"),
    )?;
    let (inf, guid) = IN_BOX_INF
        .iter()
        .find(|(s, _, _)| s.eq_ignore_ascii_case(service))
        .map(|(_, i, g)| (*i, *g))
        .unwrap_or(("", SCSI_ADAPTER_GUID));
    if p.vol.driver_database {
        let key = format!("DriverDatabase\\DeviceIds\\{}", d.hardware_id);
        let bound = p
            .key(HiveName::System, &key)?
            .is_some_and(|k| !k.values.is_empty());
        if !bound && inf.is_empty() {
            p.plan.notes.push(format!(
                "{}: no DriverDatabase binding to {service} and no known in-box INF to add",
                d.hardware_id
            ));
        } else if !bound {
            p.set(
                HiveName::System,
                &key,
                inf,
                Data::Binary(vec![0x01, 0xff, 0, 0]),
                &format!("bind {} to the in-box {inf}", d.hardware_id),
            )?;
        }
    } else {
        critical_device(p, &d.hardware_id, service, guid)?;
    }
    Ok(())
}

pub(super) fn critical_device(p: &mut Planner, id: &str, service: &str, guid: &str) -> Result<()> {
    let key = format!(
        "{}\\Control\\CriticalDeviceDatabase\\{}",
        p.cs,
        id.replace('\\', "#").to_ascii_lowercase()
    );
    let why = format!("bind {id} to {service} at boot (CriticalDeviceDatabase)");
    p.set(
        HiveName::System,
        &key,
        "Service",
        Data::Sz(service.to_string()),
        &why,
    )?;
    p.set(
        HiveName::System,
        &key,
        "ClassGUID",
        Data::Sz(guid.to_string()),
        &why,
    )
}

pub(super) fn plan_package(
    p: &mut Planner,
    d: &Device,
    package: &Package,
    install: &Install,
    description: &str,
    staged: &str,
) -> Result<()> {
    let inf_shown = package.inf_path.display().to_string();
    let dir = package
        .inf_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for f in &install.files {
        let Some(folder) = dirid_folder(&f.dirid) else {
            p.plan.notes.push(format!(
                "{inf_shown}: {} goes to dirid {}: left to pnputil at first boot",
                f.name, f.dirid
            ));
            continue;
        };
        let src = find_ci(&dir, &f.source)?.with_context(|| {
            format!(
                "{inf_shown}: CopyFiles names {} but the package has no such file",
                f.source
            )
        })?;
        let dest_dir = p.vol.windows.join(folder);
        p.file(
            &dest_dir.join(&f.name),
            Source::Copy(src),
            &format!("{description}: its driver, loaded at boot"),
        )?;
    }
    for need in &install.system_needs {
        p.plan.notes.push(format!(
            "{inf_shown}: Needs {need}: Windows has it, pnputil applies it at first boot"
        ));
    }
    if !install.addreg.is_empty() {
        p.plan.notes.push(format!(
            "{inf_shown}: {} AddReg lines of {} (the device's driver key) left to pnputil at \
             first boot",
            install.addreg.len(),
            install.section
        ));
    }
    let Some(svc) = install
        .services
        .iter()
        .find(|s| s.flags & 0x2 != 0)
        .or(install.services.first())
    else {
        bail!(
            "{inf_shown}: section {} installs no service: cannot bind {}",
            install.section,
            d.hardware_id
        );
    };
    for s in &install.services {
        let key = format!("{}\\Services\\{}", p.cs, s.name);
        let why = format!("service {} of {description}", s.name);
        let start = if d.boot_critical && s.name == svc.name {
            0
        } else {
            s.start_type
        };
        p.set(
            HiveName::System,
            &key,
            "Type",
            Data::Dword(s.service_type),
            &why,
        )?;
        p.set(HiveName::System, &key, "Start", Data::Dword(start), &why)?;
        p.set(
            HiveName::System,
            &key,
            "ErrorControl",
            Data::Dword(s.error_control),
            &why,
        )?;
        if let Some(g) = &s.group {
            p.set(HiveName::System, &key, "Group", Data::Sz(g.clone()), &why)?;
        }
        p.set(
            HiveName::System,
            &key,
            "ImagePath",
            Data::ExpandSz(image_path(&s.binary)),
            &why,
        )?;
        for l in &s.addreg {
            addreg(p, l, &key, &inf_shown, &why)?;
        }
    }
    let section = install.section.clone();
    let inf_name = package
        .inf_path
        .file_name()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if p.vol.driver_database {
        let mut files = Vec::new();
        list_files(&dir, &mut files)?;
        let id = package_id(&inf_name, &p.vol.target.arch, &files)?;
        let why = format!(
            "PnP binds {} to {} at boot (DriverDatabase)",
            d.hardware_id, svc.name
        );
        let h = HiveName::System;
        let inf_key = format!("DriverDatabase\\DriverInfFiles\\{inf_name}");
        let mut packages = p
            .value(h, &inf_key, "")?
            .and_then(|d| d.as_list())
            .unwrap_or_default();
        if !packages.iter().any(|x| x.eq_ignore_ascii_case(&id)) {
            packages.push(id.clone());
        }
        p.set(h, &inf_key, "", Data::MultiSz(packages), &why)?;
        p.set(h, &inf_key, "Active", Data::Sz(id.clone()), &why)?;
        let mut configs = p
            .value(h, &inf_key, "Configurations")?
            .and_then(|d| d.as_list())
            .unwrap_or_default();
        if !configs.iter().any(|x| x.eq_ignore_ascii_case(&section)) {
            configs.push(section.clone());
        }
        p.set(h, &inf_key, "Configurations", Data::MultiSz(configs), &why)?;
        p.set(
            h,
            &format!("DriverDatabase\\DeviceIds\\{}", d.hardware_id),
            &inf_name,
            Data::Binary(vec![0x01, 0xff, 0x00, 0x00]),
            &why,
        )?;
        let pkg_key = format!("DriverDatabase\\DriverPackages\\{id}");
        p.set(h, &pkg_key, "", Data::Sz(inf_name.clone()), &why)?;
        p.set(h, &pkg_key, "InfName", Data::Sz(inf_name.clone()), &why)?;
        p.set(
            h,
            &pkg_key,
            "Provider",
            Data::Sz(package.provider.clone()),
            &why,
        )?;
        let conf = format!("{pkg_key}\\Configurations\\{section}");
        p.set(h, &conf, "Service", Data::Sz(svc.name.clone()), &why)?;
        p.set(h, &conf, "ConfigFlags", Data::Dword(0), &why)?;
        let desc = format!("{pkg_key}\\Descriptors\\{}", d.hardware_id);
        p.set(h, &desc, "Configuration", Data::Sz(section.clone()), &why)?;
        p.set(
            h,
            &desc,
            "Description",
            Data::Sz(description.to_string()),
            &why,
        )?;
        p.set(
            h,
            &desc,
            "Manufacturer",
            Data::Sz(package.provider.clone()),
            &why,
        )?;
    } else {
        let guid = if package.class_guid.is_empty() {
            SCSI_ADAPTER_GUID.to_string()
        } else {
            package.class_guid.to_ascii_uppercase()
        };
        critical_device(p, &d.hardware_id, &svc.name, &guid)?;
    }
    p.plan.notes.push(format!(
        "{}: {description} ({staged}) installed offline, service {} boot-start",
        d.hardware_id, svc.name
    ));
    Ok(())
}

/// One `AddReg` line of a service-install section: HKR is the service key; HKLM lines under
/// `System\CurrentControlSet` or `Software` go to their hive.
pub(super) fn addreg(
    p: &mut Planner,
    l: &RegLine,
    svc_key: &str,
    inf: &str,
    why: &str,
) -> Result<()> {
    const NOCLOBBER: u32 = 0x2;
    const DELVAL: u32 = 0x4;
    const APPEND: u32 = 0x8;
    let sub = l.subkey.trim_matches('\\');
    let (h, key) = match l.root.to_ascii_uppercase().as_str() {
        "HKR" if sub.is_empty() => (HiveName::System, svc_key.to_string()),
        "HKR" => (HiveName::System, format!("{svc_key}\\{sub}")),
        "HKLM" => {
            let lower = sub.to_ascii_lowercase();
            if let Some(rest) = lower.strip_prefix("system\\currentcontrolset\\") {
                let rest = &sub[sub.len() - rest.len()..];
                (HiveName::System, format!("{}\\{rest}", p.cs))
            } else if lower.starts_with("software\\") {
                (HiveName::Software, sub["software\\".len()..].to_string())
            } else {
                p.plan
                    .notes
                    .push(format!("{inf}: AddReg HKLM,{sub} not written offline"));
                return Ok(());
            }
        }
        other => {
            p.plan
                .notes
                .push(format!("{inf}: AddReg {other},{sub} not written offline"));
            return Ok(());
        }
    };
    if l.flags & DELVAL != 0 {
        p.plan.notes.push(format!(
            "{inf}: AddReg deletion of {sub}\\{} left to pnputil",
            l.name
        ));
        return Ok(());
    }
    let data =
        addreg_data(l).with_context(|| format!("{inf}: AddReg {},{sub},{}", l.root, l.name))?;
    let Some(mut data) = data else {
        return p.ensure_key(h, &key);
    };
    let current = p.value(h, &key, &l.name)?;
    if l.flags & NOCLOBBER != 0 && current.is_some() {
        return Ok(());
    }
    if l.flags & APPEND != 0 {
        if let (Some(old), Data::MultiSz(new)) = (current.and_then(|c| c.as_list()), &data) {
            let mut all = old;
            for s in new {
                if !all.iter().any(|x| x.eq_ignore_ascii_case(s)) {
                    all.push(s.clone());
                }
            }
            data = Data::MultiSz(all);
        }
    }
    p.set(h, &key, &l.name, data, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addreg_types_and_image_paths() {
        let l = |flags: u32, values: &[&str]| RegLine {
            root: "HKR".into(),
            subkey: "Parameters".into(),
            name: "x".into(),
            flags,
            values: values.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            addreg_data(&l(0x10001, &["0x00000001"])).unwrap(),
            Some(Data::Dword(1))
        );
        assert_eq!(
            addreg_data(&l(0x10001, &["7"])).unwrap(),
            Some(Data::Dword(7))
        );
        assert_eq!(
            addreg_data(&l(0, &["nobusreset=1;"])).unwrap(),
            Some(Data::Sz("nobusreset=1;".into()))
        );
        assert_eq!(
            addreg_data(&l(0x10000, &["a", "b"])).unwrap(),
            Some(Data::MultiSz(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            addreg_data(&l(1, &["01", "ff"])).unwrap(),
            Some(Data::Binary(vec![1, 0xff]))
        );
        assert_eq!(addreg_data(&l(0x10, &[])).unwrap(), None);
        assert!(addreg_data(&l(0x10001, &["lots"])).is_err());
        assert!(addreg_data(&l(1, &["zz"])).is_err());
        assert_eq!(
            addreg_data(&l(0x10001, &["01", "02", "0", "0"])).unwrap(),
            Some(Data::Dword(0x0201))
        );
        assert!(addreg_data(&l(0x10001, &["01", "", "0", "0"])).is_err());
        assert_eq!(
            image_path("%12%\\viostor.sys"),
            "System32\\drivers\\viostor.sys"
        );
        assert_eq!(image_path("%10%\\x\\y.sys"), "\\SystemRoot\\x\\y.sys");
    }
}
