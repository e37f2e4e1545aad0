//! The device the image booted from (USB stick, CD/virtual media): the volume labelled
//! `BMR_RESTORE` (bootimg's MEDIA_LABEL). It is never a restore target.

use std::path::Path;
use std::process::Command;

pub const MEDIA_LABEL: &str = "BMR_RESTORE";

/// Whole-disk device paths (`/dev/sda`, `/dev/sr0`) holding the boot media; empty for PXE.
pub fn find() -> Vec<String> {
    let out = Command::new("blkid")
        .args(["-c", "/dev/null", "-o", "device", "-t"])
        .arg(format!("LABEL={MEDIA_LABEL}"))
        .output();
    let Ok(out) = out else { return vec![] };
    let mut disks: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|dev| whole_disk(dev.trim()))
        .collect();
    disks.sort();
    disks.dedup();
    disks
}

/// `/dev/sda1` -> `/dev/sda`, `/dev/nvme0n1p1` -> `/dev/nvme0n1`, `/dev/sr0` -> `/dev/sr0`.
pub fn whole_disk(dev: &str) -> Option<String> {
    let name = dev.strip_prefix("/dev/")?;
    let sys = Path::new("/sys/class/block").join(name);
    if sys.join("partition").exists() {
        let real = std::fs::canonicalize(&sys).ok()?;
        let parent = real.parent()?.file_name()?.to_string_lossy().into_owned();
        Some(format!("/dev/{parent}"))
    } else if sys.exists() {
        Some(dev.to_string())
    } else {
        // Not (yet) in sysfs: go by the name (sda1 -> sda, nvme0n1p2 -> nvme0n1, mmcblk0p1).
        let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
        let disk = match base.strip_suffix('p') {
            Some(d) if d.ends_with(|c: char| c.is_ascii_digit()) => d,
            _ if base.ends_with(|c: char| c.is_ascii_alphabetic()) && base.starts_with("sd")
                || base.starts_with("vd")
                || base.starts_with("hd")
                || base.starts_with("xvd") =>
            {
                base
            }
            _ => name,
        };
        Some(format!("/dev/{disk}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn partitions_map_to_their_disk_by_name() {
        let w = |d: &str| super::whole_disk(d).unwrap();
        assert_eq!(w("/dev/bmr-test-none/sda1"), "/dev/bmr-test-none/sda1");
        assert_eq!(w("/dev/sdz7"), "/dev/sdz");
        assert_eq!(w("/dev/nvme9n1p2"), "/dev/nvme9n1");
        assert_eq!(w("/dev/nvme9n1"), "/dev/nvme9n1");
        assert_eq!(w("/dev/vdq3"), "/dev/vdq");
        assert_eq!(w("/dev/sr9"), "/dev/sr9");
    }
}
