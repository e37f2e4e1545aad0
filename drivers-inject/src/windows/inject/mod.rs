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
mod apply;
mod firstboot;
mod plan;

pub use apply::{apply, rollback};
pub use plan::plan;

use super::hive::Data;
use super::hwid::{in_box, PciIds};
use super::offline::WindowsVolume;
use super::repo::{Candidate, Install, Package, Repo};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

/// The records of earlier injections into this Windows (oldest first).
pub fn read_record(vol: &WindowsVolume) -> Result<Vec<Plan>> {
    let p = vol.windows.join(STAGING).join(RECORD);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Plans and (unless `opts.dry_run`) applies the injection; returns the plan.
pub fn inject(vol: &WindowsVolume, devices: &[Device], opts: &Options) -> Result<Plan> {
    let p = plan(vol, devices, opts)?;
    if !opts.dry_run {
        apply(vol, &p)?;
    }
    Ok(p)
}
