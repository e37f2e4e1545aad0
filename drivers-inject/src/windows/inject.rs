//! Offline driver injection into a restored Windows: the plan (every file copied and every
//! registry value written, each with its original) and its application, a record of what was
//! done for the restore report, and the rollback that record allows.
//!
//! For a boot-critical storage controller the edits make Windows load and bind the driver on
//! its first boot, before anything else runs: the `.sys` in `System32\drivers`, the service
//! key boot-start, and the PnP binding of the device's ID to the service (the `DriverDatabase`
//! on Windows 8 / Server 2012 and later, the `CriticalDeviceDatabase` before). Every package is
//! also staged under `Windows\bmr-drivers` (on `DevicePath`, so PnP finds it) and installed
//! properly by a one-shot first-boot script (`pnputil`), which also carries the old NIC's
//! static IPv4 settings to the new NIC. Non-boot devices (NICs) are only staged.

use super::hive::{Data, Edit, Hive, Key};
use super::hwid::{in_box, PciIds};
use super::offline::{find_ci, WindowsVolume};
use super::repo::{Candidate, Install, Package, RegLine, Repo};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The staging folder, below the Windows folder.
pub const STAGING: &str = "bmr-drivers";
/// The record of every applied plan (a JSON array, oldest first), in the staging folder.
pub const RECORD: &str = "record.json";
pub const FIRSTBOOT: &str = "firstboot.cmd";
/// The RunOnce value that starts the first-boot script.
pub const RUNONCE_VALUE: &str = "bmr-drivers";

const SCSI_ADAPTER_GUID: &str = "{4D36E97B-E325-11CE-BFC1-08002BE10318}";
const HDC_GUID: &str = "{4D36E96A-E325-11CE-BFC1-08002BE10318}";

/// In-box services: the INF that binds them (Windows 8 and later) and their setup class.
const IN_BOX_INF: &[(&str, &str, &str)] = &[
    ("storahci", "mshdc.inf", HDC_GUID),
    ("stornvme", "stornvme.inf", SCSI_ADAPTER_GUID),
];

/// What drives a device.
#[derive(Debug, Clone)]
pub enum Driver<'r> {
    /// A package from the repository and what its INF installs for this device.
    Package {
        package: &'r Package,
        install: Install,
        description: String,
    },
    /// A service Windows has (storahci, stornvme): only made boot-start and bound.
    InBox { service: String },
}

#[derive(Debug, Clone)]
pub struct Device<'r> {
    /// The device ID the driver is bound to: the candidate's matched ID, or for an in-box
    /// driver the class ID its INF lists (`PCI\CC_010802`).
    pub hardware_id: String,
    pub driver: Driver<'r>,
    /// The boot disk's controller: installed offline and made boot-start. Otherwise (a NIC)
    /// the package is only staged for the first boot.
    pub boot_critical: bool,
}

impl<'r> Device<'r> {
    /// The device a repository candidate describes.
    pub fn from_candidate(c: &Candidate<'r>, repo: &Repo, boot_critical: bool) -> Result<Self> {
        Ok(Device {
            hardware_id: c.matched.clone(),
            driver: Driver::Package {
                package: c.package,
                install: c.package.install(&c.install, repo)?,
                description: c.description.clone(),
            },
            boot_critical,
        })
    }

