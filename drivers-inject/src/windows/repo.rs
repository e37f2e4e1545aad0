//! A driver repository: folders of Windows driver packages (`.inf` with its `.sys` and `.cat`,
//! as virtio-win or a vendor ships them), indexed once, asked for the best package for a device
//! on a given Windows. The choice follows Windows' own: the models section whose target
//! decoration (`NTamd64.10.0...14393`) best fits the OS, then the lowest rank (which of the
//! device's IDs matched, hardware before compatible, and whether the INF listed it as the
//! model's hardware ID or as a compatible one), then the newest `DriverVer`.

use super::hwid::PciIds;
use super::inf::{Inf, Line};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The restored Windows, as its SOFTWARE hive describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowsTarget {
    /// `amd64`, `x86`, `arm64`.
    pub arch: String,
    pub major: u32,
    pub minor: u32,
    pub build: u32,
    /// 1 workstation, 2 domain controller, 3 server.
    pub product_type: u32,
}

impl WindowsTarget {
    /// Windows Server 2019 on x64 (the tests' default).
    pub fn server_2019() -> WindowsTarget {
        WindowsTarget {
            arch: "amd64".into(),
            major: 10,
            minor: 0,
            build: 17763,
            product_type: 3,
        }
    }
}

#[derive(Debug)]
pub struct Package {
    pub inf_path: PathBuf,
    pub inf: Inf,
    pub class: String,
    pub class_guid: String,
    pub provider: String,
    /// `DriverVer` date as (year, month, day) and version (4 parts), for the newest-first rule.
    pub date: (u32, u32, u32),
    pub version: [u32; 4],
    pub catalog: Option<String>,
}

