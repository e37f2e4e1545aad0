//! Finding the restored Linux on the written partitions: the root filesystem (os-release and
//! an fstab that mounts it as `/`), what its fstab mounts, its kernels and their initramfs
//! images, the initramfs generator and the boot loader.

use crate::volumes::Volume;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    InitramfsTools,
    Dracut,
    Mkinitcpio,
    None,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::InitramfsTools => "initramfs-tools",
            Generator::Dracut => "dracut",
            Generator::Mkinitcpio => "mkinitcpio",
            Generator::None => "no known generator",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Kernel {
    pub version: String,
    /// `lib/modules/VER` (relative to the root).
    pub modules: String,
    /// `boot/initrd.img-VER` and the like, if there is one.
    pub initramfs: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct System {
    pub name: String,
    pub id: String,
    pub id_like: String,
    /// Newest first: the first is the default.
    pub kernels: Vec<Kernel>,
    pub generator: Generator,
    /// `boot/grub/grub.cfg` or `boot/grub2/grub.cfg`.
    pub grub_cfg: Option<String>,
}

/// One fstab entry: what, where, type.
#[derive(Debug, Clone, PartialEq)]
pub struct FstabEntry {
    pub spec: String,
    pub dir: String,
    pub fstype: String,
}

pub fn fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(FstabEntry {
                spec: w.next()?.to_string(),
                dir: w.next()?.to_string(),
                fstype: w.next()?.to_string(),
            })
        })
        .collect()
}

/// The restored volume an fstab spec (or `root=` value) names.
pub fn resolve<'a>(spec: &str, volumes: &'a [Volume]) -> Option<&'a Volume> {
    let eq = |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    let by = |k: &str| {
        spec.strip_prefix(&format!("{k}="))
            .or_else(|| spec.strip_prefix(&format!("/dev/disk/by-{}/", k.to_ascii_lowercase())))
            .map(|v| v.trim_matches('"'))
    };
    if let Some(u) = by("UUID") {
        return volumes.iter().find(|v| eq(&v.uuid, u));
    }
    if let Some(u) = by("PARTUUID") {
        return volumes.iter().find(|v| eq(&v.partuuid, u));
    }
    if let Some(l) = by("LABEL") {
        return volumes.iter().find(|v| v.label.as_deref() == Some(l));
    }
    if let Some(v) = volumes.iter().find(|v| v.device == spec || v.is_lv(spec)) {
        return Some(v);
    }
    let (disk, part) = super::devnames::kernel_name(spec)?;
    volumes.iter().find(|v| v.is_partition(disk, part))
}

fn os_release(root: &Path) -> Option<String> {
    ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok())
}

/// Whether `root` (a mounted filesystem) looks like a Linux root.
pub fn is_root(root: &Path) -> bool {
    os_release(root).is_some() && root.join("etc/fstab").exists()
}

/// Compares kernel versions the way `sort -V` roughly does (numbers as numbers).
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut num = String::new();
    let mut txt = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            if !txt.is_empty() {
                out.push((0, std::mem::take(&mut txt)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((num.parse().unwrap_or(0), String::new()));
                num.clear();
            }
            txt.push(c);
        }
    }
    if !num.is_empty() {
        out.push((num.parse().unwrap_or(0), String::new()));
    }
    if !txt.is_empty() {
        out.push((0, txt));
    }
    out
}

pub fn describe(root: &Path) -> System {
    let rel = os_release(root).unwrap_or_default();
    let field = |k: &str| {
        rel.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let modules_base = if root.join("lib/modules").is_dir() {
        "lib/modules"
    } else {
        "usr/lib/modules"
    };
    let mut kernels: Vec<Kernel> = std::fs::read_dir(root.join(modules_base))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| root.join(modules_base).join(v).join("modules.dep").exists())
        .map(|v| Kernel {
            initramfs: [
                format!("boot/initrd.img-{v}"),
                format!("boot/initramfs-{v}.img"),
                format!("boot/initrd-{v}"),
            ]
            .into_iter()
            .find(|p| root.join(p).is_file()),
            modules: format!("{modules_base}/{v}"),
            version: v,
        })
        .collect();
    kernels.sort_by_key(|k| std::cmp::Reverse(version_key(&k.version)));
    let exists = |p: &str| root.join(p).exists();
    let generator = if exists("usr/sbin/mkinitramfs") || exists("sbin/mkinitramfs") {
        Generator::InitramfsTools
    } else if exists("usr/bin/dracut") || exists("usr/sbin/dracut") {
        Generator::Dracut
    } else if exists("usr/bin/mkinitcpio") {
        Generator::Mkinitcpio
    } else {
        Generator::None
    };
    let grub_cfg = ["boot/grub/grub.cfg", "boot/grub2/grub.cfg"]
        .into_iter()
        .find(|p| exists(p))
        .map(String::from);
    System {
        name: Some(field("PRETTY_NAME"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| field("NAME")),
        id: field("ID"),
        id_like: field("ID_LIKE"),
        kernels,
        generator,
        grub_cfg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-13-amd64", "5.10.0-26-amd64"];
        v.sort_by_key(|x| std::cmp::Reverse(version_key(x)));
        assert_eq!(v, ["6.1.0-13-amd64", "6.1.0-9-amd64", "5.10.0-26-amd64"]);
    }

    #[test]
    fn fstab_specs_resolve() {
        let vols = vec![Volume {
            disk: 0,
            partition: 2,
            device: "/dev/nvme0n1p2".into(),
            uuid: Some("5a3e0b1e-aaaa".into()),
            partuuid: Some("0f0f".into()),
            label: Some("root".into()),
            ..Default::default()
        }];
        for s in [
            "UUID=5A3E0B1E-AAAA",
            "PARTUUID=0f0f",
            "LABEL=root",
            "/dev/disk/by-uuid/5a3e0b1e-aaaa",
            "/dev/vda2",
            "/dev/sda2",
            "/dev/nvme0n1p2",
        ] {
            assert!(resolve(s, &vols).is_some(), "{s}");
        }
        assert!(resolve("/dev/vda1", &vols).is_none());
        // An LV by its mapper node or /dev/VG/LV, never by a kernel name of its PV's disk.
        let lvs = vec![Volume {
            disk: 0,
            device: "/dev/mapper/rhel-root".into(),
            lv: Some("rhel/root".into()),
            ..Default::default()
        }];
        for s in ["/dev/mapper/rhel-root", "/dev/rhel/root"] {
            assert!(resolve(s, &lvs).is_some(), "{s}");
        }
        for s in ["/dev/vda", "/dev/rhel/swap", "/dev/mapper/rhel-swap"] {
            assert!(resolve(s, &lvs).is_none(), "{s}");
        }
        let f =
            fstab("# c\nUUID=x / ext4 defaults 0 1\n\n/dev/vda1 /boot/efi vfat umask=0077 0 1\n");
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].dir, "/boot/efi");
    }
}
