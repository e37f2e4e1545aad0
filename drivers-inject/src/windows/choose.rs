//! Which driver each device of this machine gets in the restored Windows: every storage
//! controller on the boot path (boot-critical: installed offline) and every NIC (staged for the
//! first boot). A package from the repository that names the device by a hardware ID wins;
//! then Windows' own driver for the class (storahci, stornvme); then a package that only
//! matches a compatible ID. A boot controller nothing drives is said loudly: Windows would stop
//! with INACCESSIBLE_BOOT_DEVICE (0x7B).

use super::hwid::PciIds;
use super::inject::Device;
use super::repo::{Repo, WindowsTarget};
use crate::inventory::{Inventory, PciDevice};
use anyhow::Result;

/// The devices to inject for, with what the choice was and what is missing.
#[derive(Debug, Default)]
pub struct Choice<'r> {
    pub devices: Vec<Device<'r>>,
    /// One line per device: what drives it.
    pub lines: Vec<String>,
    /// Boot controllers with no driver (the restored Windows will not boot here).
    pub missing: Vec<String>,
}

fn ids(d: &PciDevice) -> Option<PciIds> {
    PciIds::from_modalias(&d.modalias, d.revision)
}

/// Chooses for `boot` (PCI addresses of the controllers the restored disks hang off; every
/// storage controller of `inventory` when empty) and every NIC of `inventory`.
pub fn choose<'r>(
    inventory: &Inventory,
    boot: &[String],
    repo: Option<&'r Repo>,
    os: &WindowsTarget,
) -> Result<Choice<'r>> {
    let mut c = Choice::default();
    let controllers = inventory
        .storage
        .iter()
        .filter(|d| boot.is_empty() || boot.contains(&d.address));
    for d in controllers {
        let Some(ids) = ids(d) else {
            c.missing.push(format!(
                "storage controller {} ({}): no PCI identity in sysfs",
                d.address, d.pci_id
            ));
            continue;
        };
        let cands = repo.map(|r| r.candidates(&ids, os)).unwrap_or_default();
        let by_hardware_id = cands
            .first()
            .filter(|k| (k.rank / 2) < PciIds::HARDWARE as u32);
        let in_box = Device::in_box(&ids);
        let device = match (by_hardware_id, in_box, cands.first()) {
            (Some(k), _, _) | (None, None, Some(k)) => {
                let repo = repo.expect("candidates come from a repository");
                Device::from_candidate(k, repo, true)?
            }
            (None, Some(b), _) => b,
            (None, None, None) => {
                c.missing.push(format!(
                    "storage controller {} ({}, {}): no driver in the repository and none in \
                     Windows; it would stop with INACCESSIBLE_BOOT_DEVICE (0x7B): give --drivers \
                     a folder with the controller's package",
                    d.address,
                    d.pci_id,
                    ids.ids()[0]
                ));
                continue;
            }
        };
        c.lines.push(format!(
            "storage controller {} ({}): {}",
            d.address,
            d.pci_id,
            describe(&device)
        ));
        c.devices.push(device);
    }
    for d in &inventory.network {
        let Some(ids) = ids(d) else { continue };
        let cands = repo.map(|r| r.candidates(&ids, os)).unwrap_or_default();
        match (cands.first(), repo) {
            (Some(k), Some(repo)) => {
                let device = Device::from_candidate(k, repo, false)?;
                c.lines.push(format!(
                    "NIC {} ({}): {}",
                    d.address,
                    d.pci_id,
                    describe(&device)
                ));
                c.devices.push(device);
            }
            _ => c.lines.push(format!(
                "NIC {} ({}): no package in the driver repository (Windows' in-box drivers may \
                 cover it; the static IPv4 settings are carried only with a staged package)",
                d.address, d.pci_id
            )),
        }
    }
    Ok(c)
}

fn describe(d: &Device) -> String {
    use super::inject::Driver;
    let how = if d.boot_critical {
        "boot-start, bound offline"
    } else {
        "staged, installed at first boot"
    };
    match &d.driver {
        Driver::Package {
            package,
            description,
            ..
        } => format!(
            "{description} from {} for {} ({how})",
            package.inf_path.display(),
            d.hardware_id
        ),
        Driver::InBox { service } => {
            format!("Windows' own {service} for {} ({how})", d.hardware_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(address: &str, modalias: &str) -> PciDevice {
        PciDevice {
            address: address.into(),
            pci_id: "x:y".into(),
            class: String::new(),
            modalias: modalias.into(),
            revision: 0,
            driver: None,
        }
    }

    fn inventory(storage: Vec<PciDevice>, network: Vec<PciDevice>) -> Inventory {
        Inventory {
            firmware: "uefi".into(),
            secure_boot: None,
            storage,
            network,
            disks: vec![],
            nics: vec![],
        }
    }

    const NVME: &str = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02";
    const VIRTIO_BLK: &str = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00";

    #[test]
    fn in_box_nvme_without_a_repository_and_missing_virtio_said() {
        let inv = inventory(
            vec![dev("0000:00:04.0", NVME), dev("0000:00:05.0", VIRTIO_BLK)],
            vec![],
        );
        let c = choose(&inv, &[], None, &WindowsTarget::server_2019()).unwrap();
        assert_eq!(c.devices.len(), 1);
        assert!(c.lines[0].contains("stornvme"), "{:?}", c.lines);
        assert_eq!(c.missing.len(), 1);
        assert!(c.missing[0].contains("0x7B"), "{:?}", c.missing);
        // Only the boot path is looked at when it is known.
        let c = choose(
            &inv,
            &["0000:00:04.0".to_string()],
            None,
            &WindowsTarget::server_2019(),
        )
        .unwrap();
        assert!(c.missing.is_empty(), "{:?}", c.missing);
    }
}
