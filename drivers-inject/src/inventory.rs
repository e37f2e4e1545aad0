//! The target machine's hardware as this (boot image) kernel sees it in sysfs: PCI storage
//! controllers and NICs, the disks and the controller each hangs off, firmware and Secure Boot.

use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PciDevice {
    /// `0000:00:03.0`
    pub address: String,
    /// `vvvv:dddd`
    pub pci_id: String,
    /// `0x010802`
    pub class: String,
    pub modalias: String,
    /// PCI revision (`0x01`), part of Windows' most specific hardware ID.
    pub revision: u8,
    /// Driver bound in this kernel (the boot image's), if any.
    pub driver: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Disk {
    /// `/dev/nvme0n1`
    pub device: String,
    /// nvme, virtio, sata, scsi, usb, mmc, loop...
    pub transport: String,
    pub size_bytes: u64,
    /// PCI address of the controller it hangs off.
    pub controller: Option<String>,
    /// Every modalias on the path from the disk up to the PCI root (disk first): what a kernel
    /// needs drivers for to see this disk.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modaliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Nic {
    /// Kernel name in the boot image (`eth0`: the boot image does not rename).
    pub name: String,
    pub mac: String,
    pub pci: Option<String>,
    pub driver: Option<String>,
    /// The name systemd-udev's default policy gives it (onboard, slot, path), if computable.
    pub predictable: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Inventory {
    /// `uefi` or `bios`.
    pub firmware: String,
    pub secure_boot: Option<bool>,
    pub storage: Vec<PciDevice>,
    pub network: Vec<PciDevice>,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
}

const SECURE_BOOT_VAR: &str = "efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Whether a sysfs path component is a PCI address (`0000:00:1f.2`).
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12 && b[4] == b':' && b[7] == b':' && b[10] == b'.'
}

impl Inventory {
    /// Reads the inventory from a sysfs tree (`/sys` on a live system).
    pub fn scan(sys: &Path) -> Inventory {
        let firmware = if sys.join("firmware/efi").exists() {
            "uefi"
        } else {
            "bios"
        };
        let secure_boot = std::fs::read(sys.join("firmware").join(SECURE_BOOT_VAR))
            .ok()
            .and_then(|v| v.get(4).map(|b| *b == 1));
        let mut storage = Vec::new();
        let mut network = Vec::new();
        let pci_dir = sys.join("bus/pci/devices");
        let mut addrs: Vec<String> = std::fs::read_dir(&pci_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        addrs.sort();
        for a in addrs {
            let d = pci_dir.join(&a);
            let class = read(&d.join("class")).unwrap_or_default();
            let dev = PciDevice {
                pci_id: format!(
                    "{}:{}",
                    read(&d.join("vendor"))
                        .unwrap_or_default()
                        .trim_start_matches("0x"),
                    read(&d.join("device"))
                        .unwrap_or_default()
                        .trim_start_matches("0x")
                ),
                address: a,
                modalias: read(&d.join("modalias")).unwrap_or_default(),
                revision: read(&d.join("revision"))
                    .and_then(|r| u8::from_str_radix(r.trim_start_matches("0x"), 16).ok())
                    .unwrap_or(0),
                driver: link_name(&d.join("driver")),
                class: class.clone(),
            };
            if class.starts_with("0x01") {
                storage.push(dev);
            } else if class.starts_with("0x02") {
                network.push(dev);
            }
        }
        Inventory {
            firmware: firmware.into(),
            secure_boot,
            storage,
            network,
            disks: disks(sys),
            nics: nics(sys),
        }
    }

    /// The disk `device` (`/dev/nvme0n1`) if this inventory has it.
    pub fn disk(&self, device: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.device == device)
    }

    /// One line per controller and NIC, for the plan and the report.
    pub fn lines(&self) -> Vec<String> {
        let mut v = vec![format!(
            "firmware {}{}",
            self.firmware,
            match self.secure_boot {
                Some(true) => ", Secure Boot on",
                Some(false) => ", Secure Boot off",
                None => "",
            }
        )];
        for d in &self.disks {
            let size = if d.size_bytes >= 1 << 30 {
                format!("{} GiB", d.size_bytes >> 30)
            } else {
                format!("{} MiB", d.size_bytes >> 20)
            };
            v.push(format!(
                "disk {} ({}, {size}){}",
                d.device,
                d.transport,
                d.controller
                    .as_ref()
                    .and_then(|c| self.storage.iter().find(|s| &s.address == c))
                    .map(|c| format!(
                        " on {} {} (driver {})",
                        c.address,
                        c.pci_id,
                        c.driver.as_deref().unwrap_or("none")
                    ))
                    .unwrap_or_default()
            ));
        }
        for n in &self.nics {
            v.push(format!(
                "NIC {} {}{}{}",
                n.name,
                n.mac,
                n.pci
                    .as_ref()
                    .map(|p| format!(" at {p}"))
                    .unwrap_or_default(),
                n.driver
                    .as_ref()
                    .map(|d| format!(" (driver {d})"))
                    .unwrap_or_default()
            ));
        }
        v
    }
}

fn disks(sys: &Path) -> Vec<Disk> {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(sys.join("block"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !["ram", "zram", "sr", "fd", "dm-", "md"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    names.sort();
    for name in names {
        let b = sys.join("block").join(&name);
        if name.starts_with("loop") && read(&b.join("size")).is_none_or(|s| s == "0") {
            continue;
        }
        let dev_path = std::fs::canonicalize(b.join("device")).ok();
        let path_str = dev_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let transport = if name.starts_with("nvme") {
            "nvme"
        } else if name.starts_with("vd") {
            "virtio"
        } else if name.starts_with("loop") {
            "loop"
        } else if name.starts_with("mmcblk") {
            "mmc"
        } else if path_str.contains("/usb") {
            "usb"
        } else if path_str.contains("/ata") {
            "sata"
        } else if path_str.contains("virtio") {
            "virtio-scsi"
        } else {
            "scsi"
        };
        let mut modaliases = Vec::new();
        let mut controller = None;
        if let Some(p) = &dev_path {
            let mut cur: Option<&Path> = Some(p);
            while let Some(c) = cur {
                if !c.starts_with(sys.join("devices")) || c == sys.join("devices") {
                    break;
                }
                if let Some(m) = read(&c.join("modalias")) {
                    if !modaliases.contains(&m) {
                        modaliases.push(m);
                    }
                }
                let comp = c.file_name().map(|n| n.to_string_lossy().into_owned());
                if controller.is_none() {
                    if let Some(comp) = comp.filter(|n| is_pci_address(n)) {
                        controller = Some(comp);
                    }
                }
                cur = c.parent();
            }
        }
        let sectors: u64 = read(&b.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.push(Disk {
            device: format!("/dev/{name}"),
            transport: transport.into(),
            size_bytes: sectors * 512,
            controller,
            modaliases,
        });
    }
    out
}

fn nics(sys: &Path) -> Vec<Nic> {
    let mut out = Vec::new();
    let net = sys.join("class/net");
    for e in std::fs::read_dir(&net).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let d = net.join(&name);
        // Physical NICs only: they have a device behind them.
        let Ok(dev) = std::fs::canonicalize(d.join("device")) else {
            continue;
        };
        let pci = dev
            .ancestors()
            .filter_map(|a| a.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .find(|n| is_pci_address(n));
        let predictable = pci.as_ref().and_then(|p| predictable_name(sys, &d, p));
        out.push(Nic {
            mac: read(&d.join("address")).unwrap_or_default(),
            driver: link_name(&d.join("device/driver")),
            pci,
            predictable,
            name,
        });
    }
    out.sort_by(|a, b| a.pci.cmp(&b.pci).then(a.name.cmp(&b.name)));
    out
}

/// The name systemd-udev's default `NamePolicy=kernel database onboard slot path` gives a PCI
/// Ethernet NIC: `eno<index>` from the firmware's onboard index, else `ens<slot>` when the PCI
/// slot has a hotplug slot number, else `enp<bus>s<slot>[f<function>]` from its PCI path.
/// Devices behind bridges are named by their own address, as udev does for the common cases;
/// other cases return `None` (the adaptation then pins names by MAC instead of predicting).
fn predictable_name(sys: &Path, netdir: &Path, pci: &str) -> Option<String> {
    let dev = netdir.join("device");
    for f in ["acpi_index", "index"] {
        if let Some(i) = read(&dev.join(f)).and_then(|s| s.parse::<u32>().ok()) {
            if i > 0 && i < 16384 {
                return Some(format!("eno{i}"));
            }
        }
    }
    let (domain, rest) = pci.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, func) = rest.split_once('.')?;
    let bus = u32::from_str_radix(bus, 16).ok()?;
    let slot_n = u32::from_str_radix(slot, 16).ok()?;
    let func = u32::from_str_radix(func, 16).ok()?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let multi = func > 0 || {
        // Function 0 of a multi-function device keeps `f0`.
        let sibling = format!("{}:{:02x}:{slot}.1", &pci[..4], bus);
        sys.join("bus/pci/devices").join(sibling).exists()
    };
    let fsuffix = if multi {
        format!("f{func}")
    } else {
        String::new()
    };
    let dprefix = if domain > 0 {
        format!("P{domain}")
    } else {
        String::new()
    };
    let slot_prefix = format!("{}:{:02x}:{slot}", &pci[..4], bus);
    for e in std::fs::read_dir(sys.join("bus/pci/slots"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if read(&e.path().join("address")).as_deref() == Some(&slot_prefix) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.parse::<u32>().is_ok() {
                return Some(format!("en{dprefix}s{n}{fsuffix}"));
            }
        }
    }
    Some(format!("en{dprefix}p{bus}s{slot_n}{fsuffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_scans_without_panicking() {
        let inv = Inventory::scan(Path::new("/sys"));
        assert!(inv.firmware == "uefi" || inv.firmware == "bios");
        for l in inv.lines() {
            assert!(!l.is_empty());
        }
    }

    #[test]
    fn pci_addresses() {
        assert!(is_pci_address("0000:00:1f.2"));
        assert!(!is_pci_address("pci0000:00"));
        assert!(!is_pci_address("ata1"));
    }
}
