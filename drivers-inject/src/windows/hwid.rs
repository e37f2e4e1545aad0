//! The Plug and Play identifiers Windows gives a PCI device, best match first: hardware IDs
//! (`PCI\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00` down to `PCI\VEN_1AF4&DEV_1001&CC_0100`)
//! then compatible IDs (`PCI\VEN_1AF4&CC_010000` down to `PCI\CC_0100`), as Microsoft's
//! "Identifiers for PCI Devices" lists them. The position in that list is the first part of a
//! driver's rank.

/// A PCI function's identity, as Linux shows it (modalias and `revision` in sysfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subvendor: u16,
    pub subdevice: u16,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub revision: u8,
}

impl PciIds {
    /// From a `pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00` modalias and the
    /// revision (`0x00`, from sysfs `revision`).
    pub fn from_modalias(modalias: &str, revision: u8) -> Option<PciIds> {
        let m = modalias.strip_prefix("pci:")?;
        let field = |tag: &str, len: usize| -> Option<u32> {
            let at = m.find(tag)? + tag.len();
            u32::from_str_radix(m.get(at..at + len)?, 16).ok()
        };
        let hex16 = |tag| field(tag, 8).and_then(|v| u16::try_from(v).ok());
        let hex8 = |tag| field(tag, 2).and_then(|v| u8::try_from(v).ok());
        Some(PciIds {
            vendor: hex16("v")?,
            device: hex16("d")?,
            subvendor: hex16("sv")?,
            subdevice: hex16("sd")?,
            class: (hex8("bc")?, hex8("sc")?, hex8("i")?),
            revision,
        })
    }

    /// Hardware IDs then compatible IDs, most specific first, upper case as Windows writes
    /// them; the first [`PciIds::HARDWARE`] are hardware IDs.
    pub fn ids(&self) -> Vec<String> {
        let v = format!("PCI\\VEN_{:04X}", self.vendor);
        let vd = format!("{v}&DEV_{:04X}", self.device);
        let sub = format!("SUBSYS_{:04X}{:04X}", self.subdevice, self.subvendor);
        let rev = format!("REV_{:02X}", self.revision);
        let (c, s, p) = self.class;
        let cc6 = format!("CC_{c:02X}{s:02X}{p:02X}");
        let cc4 = format!("CC_{c:02X}{s:02X}");
        vec![
            format!("{vd}&{sub}&{rev}"),
            format!("{vd}&{sub}"),
            format!("{vd}&{rev}"),
            vd.clone(),
            format!("{vd}&{cc6}"),
            format!("{vd}&{cc4}"),
            format!("{v}&{cc6}"),
            format!("{v}&{cc4}"),
            v,
            format!("PCI\\{cc6}"),
            format!("PCI\\{cc4}"),
        ]
    }

    /// How many of [`PciIds::ids`] are hardware IDs.
    pub const HARDWARE: usize = 6;
}

/// Boot-critical controllers Windows (Server 2012 and later) drives with an in-box service:
/// `(class, subclass, prog-if or None for any, service)`. Such a device needs no package, only
/// its service made boot-start.
pub const IN_BOX: &[(u8, u8, Option<u8>, &str)] = &[
    (0x01, 0x06, Some(0x01), "storahci"),
    (0x01, 0x08, Some(0x02), "stornvme"),
];

/// The in-box service for a device, if Windows has one.
pub fn in_box(ids: &PciIds) -> Option<&'static str> {
    let (c, s, p) = ids.class;
    IN_BOX
        .iter()
        .find(|(ic, is, ip, _)| *ic == c && *is == s && ip.is_none_or(|ip| ip == p))
        .map(|(_, _, _, svc)| *svc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_a_virtio_blk_device() {
        let d = PciIds::from_modalias("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00", 0)
            .unwrap();
        assert_eq!(d.class, (1, 0, 0));
        let ids = d.ids();
        assert_eq!(ids[0], "PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00");
        assert_eq!(ids[3], "PCI\\VEN_1AF4&DEV_1001");
        assert_eq!(ids[PciIds::HARDWARE], "PCI\\VEN_1AF4&CC_010000");
        assert_eq!(ids.last().unwrap(), "PCI\\CC_0100");
        assert_eq!(in_box(&d), None);
        let nvme =
            PciIds::from_modalias("pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02", 2)
                .unwrap();
        assert_eq!(
            nvme.ids()[0],
            "PCI\\VEN_1B36&DEV_0010&SUBSYS_11001AF4&REV_02"
        );
        assert_eq!(in_box(&nvme), Some("stornvme"));
        assert!(PciIds::from_modalias("usb:v1234p5678", 0).is_none());
    }
}