/// One device entry of a package that matches a device.
#[derive(Debug)]
pub struct Candidate<'r> {
    pub package: &'r Package,
    pub description: String,
    /// The DDInstall section for this OS (decoration resolved).
    pub install: String,
    /// The device's ID that matched.
    pub matched: String,
    /// Lower is better.
    pub rank: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CopyFile {
    pub name: String,
    pub source: String,
    /// Destination directory id (12: `System32\drivers`).
    pub dirid: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegLine {
    pub root: String,
    pub subkey: String,
    pub name: String,
    pub flags: u32,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    /// `AddService` flags (0x2: the device's function driver).
    pub flags: u32,
    pub service_type: u32,
    pub start_type: u32,
    pub error_control: u32,
    pub binary: String,
    pub group: Option<String>,
    pub addreg: Vec<RegLine>,
}

/// What installing a candidate does, from its INF.
#[derive(Debug, Clone, Default)]
pub struct Install {
    pub section: String,
    pub files: Vec<CopyFile>,
    pub services: Vec<Service>,
    pub addreg: Vec<RegLine>,
    /// `Include`d INFs not in the package (system INFs such as `machine.inf`), with the
    /// `Needs` sections taken from them: Windows has them, the plan says so.
    pub system_needs: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Repo {
    pub packages: Vec<Package>,
    /// INFs that could not be read, with why (a broken file never hides the others).
    pub errors: Vec<(PathBuf, String)>,
}

fn number(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn driver_ver(s: &str) -> ((u32, u32, u32), [u32; 4]) {
    let mut parts = s.split(',');
    let date: Vec<u32> = parts
        .next()
        .unwrap_or("")
        .trim()
        .split('/')
        .filter_map(|p| p.parse().ok())
        .collect();
    let mut version = [0; 4];
    for (i, p) in parts
        .next()
        .unwrap_or("")
        .trim()
        .split('.')
        .take(4)
        .enumerate()
    {
        version[i] = p.parse().unwrap_or(0);
    }
    match date[..] {
        [m, d, y] => ((y, m, d), version),
        _ => ((0, 0, 0), version),
    }
}

/// How well a models-section decoration fits `os`: `None` when it does not apply, else a key
/// that orders better fits higher. `NT[arch][.major[.minor[.type[.suite[.build]]]]]`.
pub fn decoration_fit(dec: &str, os: &WindowsTarget) -> Option<(bool, u64, u32, bool)> {
    let d = dec.to_ascii_lowercase();
    let rest = d.strip_prefix("nt")?;
    let mut parts = rest.split('.');
    let arch = parts.next().unwrap_or("");
    if !arch.is_empty() && arch != os.arch {
        return None;
    }
    let field = |p: Option<&str>| p.filter(|s| !s.is_empty()).map(number);
    let major = field(parts.next());
    let minor = field(parts.next());
    let ptype = field(parts.next());
    let _suite = parts.next();
    let build = field(parts.next());
    // A field that is not a number (`NTamd64.6.3x`): the decoration applies to no Windows.
    let (Some(major), Some(minor), Some(ptype), Some(build)) = (
        major.map_or(Some(None), |v| v.map(Some)),
        minor.map_or(Some(None), |v| v.map(Some)),
        ptype.map_or(Some(None), |v| v.map(Some)),
        build.map_or(Some(None), |v| v.map(Some)),
    ) else {
        return None;
    };
    let (maj, min) = (major.unwrap_or(0), minor.unwrap_or(0));
    if (maj, min) > (os.major, os.minor) {
        return None;
    }
    if ptype.is_some_and(|p| p != os.product_type) {
        return None;
    }
    if build.is_some_and(|b| b > os.build) {
        return None;
    }
    Some((
        !arch.is_empty(),
        u64::from(maj) * 1000 + u64::from(min),
        build.unwrap_or(0),
        ptype.is_some(),
    ))
}

impl Package {
    pub fn read(path: &Path) -> Result<Package> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let inf = Inf::parse(&bytes)?;
        let dv = inf
            .values("Version", "DriverVer")
            .next()
            .map(|l| l.values.join(","))
            .unwrap_or_default();
        let (date, version) = driver_ver(&dv);
        Ok(Package {
            class: inf.get("Version", "Class").unwrap_or("").to_string(),
            class_guid: inf.get("Version", "ClassGUID").unwrap_or("").to_string(),
            provider: inf.get("Version", "Provider").unwrap_or("").to_string(),
            catalog: inf
                .get("Version", "CatalogFile.NTamd64")
                .or_else(|| inf.get("Version", "CatalogFile"))
                .map(str::to_string),
            inf_path: path.to_path_buf(),
            date,
            version,
            inf,
        })
    }

    /// The models sections that apply to `os`, one per manufacturer.
    pub fn models_sections(&self, os: &WindowsTarget) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.inf.section("Manufacturer").unwrap_or(&[]) {
            let Some(base) = l.values.first().filter(|b| !b.is_empty()) else {
                continue;
            };
            let best = l.values[1..]
                .iter()
                .filter_map(|d| decoration_fit(d, os).map(|k| (k, d)))
                .max_by_key(|(k, _)| *k)
                .map(|(_, d)| format!("{base}.{d}"));
            match best {
                Some(s) if self.inf.has(&s) => out.push(s),
                Some(_) => {}
                None if self.inf.has(base) => out.push(base.clone()),
                None => {}
            }
        }
        out
    }

    /// The DDInstall section `base` resolves to on `os`: `base.NTamd64`, `base.NT`, or `base`.
    pub fn install_section(&self, base: &str, os: &WindowsTarget) -> String {
        [format!("{base}.NT{}", os.arch), format!("{base}.NT")]
            .into_iter()
            .find(|s| self.inf.has(s))
            .unwrap_or_else(|| base.to_string())
    }

    /// What installing DDInstall section `section` does.
    pub fn install(&self, section: &str, repo: &Repo) -> Result<Install> {
        let inf = &self.inf;
        let mut out = Install {
            section: section.to_string(),
            ..Default::default()
        };
        // Needs = sections of included INFs (or this one), processed like ours.
        let includes = inf.list(section, "Include");
        let mut sections: Vec<(&Package, String)> = vec![(self, section.to_string())];
        for need in inf.list(section, "Needs") {
            let from = std::iter::once(self)
                .chain(includes.iter().filter_map(|i| repo.sibling(self, i)))
                .find(|p| p.inf.has(&need));
            match from {
                Some(p) => sections.push((p, need)),
                None => out.system_needs.push(format!(
                    "{need} (from {})",
                    if includes.is_empty() {
                        "a system INF".to_string()
                    } else {
                        includes.join(", ")
                    }
                )),
            }
        }
        for (p, s) in &sections {
            out.files.extend(p.copy_files(s));
            out.addreg.extend(p.addreg(s));
            out.services.extend(p.services(&format!("{s}.Services"))?);
        }
        Ok(out)
    }

    fn copy_files(&self, section: &str) -> Vec<CopyFile> {
        let inf = &self.inf;
        let default_dir = inf
            .get("DestinationDirs", "DefaultDestDir")
            .unwrap_or("12")
            .to_string();
        let mut out = Vec::new();
        for entry in inf.list(section, "CopyFiles") {
            if let Some(file) = entry.strip_prefix('@') {
                out.push(CopyFile {
                    name: file.to_string(),
                    source: file.to_string(),
                    dirid: default_dir.clone(),
                });
                continue;
            }
            let dirid = inf
                .get("DestinationDirs", &entry)
                .unwrap_or(&default_dir)
                .to_string();
            for l in inf.section(&entry).unwrap_or(&[]) {
                let name = l.key.clone().unwrap_or_else(|| l.value(0).to_string());
                let source = match l.key {
                    Some(_) => l.value(0),
                    None => l.value(1),
                };
                out.push(CopyFile {
                    source: if source.is_empty() {
                        name.clone()
                    } else {
                        source.to_string()
                    },
                    name,
                    dirid: dirid.clone(),
                });
            }
        }
        out
    }

    fn addreg(&self, section: &str) -> Vec<RegLine> {
        let mut out = Vec::new();
        for s in self.inf.list(section, "AddReg") {
            for l in self.inf.section(&s).unwrap_or(&[]) {
                out.push(reg_line(l));
            }
        }
        out
    }

    fn services(&self, section: &str) -> Result<Vec<Service>> {
        let inf = &self.inf;
        let mut out = Vec::new();
        for l in inf.values(section, "AddService") {
            let name = l.value(0).to_string();
            let flags = number(l.value(1)).unwrap_or(0);
            let sis = l.value(2);
            let get = |k: &str| inf.get(sis, k).unwrap_or("");
            let num = |k: &str| {
                number(get(k)).with_context(|| {
                    format!(
                        "{}: [{sis}] of service {name}: {k} is missing or not a number",
                        self.inf_path.display()
                    )
                })
            };
            out.push(Service {
                service_type: num("ServiceType")?,
                start_type: num("StartType")?,
                error_control: num("ErrorControl")?,
                binary: get("ServiceBinary").to_string(),
                group: Some(get("LoadOrderGroup").to_string()).filter(|g| !g.is_empty()),
                addreg: self.addreg(sis),
                name,
                flags,
            });
        }
        Ok(out)
    }
}

fn reg_line(l: &Line) -> RegLine {
    // `HKR, subkey, name, flags, value...`: the first field may stand left of no `=`.
    let mut v: Vec<String> = l.key.iter().cloned().chain(l.values.clone()).collect();
    v.resize(v.len().max(4), String::new());
    RegLine {
        root: v[0].clone(),
        subkey: v[1].clone(),
        name: v[2].clone(),
        flags: number(&v[3]).unwrap_or(0),
        values: v[4..].to_vec(),
    }
}

impl Repo {
    /// Indexes every `.inf` under `dir` (recursively).
    pub fn scan(dir: &Path) -> Result<Repo> {
        let mut repo = Repo::default();
        let mut stack = vec![dir.to_path_buf()];
        let mut infs = Vec::new();
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("inf")) {
                    infs.push(p);
                }
            }
        }
        infs.sort();
        for p in infs {
            match Package::read(&p) {
                Ok(pkg) => repo.packages.push(pkg),
                Err(e) => repo.errors.push((p, format!("{e:#}"))),
            }
        }
        Ok(repo)
    }

    /// A package in the same folder as `p` whose INF file is named `name`.
    fn sibling(&self, p: &Package, name: &str) -> Option<&Package> {
        let dir = p.inf_path.parent()?;
        self.packages.iter().find(|q| {
            q.inf_path.parent() == Some(dir)
                && q.inf_path
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy().eq_ignore_ascii_case(name))
        })
    }

    /// Every package entry that matches `dev` on `os`, best first.
    pub fn candidates(&self, dev: &PciIds, os: &WindowsTarget) -> Vec<Candidate<'_>> {
        let ids = dev.ids();
        let mut out = Vec::new();
        for p in &self.packages {
            for models in p.models_sections(os) {
                for l in p.inf.section(&models).unwrap_or(&[]) {
                    let (Some(desc), Some(install)) = (&l.key, l.values.first()) else {
                        continue;
                    };
                    let mut best: Option<(u32, &String)> = None;
                    for (field, inf_id) in l.values.iter().enumerate().skip(1) {
                        let Some(i) = ids.iter().position(|d| d.eq_ignore_ascii_case(inf_id))
                        else {
                            continue;
                        };
                        let rank = i as u32 * 2 + u32::from(field > 1);
                        if best.is_none_or(|(r, _)| rank < r) {
                            best = Some((rank, &ids[i]));
                        }
                    }
                    if let Some((rank, matched)) = best {
                        out.push(Candidate {
                            package: p,
                            description: desc.clone(),
                            install: p.install_section(install, os),
                            matched: matched.clone(),
                            rank,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| {
            a.rank
                .cmp(&b.rank)
                .then(b.package.date.cmp(&a.package.date))
                .then(b.package.version.cmp(&a.package.version))
                .then(a.package.inf_path.cmp(&b.package.inf_path))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::windows::hwid::in_box;

    /// viostor as virtio-win ships it, one folder per Windows version.
    fn viostor(os_dec: &str, date: &str) -> String {
        format!(
            r#";-------------------------------------------------------------------------------
; VIOSTOR.INF
;
; VirtIO block storage device driver
;
; Copyright (c) 2007-2024 Red Hat Inc.
;-------------------------------------------------------------------------------

[Version]
Signature="$Windows NT$"
Class=SCSIAdapter
ClassGUID={{4D36E97B-E325-11CE-BFC1-08002BE10318}}
Provider=%VENDOR%
DriverVer = {date},100.95.104.26000
CatalogFile = viostor.cat
DriverPackageType = PlugAndPlay
PnpLockdown = 1

[DestinationDirs]
DefaultDestDir = 12 ; DIRID_DRIVERS

[SourceDisksNames]
1 = %DiskId1%,,,""

[SourceDisksFiles]
viostor.sys = 1,,

[Manufacturer]
%VENDOR%=VENDOR,{os_dec}

[VENDOR.{os_dec}]
%RHELScsi.DeviceDesc% = rhelscsi_inst, PCI\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00, PCI\VEN_1AF4&DEV_1001
%RHELScsi.DeviceDesc% = rhelscsi_inst, PCI\VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01

[rhelscsi_inst]
CopyFiles=rhelscsi_files

[rhelscsi_files]
viostor.sys,,,2

[rhelscsi_inst.HW]
AddReg = pnpsafe_pci_addreg_msix

[rhelscsi_inst.Services]
AddService = viostor, 0x00000002 , rhelscsi_Service_Inst, rhelscsi_EventLog_Inst

[rhelscsi_Service_Inst]
ServiceType    = %SERVICE_KERNEL_DRIVER%
StartType      = %SERVICE_BOOT_START%
ErrorControl   = %SERVICE_ERROR_NORMAL%
ServiceBinary  = %12%\viostor.sys
LoadOrderGroup = SCSI miniport
AddReg         = pnpsafe_pci_addreg

[pnpsafe_pci_addreg]
HKR, "Parameters\PnpInterface", "5", %REG_DWORD%, 0x00000001
HKR, "Parameters", "BusType", %REG_DWORD%, 0x00000001

[pnpsafe_pci_addreg_msix]
HKR, "Interrupt Management",, 0x00000010
HKR, "Interrupt Management\MessageSignaledInterruptProperties",, 0x00000010

[Strings]
SERVICE_KERNEL_DRIVER = 1
SERVICE_BOOT_START = 0
SERVICE_ERROR_NORMAL = 1
REG_DWORD = 0x00010001
VENDOR = "Red Hat, Inc."
DiskId1 = "Red Hat VirtIO SCSI controller Installation Disk #1"
RHELScsi.DeviceDesc = "Red Hat VirtIO SCSI controller"
"#
        )
    }

    const NETKVM: &str = r#"[Version]
Signature = "$Windows NT$"
Class = Net
ClassGUID = {4d36e972-e325-11ce-bfc1-08002be10318}
Provider = %VENDOR%
DriverVer = 05/06/2024,100.95.104.26000

[Manufacturer]
%VENDOR% = NetKVM, NTamd64.10.0...16299

[NetKVM.NTamd64.10.0...16299]
%NetKVM.DeviceDesc% = kvmnet6.ndi, PCI\VEN_1AF4&DEV_1000&SUBSYS_0001_INX_SUBSYS_VENDOR_ID&REV_00, \
                                   PCI\VEN_1AF4&DEV_1000
%NetKVM.DeviceDesc% = kvmnet6.ndi, PCI\VEN_1AF4&DEV_1041&SUBSYS_11001AF4&REV_01

[kvmnet6.ndi]
Characteristics = 0x84
CopyFiles = @netkvm.sys

[kvmnet6.ndi.Services]
AddService = netkvm, 2, kvmnet6.Service

[kvmnet6.Service]
DisplayName = %NetKVM.Service.DispName%
ServiceType = 1
StartType = 3
ErrorControl = 1
ServiceBinary = %12%\netkvm.sys

[Strings.0409]
NetKVM.DeviceDesc = "Red Hat VirtIO Ethernet Adapter"
NetKVM.Service.DispName = "Red Hat VirtIO Ethernet Adapter Service"

[Strings]
VENDOR = "Red Hat, Inc."
NetKVM.DeviceDesc = "VirtIO Ethernet"
"#;

    /// A vendor RAID driver: decorated DDInstall, Include/Needs, a second INF in the package.
    const RAID: &str = r#"; Copyright (c) Example Storage Corp.
[version]
signature = "$Windows NT$"
Class     = SCSIAdapter
ClassGUID = {4D36E97B-E325-11CE-BFC1-08002BE10318}
Provider  = %ESC%
DriverVer = 11/20/2023, 7.727.2.0
CatalogFile.NTamd64 = esraid.cat

[DestinationDirs]
DefaultDestDir = 12

[Manufacturer]
%ESC% = ESC, NTamd64.10.0...14393, NTamd64.6.3

[ESC.NTamd64.10.0...14393]
%ESRAID_9400.DeviceDesc% = esraid_inst, PCI\VEN_1000&DEV_00AF&SUBSYS_40001000
%ESRAID_GEN.DeviceDesc%  = esraid_inst, PCI\VEN_1000&DEV_00AF
%ESRAID_CLS.DeviceDesc%  = esraid_inst, PCI\VEN_1000&DEV_FFFF, PCI\CC_0104

[ESC.NTamd64.6.3]
%ESRAID_GEN.DeviceDesc%  = esraid_inst, PCI\VEN_1000&DEV_00AF

[esraid_inst.NTamd64]
Include = esrcommon.inf, machine.inf
Needs = esr_common.Install, PciIoSpaceNotRequired
CopyFiles = esraid_copy

[esraid_inst]
CopyFiles = wrong_undecorated

[esraid_copy]
esraid.sys

[esraid_inst.NTamd64.Services]
AddService = esraid, %SPSVCINST_ASSOCSERVICE%, esraid_Service_Inst

[esraid_Service_Inst]
ServiceType    = %SERVICE_KERNEL_DRIVER%
StartType      = %SERVICE_BOOT_START%
ErrorControl   = %SERVICE_ERROR_NORMAL%
ServiceBinary  = %12%\esraid.sys
LoadOrderGroup = SCSI Miniport
AddReg         = esraid_service_reg

[esraid_service_reg]
HKR, "Parameters\PnpInterface", "5", 0x00010001, 1
HKR, "Parameters\Device", "DriverParameter", 0x00000000, "nobusreset=1;"

[Strings]
ESC = "Example Storage Corp."
ESRAID_9400.DeviceDesc = "ES RAID 9400 Adapter"
ESRAID_GEN.DeviceDesc = "ES RAID Adapter"
ESRAID_CLS.DeviceDesc = "ES RAID (class)"
SPSVCINST_ASSOCSERVICE = 0x00000002
SERVICE_KERNEL_DRIVER = 1
SERVICE_BOOT_START = 0
SERVICE_ERROR_NORMAL = 1

[Strings.0409]
ESRAID_9400.DeviceDesc = "ES RAID 9400-16i Adapter"
"#;

    const RAID_COMMON: &str = "[Version]\nSignature=\"$Windows NT$\"\n\n[esr_common.Install]\nCopyFiles = esr_common_files\nAddReg = esr_common_reg\n\n[esr_common_files]\nesrlib.sys\n\n[esr_common_reg]\nHKR,,\"CommonSetting\",0x00010001,7\n";

    fn utf16le(s: &str) -> Vec<u8> {
        let mut v = vec![0xFF, 0xFE];
        for u in s.encode_utf16() {
            v.extend_from_slice(&u.to_le_bytes());
        }
        v
    }

    fn repo() -> (tempfile::TempDir, Repo) {
        let t = tempfile::tempdir().unwrap();
        let put = |rel: &str, bytes: &[u8]| {
            let p = t.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        };
        put(
            "viostor/2k19/amd64/viostor.inf",
            viostor("NTamd64.10.0...17763", "07/15/2024").as_bytes(),
        );
        put(
            "viostor/2k12R2/amd64/viostor.inf",
            viostor("NTamd64.6.3", "01/10/2022").as_bytes(),
        );
        put("NetKVM/2k19/amd64/netkvm.inf", &utf16le(NETKVM));
        put("esraid/esraid.INF", &utf16le(RAID));
        put("esraid/esrcommon.inf", RAID_COMMON.as_bytes());
        put("broken/bad.inf", b"Signature = x\n[Version]\n");
        let r = Repo::scan(t.path()).unwrap();
        (t, r)
    }

    fn dev(modalias: &str, rev: u8) -> PciIds {
        PciIds::from_modalias(modalias, rev).unwrap()
    }

    const VIRTIO_BLK: &str = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00";

    #[test]
    fn viostor_for_server_2019_and_2012_r2() {
        let (_t, r) = repo();
        assert_eq!(r.packages.len(), 5);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].0.ends_with("broken/bad.inf"));
        let os = WindowsTarget::server_2019();
        let c = r.candidates(&dev(VIRTIO_BLK, 0), &os);
        // Both folders apply to 2019 with the same rank: the newer DriverVer wins.
        assert_eq!(c.len(), 2);
        assert!(c[0]
            .package
            .inf_path
            .ends_with("viostor/2k19/amd64/viostor.inf"));
        assert_eq!(c[0].rank, 0);
        assert_eq!(c[0].description, "Red Hat VirtIO SCSI controller");
        assert_eq!(c[0].package.date, (2024, 7, 15));
        assert_eq!(c[0].package.catalog.as_deref(), Some("viostor.cat"));
        let i = c[0].package.install(&c[0].install, &r).unwrap();
        assert_eq!(i.section, "rhelscsi_inst");
        assert_eq!(
            i.files,
            [CopyFile {
                name: "viostor.sys".into(),
                source: "viostor.sys".into(),
                dirid: "12".into()
            }]
        );
        let s = &i.services[0];
        assert_eq!(
            (
                s.name.as_str(),
                s.flags,
                s.service_type,
                s.start_type,
                s.error_control
            ),
            ("viostor", 2, 1, 0, 1)
        );
        assert_eq!(s.binary, "%12%\\viostor.sys");
        assert_eq!(s.group.as_deref(), Some("SCSI miniport"));
        assert_eq!(s.addreg.len(), 2);
        assert_eq!(
            s.addreg[0],
            RegLine {
                root: "HKR".into(),
                subkey: "Parameters\\PnpInterface".into(),
                name: "5".into(),
                flags: 0x10001,
                values: vec!["0x00000001".into()]
            }
        );
        // A revision the INF does not list still matches its VEN&DEV entry, ranked lower.
        let c = r.candidates(&dev(VIRTIO_BLK, 7), &os);
        assert_eq!(c[0].matched, "PCI\\VEN_1AF4&DEV_1001");
        assert_eq!(c[0].rank, 3 * 2 + 1);
        // Server 2012 R2: only the 6.3 folder's decoration applies.
        let old = WindowsTarget {
            major: 6,
            minor: 3,
            build: 9600,
            ..WindowsTarget::server_2019()
        };
        let c = r.candidates(&dev(VIRTIO_BLK, 0), &old);
        assert_eq!(c.len(), 1);
        assert!(c[0]
            .package
            .inf_path
            .ends_with("viostor/2k12R2/amd64/viostor.inf"));
        // Another architecture: nothing.
        let arm = WindowsTarget {
            arch: "arm64".into(),
            ..WindowsTarget::server_2019()
        };
        assert!(r.candidates(&dev(VIRTIO_BLK, 0), &arm).is_empty());
    }

    #[test]
    fn vendor_raid_exact_subsystem_first_with_its_includes() {
        let (_t, r) = repo();
        let os = WindowsTarget::server_2019();
        let raid = dev("pci:v00001000d000000AFsv00001000sd00004000bc01sc04i00", 1);
        let c = r.candidates(&raid, &os);
        let ranks: Vec<u32> = c.iter().map(|c| c.rank).collect();
        // The exact subsystem, the chip, then the class entry (a compatible-ID field).
        assert_eq!(ranks, [2, 6, 21]);
        assert_eq!(c[0].description, "ES RAID 9400-16i Adapter", "localized");
        assert_eq!(c[0].matched, "PCI\\VEN_1000&DEV_00AF&SUBSYS_40001000");
        assert_eq!(c[0].install, "esraid_inst.NTamd64", "decorated DDInstall");
        let i = c[0].package.install(&c[0].install, &r).unwrap();
        let files: Vec<&str> = i.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            files,
            ["esraid.sys", "esrlib.sys"],
            "Needs from the sibling INF"
        );
        assert_eq!(i.addreg[0].name, "CommonSetting");
        assert_eq!(
            i.system_needs,
            ["PciIoSpaceNotRequired (from esrcommon.inf, machine.inf)"]
        );
        let s = &i.services[0];
        assert_eq!((s.name.as_str(), s.flags, s.start_type), ("esraid", 2, 0));
        assert_eq!(s.addreg[1].values, ["nobusreset=1;"]);
        assert_eq!(c[0].package.catalog.as_deref(), Some("esraid.cat"));
        // Another RAID chip of the class: only the class entry.
        let other = dev("pci:v00001000d00001234sv00001000sd00000001bc01sc04i00", 0);
        let c = r.candidates(&other, &os);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].matched, "PCI\\CC_0104");
        assert_eq!(c[0].rank, 21);
    }

    #[test]
    fn netkvm_from_utf16_and_nvme_in_box() {
        let (_t, r) = repo();
        let os = WindowsTarget::server_2019();
        let nic = dev("pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00", 1);
        let c = r.candidates(&nic, &os);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].description, "Red Hat VirtIO Ethernet Adapter");
        assert_eq!(c[0].package.class, "Net");
        let i = c[0].package.install(&c[0].install, &r).unwrap();
        assert_eq!(i.files[0].name, "netkvm.sys");
        assert_eq!(i.services[0].start_type, 3);
        // The continued model line: its second ID is read.
        let old = dev("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00", 0);
        assert_eq!(r.candidates(&old, &os)[0].matched, "PCI\\VEN_1AF4&DEV_1000");
        let nvme = dev("pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02", 2);
        assert!(r.candidates(&nvme, &os).is_empty());
        assert_eq!(in_box(&nvme), Some("stornvme"));
    }

    #[test]
    fn decorations() {
        let os = WindowsTarget::server_2019();
        assert!(decoration_fit("NTamd64.10.0...17763", &os).is_some());
        assert!(decoration_fit("NTamd64.10.0...20348", &os).is_none());
        assert!(decoration_fit("NTx86", &os).is_none());
        assert!(
            decoration_fit("NTamd64.10.0.1", &os).is_none(),
            "workstation only"
        );
        assert!(decoration_fit("NTamd64.10.0.3", &os).is_some());
        assert!(decoration_fit("NTamd64.10.0...17763", &os) > decoration_fit("NTamd64.6.3", &os));
        assert!(decoration_fit("NTamd64", &os) > decoration_fit("NT", &os));
        // Not a number: fits no Windows (and never overflows the key; a fuzz finding).
        assert!(decoration_fit("NTamd64.6.3x", &os).is_none());
        assert!(decoration_fit("NTamd64.6.99999999999", &os).is_none());
    }
}