    /// The in-box driver of a storage controller, bound by its class ID.
    pub fn in_box(ids: &PciIds) -> Option<Device<'static>> {
        let service = in_box(ids)?;
        let (c, s, p) = ids.class;
        Some(Device {
            hardware_id: format!("PCI\\CC_{c:02X}{s:02X}{p:02X}"),
            driver: Driver::InBox {
                service: service.to_string(),
            },
            boot_critical: true,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Return the plan, write nothing.
    pub dry_run: bool,
    /// Carry the old NIC's static IPv4 settings to the new NIC at first boot.
    pub carry_ipv4: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dry_run: false,
            carry_ipv4: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HiveName {
    System,
    Software,
}

impl HiveName {
    pub fn file(self) -> &'static str {
        match self {
            HiveName::System => "SYSTEM",
            HiveName::Software => "SOFTWARE",
        }
    }
}

/// One registry value the plan writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegWrite {
    pub hive: HiveName,
    pub key: String,
    /// "" is the key's default value.
    pub name: String,
    pub data: Data,
    /// The value before, None when there was none.
    pub original: Option<Data>,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRef {
    pub hive: HiveName,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A file of a driver package (a path on the machine running the restore).
    Copy(PathBuf),
    /// Generated text (the first-boot script).
    Text(String),
}

/// One file the plan writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileWrite {
    /// Relative to the volume root, as spelled on the volume (`Windows/System32/drivers/x.sys`).
    pub path: String,
    pub source: Source,
    /// Where the file that was there is kept (relative to the volume root), None when the file
    /// is new.
    pub original: Option<String>,
    pub why: String,
}

/// The plan of an injection; once applied, the record of it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// `Windows Server 2019 Standard (10.0.17763, amd64)`.
    pub windows: String,
    pub control_set: String,
    pub files: Vec<FileWrite>,
    pub registry: Vec<RegWrite>,
    /// Keys the plan creates, parent first (rollback deletes them).
    pub keys_created: Vec<KeyRef>,
    /// Staged INFs, relative to the Windows folder (`bmr-drivers/viostor/viostor.inf`).
    pub staged: Vec<String>,
    /// What the plan does not do and why; what `--force` let through.
    pub notes: Vec<String>,
}

impl Plan {
    /// Nothing to write: the system already has every change.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.registry.is_empty() && self.keys_created.is_empty()
    }

    /// The value the plan writes, if it writes it.
    pub fn value(&self, hive: HiveName, key: &str, name: &str) -> Option<&Data> {
        self.registry
            .iter()
            .find(|w| {
                w.hive == hive
                    && w.key.eq_ignore_ascii_case(key)
                    && w.name.eq_ignore_ascii_case(name)
            })
            .map(|w| &w.data)
    }
}

fn rel_to(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

fn hive_of(vol: &WindowsVolume, h: HiveName) -> &Hive {
    match h {
        HiveName::System => &vol.system,
        HiveName::Software => &vol.software,
    }
}

/// The registry values of an INF `AddReg` line: None for a key-only line.
fn addreg_data(l: &RegLine) -> Result<Option<Data>> {
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
fn image_path(binary: &str) -> String {
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
fn dirid_folder(dirid: &str) -> Option<&'static str> {
    match dirid.trim() {
        "12" => Some("System32/drivers"),
        "11" => Some("System32"),
        "10" => Some(""),
        _ => None,
    }
}

fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
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

/// The records of earlier injections into this Windows (oldest first).
pub fn read_record(vol: &WindowsVolume) -> Result<Vec<Plan>> {
    let p = vol.windows.join(STAGING).join(RECORD);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

struct Planner<'v> {
    vol: &'v WindowsVolume,
    cs: String,
    /// Keys as read (depth 1) and as the plan leaves them; None: missing.
    keys: HashMap<(HiveName, String), Option<Key>>,
    previous: Vec<Plan>,
    plan: Plan,
}

impl<'v> Planner<'v> {
    fn key(&mut self, h: HiveName, key: &str) -> Result<Option<Key>> {
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

    fn value(&mut self, h: HiveName, key: &str, name: &str) -> Result<Option<Data>> {
        Ok(self.key(h, key)?.and_then(|k| k.get(name).cloned()))
    }

    /// Plans the creation of `key` and its missing ancestors.
    fn ensure_key(&mut self, h: HiveName, key: &str) -> Result<()> {
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
    fn set(&mut self, h: HiveName, key: &str, name: &str, data: Data, why: &str) -> Result<()> {
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
    fn file(&mut self, dest: &Path, source: Source, why: &str) -> Result<()> {
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
    fn first_original(&mut self, h: HiveName, key: &str, name: &str) -> Result<Option<Data>> {
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
fn package_id(inf_name: &str, arch: &str, files: &[PathBuf]) -> Result<String> {
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
fn stage(
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

fn plan_in_box(p: &mut Planner, d: &Device, service: &str) -> Result<()> {
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

fn critical_device(p: &mut Planner, id: &str, service: &str, guid: &str) -> Result<()> {
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

fn plan_package(
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
fn addreg(p: &mut Planner, l: &RegLine, svc_key: &str, inf: &str, why: &str) -> Result<()> {
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

/// A static IPv4 configuration of the old NIC.
#[derive(Debug, Clone, PartialEq)]
struct Ipv4 {
    interface: String,
    address: String,
    mask: String,
    gateway: Option<String>,
    dns: Vec<String>,
}

/// The first interface of the Tcpip service with DHCP off and an address.
fn static_ipv4(p: &mut Planner) -> Result<Option<Ipv4>> {
    let base = format!("{}\\Services\\Tcpip\\Parameters\\Interfaces", p.cs);
    let Some(snap) = p
        .vol
        .system
        .export(&base, Some(2))
        .with_context(|| format!("reading SYSTEM\\{base}"))?
    else {
        return Ok(None);
    };
    let mut found: Vec<Ipv4> = Vec::new();
    for k in snap.keys.values() {
        if k.path.eq_ignore_ascii_case(&base)
            || k.get("EnableDHCP").and_then(Data::as_dword) != Some(0)
        {
            continue;
        }
        let first = |n: &str| {
            k.get(n)
                .and_then(Data::as_list)
                .and_then(|l| l.into_iter().find(|s| !s.is_empty() && s != "0.0.0.0"))
        };
        let (Some(address), Some(mask)) = (first("IPAddress"), first("SubnetMask")) else {
            continue;
        };
        let dns = k
            .get("NameServer")
            .and_then(Data::as_str)
            .map(|s| {
                s.split([',', ' '])
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        found.push(Ipv4 {
            interface: k.path.rsplit('\\').next().unwrap_or("").to_string(),
            address,
            mask,
            gateway: first("DefaultGateway"),
            dns,
        });
    }
    for other in found.iter().skip(1) {
        p.plan.notes.push(format!(
            "static IPv4 {} of interface {} not carried: only the first static interface is",
            other.address, other.interface
        ));
    }
    Ok(found.into_iter().next())
}

fn plan_first_boot(p: &mut Planner, ipv4: Option<&Ipv4>) -> Result<()> {
    let cs = p.cs.clone();
    let sw = HiveName::Software;
    let cv = "Microsoft\\Windows\\CurrentVersion";
    let ours = format!("%SystemRoot%\\{STAGING}");
    let current = p.value(sw, cv, "DevicePath")?;
    let mut parts: Vec<String> = current
        .as_ref()
        .and_then(Data::as_str)
        .unwrap_or("%SystemRoot%\\inf")
        .split(';')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if !parts.iter().any(|s| s.eq_ignore_ascii_case(&ours)) {
        parts.push(ours);
    }
    p.set(
        sw,
        cv,
        "DevicePath",
        Data::ExpandSz(parts.join(";")),
        "PnP looks for drivers of new devices in the staged packages",
    )?;
    let crash = format!("{cs}\\Control\\CrashControl");
    let auto_reboot = p.first_original(HiveName::System, &crash, "AutoReboot")?;
    let script = first_boot_script(
        &p.plan.staged,
        p.vol.target.build,
        ipv4,
        auto_reboot.as_ref(),
    );
    let path = p.vol.windows.join(STAGING).join(FIRSTBOOT);
    p.file(
        &path,
        Source::Text(script),
        "first boot: pnputil installs the staged packages, the old static IPv4 is carried",
    )?;
    p.set(
        sw,
        &format!("{cv}\\RunOnce"),
        RUNONCE_VALUE,
        Data::Sz(format!(
            "cmd.exe /c \"%SystemRoot%\\{STAGING}\\{FIRSTBOOT}\""
        )),
        "run the first-boot script once",
    )?;
    p.set(
        HiveName::System,
        &crash,
        "AutoReboot",
        Data::Dword(0),
        "a stop error at first boot stays on screen instead of a reboot loop (the first-boot \
         script restores the old value)",
    )
}

/// The first-boot script (CRLF: cmd.exe's labels and blocks misparse LF-only files).
fn first_boot_script(
    staged: &[String],
    build: u32,
    ipv4: Option<&Ipv4>,
    auto_reboot: Option<&Data>,
) -> String {
    let mut s = vec![
        "@echo off".to_string(),
        "rem bmr first boot: installs the driver packages the restore staged, then removes itself."
            .to_string(),
        "rem Written by drivers-inject; record.json beside it lists every offline change.".into(),
        "setlocal".into(),
        format!("set \"BMR=%SystemRoot%\\{STAGING}\""),
        "set \"LOG=%BMR%\\firstboot.log\"".into(),
        "echo [%DATE% %TIME%] bmr first boot >> \"%LOG%\"".into(),
    ];
    for inf in staged {
        let rel = inf
            .strip_prefix(&format!("{STAGING}/"))
            .unwrap_or(inf)
            .replace('/', "\\");
        // pnputil's /add-driver syntax is Windows 10 1607 and later; -i -a before.
        let cmd = if build >= 14393 {
            format!("pnputil /add-driver \"%BMR%\\{rel}\" /install")
        } else {
            format!("pnputil -i -a \"%BMR%\\{rel}\"")
        };
        s.push(format!("{cmd} >> \"%LOG%\" 2>&1"));
        s.push(format!(
            "echo pnputil {rel}: exit %ERRORLEVEL% >> \"%LOG%\""
        ));
    }
    if let Some(ip) = ipv4 {
        s.push(format!(
            "rem The static IPv4 of the old NIC {}, set on the first connected adapter (a \
             heuristic: netsh's English \"Connected\" state, the first one listed).",
            ip.interface
        ));
        s.push("set \"BMR_IF=\"".into());
        s.push(
            "for /f \"skip=3 tokens=1,2,3*\" %%a in ('netsh interface show interface') do if /i \
             \"%%b\"==\"Connected\" if not defined BMR_IF set \"BMR_IF=%%d\""
                .into(),
        );
        s.push("if defined BMR_IF (".into());
        let gw = ip
            .gateway
            .as_ref()
            .map(|g| format!(" {g} 1"))
            .unwrap_or_default();
        s.push(format!(
            "  netsh interface ip set address name=\"%BMR_IF%\" static {} {}{gw} >> \"%LOG%\" 2>&1",
            ip.address, ip.mask
        ));
        for (i, d) in ip.dns.iter().enumerate() {
            if i == 0 {
                s.push(format!(
                    "  netsh interface ip set dns name=\"%BMR_IF%\" static {d} primary >> \"%LOG%\" 2>&1"
                ));
            } else {
                s.push(format!(
                    "  netsh interface ip add dns name=\"%BMR_IF%\" {d} index={} >> \"%LOG%\" 2>&1",
                    i + 1
                ));
            }
        }
        s.push(") else (".into());
        s.push(format!(
            "  echo no connected adapter: static IPv4 {} not set >> \"%LOG%\"",
            ip.address
        ));
        s.push(")".into());
    }
    let crash = "HKLM\\SYSTEM\\CurrentControlSet\\Control\\CrashControl";
    s.push(match auto_reboot {
        Some(Data::Dword(v)) => {
            format!("reg add \"{crash}\" /v AutoReboot /t REG_DWORD /d {v} /f >> \"%LOG%\" 2>&1")
        }
        _ => format!("reg delete \"{crash}\" /v AutoReboot /f >> \"%LOG%\" 2>&1"),
    });
    s.push("echo [%DATE% %TIME%] done >> \"%LOG%\"".into());
    s.push("(goto) 2>nul & del \"%~f0\"".into());
    let mut out = s.join("\r\n");
    out.push_str("\r\n");
    out
}

/// Writes `bytes` to `path` through a temporary file beside it.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".bmr-tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// A value read back after a merge: key, name, data (None: absent).
type Expected = (String, String, Option<Data>);

/// Edits `hive` through a copy: merge, check every value by reading the copy back, then write
/// the copy's bytes over the hive in place (its NTFS security descriptor is kept).
fn edit_hive(vol: &WindowsVolume, h: HiveName, edits: &[Edit], expect: &[Expected]) -> Result<()> {
    if edits.is_empty() {
        return Ok(());
    }
    let hive = hive_of(vol, h);
    let staging = vol.windows.join(STAGING);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let tmp = staging.join(format!("{}.bmr-tmp", h.file()));
    std::fs::copy(&hive.path, &tmp)
        .with_context(|| format!("copying {} to {}", hive.path.display(), tmp.display()))?;
    let work = Hive::new(&tmp, &hive.prefix);
    let result = merge_checked(&work, h, edits, expect, &hive.path);
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Merges into the working copy, reads every expected value back from it, then writes its
/// bytes over `target`.
fn merge_checked(
    work: &Hive,
    h: HiveName,
    edits: &[Edit],
    expect: &[Expected],
    target: &Path,
) -> Result<()> {
    work.merge(edits)
        .with_context(|| format!("editing the {} hive", h.file()))?;
    for (key, name, want) in expect {
        let got = work.value(key, name)?;
        if &got != want {
            bail!(
                "{}\\{key} value {name:?}: read back {got:?} after the merge, expected {want:?}",
                h.file()
            );
        }
    }
    let bytes =
        std::fs::read(&work.path).with_context(|| format!("reading {}", work.path.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(target)
        .with_context(|| format!("opening {} for writing", target.display()))?;
    std::io::Write::write_all(&mut f, &bytes)
        .with_context(|| format!("writing {}", target.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", target.display()))
}

/// Applies `plan` (from [`plan`] on this volume): files first, then each hive, then the record
/// (appended to `Windows/bmr-drivers/record.json`). The first time a hive is edited its
/// original bytes are kept in `Windows/bmr-drivers/originals/`.
pub fn apply(vol: &WindowsVolume, plan: &Plan) -> Result<()> {
    if plan.is_empty() {
        return Ok(());
    }
    let root = &vol.root;
    for f in &plan.files {
        let dest = root.join(&f.path);
        if let Some(o) = &f.original {
            let keep = root.join(o);
            if !keep.exists() {
                if let Some(d) = keep.parent() {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("creating {}", d.display()))?;
                }
                std::fs::copy(&dest, &keep)
                    .with_context(|| format!("keeping the original of {}", f.path))?;
            }
        }
        match &f.source {
            Source::Copy(src) => {
                let b = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                write_file(&dest, &b)?;
            }
            Source::Text(t) => write_file(&dest, t.as_bytes())?,
        }
    }
    for h in [HiveName::System, HiveName::Software] {
        let mut edits: Vec<Edit> = plan
            .keys_created
            .iter()
            .filter(|k| k.hive == h)
            .map(|k| Edit::Key { key: k.key.clone() })
            .collect();
        let mut expect = Vec::new();
        for w in plan.registry.iter().filter(|w| w.hive == h) {
            edits.push(Edit::Set {
                key: w.key.clone(),
                name: w.name.clone(),
                data: w.data.clone(),
            });
            expect.push((w.key.clone(), w.name.clone(), Some(w.data.clone())));
        }
        if edits.is_empty() {
            continue;
        }
        let keep = vol.windows.join(STAGING).join("originals").join(h.file());
        if !keep.exists() {
            if let Some(d) = keep.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            std::fs::copy(&hive_of(vol, h).path, &keep)
                .with_context(|| format!("keeping the original {} hive", h.file()))?;
        }
        edit_hive(vol, h, &edits, &expect)?;
    }
    let mut record = read_record(vol)?;
    record.push(plan.clone());
    let json = serde_json::to_vec_pretty(&record).context("encoding the record")?;
    write_file(&vol.windows.join(STAGING).join(RECORD), &json)
}

/// Plans and (unless `opts.dry_run`) applies the injection; returns the plan.
pub fn inject(vol: &WindowsVolume, devices: &[Device], opts: &Options) -> Result<Plan> {
    let p = plan(vol, devices, opts)?;
    if !opts.dry_run {
        apply(vol, &p)?;
    }
    Ok(p)
}

/// Undoes every recorded injection, newest first: values back to their originals (or
/// deleted), created keys deleted, replaced files restored from `originals/`, new files
/// removed. The record is renamed `record.rolled-back.json`. Returns the plans undone.
pub fn rollback(vol: &WindowsVolume) -> Result<Vec<Plan>> {
    let record = read_record(vol)?;
    let root = &vol.root;
    for plan in record.iter().rev() {
        for h in [HiveName::System, HiveName::Software] {
            let mut edits = Vec::new();
            let mut expect = Vec::new();
            for w in plan.registry.iter().rev().filter(|w| w.hive == h) {
                edits.push(match &w.original {
                    Some(d) => Edit::Set {
                        key: w.key.clone(),
                        name: w.name.clone(),
                        data: d.clone(),
                    },
                    None => Edit::Delete {
                        key: w.key.clone(),
                        name: w.name.clone(),
                    },
                });
                let created = plan
                    .keys_created
                    .iter()
                    .any(|k| k.hive == h && k.key.eq_ignore_ascii_case(&w.key));
                if !created {
                    expect.push((w.key.clone(), w.name.clone(), w.original.clone()));
                }
            }
            for k in plan.keys_created.iter().rev().filter(|k| k.hive == h) {
                edits.push(Edit::DeleteKey { key: k.key.clone() });
            }
            edit_hive(vol, h, &edits, &expect)?;
        }
        for f in plan.files.iter().rev() {
            let dest = root.join(&f.path);
            match &f.original {
                Some(o) => {
                    let b = std::fs::read(root.join(o))
                        .with_context(|| format!("reading the original of {} ({o})", f.path))?;
                    write_file(&dest, &b)?;
                }
                None => match std::fs::remove_file(&dest) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", f.path));
                    }
                    _ => {}
                },
            }
        }
    }
    let rec = vol.windows.join(STAGING).join(RECORD);
    if rec.exists() {
        std::fs::rename(
            &rec,
            vol.windows.join(STAGING).join("record.rolled-back.json"),
        )
        .with_context(|| format!("renaming {}", rec.display()))?;
    }
    Ok(record)
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

    #[test]
    fn first_boot_script_shape() {
        let ip = Ipv4 {
            interface: "{1}".into(),
            address: "10.0.0.5".into(),
            mask: "255.255.255.0".into(),
            gateway: Some("10.0.0.1".into()),
            dns: vec!["10.0.0.2".into(), "10.0.0.3".into()],
        };
        let s = first_boot_script(
            &["bmr-drivers/netkvm/netkvm.inf".into()],
            17763,
            Some(&ip),
            Some(&Data::Dword(1)),
        );
        assert!(s.contains("pnputil /add-driver \"%BMR%\\netkvm\\netkvm.inf\" /install"));
        assert!(s.contains("static 10.0.0.5 255.255.255.0 10.0.0.1 1"));
        assert!(s.contains("add dns name=\"%BMR_IF%\" 10.0.0.3 index=2"));
        assert!(s.contains("/v AutoReboot /t REG_DWORD /d 1 /f"));
        assert!(s.ends_with("del \"%~f0\"\r\n"));
        assert!(!s.replace("\r\n", "").contains('\n'), "CRLF only");
        let old = first_boot_script(&["bmr-drivers/v/v.inf".into()], 7601, None, None);
        assert!(old.contains("pnputil -i -a \"%BMR%\\v\\v.inf\""));
        assert!(old.contains("reg delete"));
    }
}
