//! The restored disks' partitions as block devices, with what `blkid` finds in each: the
//! adaptation's view of the written data.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::process::Command;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Volume {
    /// Disk number in the snapshot (= target order).
    pub disk: usize,
    /// Partition number, 1-based as the kernel counts them.
    pub partition: u32,
    /// `/dev/nvme0n1p2`
    pub device: String,
    pub fstype: Option<String>,
    pub uuid: Option<String>,
    pub partuuid: Option<String>,
    pub label: Option<String>,
    /// GPT partition type GUID (lowercase) or MBR type (`0x83`).
    pub parttype: Option<String>,
    /// An activated LVM2 logical volume (`VG/LV`), not a partition: `device` is its
    /// `/dev/mapper` node, `disk` that of its first PV, `partition` 0 and never matched.
    pub lv: Option<String>,
}

pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";

impl Volume {
    /// Whether this is partition `part` of disk `disk` (never true of an LV).
    pub fn is_partition(&self, disk: usize, part: u32) -> bool {
        self.lv.is_none() && self.disk == disk && self.partition == part
    }

    /// Whether `spec` (an fstab or command-line device) names this LV: `/dev/mapper/VG-LV`
    /// (the device itself) or `/dev/VG/LV`.
    pub fn is_lv(&self, spec: &str) -> bool {
        self.lv
            .as_deref()
            .is_some_and(|lv| spec.strip_prefix("/dev/") == Some(lv))
    }

    pub fn is_esp(&self) -> bool {
        self.parttype.as_deref() == Some(ESP_TYPE) || self.parttype.as_deref() == Some("0xef")
    }
}

/// The partitions of whole-disk block device `disk_dev` (`/dev/nvme0n1`, `/dev/loop3`), disk
/// number `disk`, waiting up to 10 s for the kernel to create their device nodes.
pub fn probe(disk: usize, disk_dev: &str) -> Result<Vec<Volume>> {
    let name = disk_dev
        .strip_prefix("/dev/")
        .with_context(|| format!("{disk_dev}: not a /dev path"))?
        .replace('/', "!");
    let sys = std::path::Path::new("/sys/class/block").join(&name);
    if !sys.exists() {
        bail!("{disk_dev}: no such block device");
    }
    let mut parts = Vec::new();
    for e in std::fs::read_dir(&sys)
        .with_context(|| format!("reading {}", sys.display()))?
        .flatten()
    {
        let p = e.path();
        let Ok(n) = std::fs::read_to_string(p.join("partition")) else {
            continue;
        };
        let Ok(n) = n.trim().parse::<u32>() else {
            continue;
        };
        parts.push((n, format!("/dev/{}", e.file_name().to_string_lossy())));
    }
    parts.sort();
    let mut out = Vec::new();
    for (n, dev) in parts {
        let t0 = std::time::Instant::now();
        while !std::path::Path::new(&dev).exists() {
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                bail!("{dev}: the kernel knows the partition but no device node appeared");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let mut v = blkid(&dev)?;
        v.disk = disk;
        v.partition = n;
        out.push(v);
    }
    Ok(out)
}

/// `blkid -p` (low-level probe: no cache, the bytes on disk) of one partition.
pub fn blkid(dev: &str) -> Result<Volume> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .output()
        .context("running blkid (util-linux)")?;
    // Exit status 2: nothing recognised (an empty or unknown partition).
    if !out.status.success() && out.status.code() != Some(2) {
        bail!(
            "blkid -p {dev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut v = Volume {
        device: dev.to_string(),
        ..Default::default()
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((k, val)) = line.split_once('=') else {
            continue;
        };
        let val = Some(val.to_string());
        match k {
            "TYPE" => v.fstype = val,
            "UUID" => v.uuid = val,
            "PART_ENTRY_UUID" => v.partuuid = val,
            "LABEL" => v.label = val,
            "PART_ENTRY_TYPE" => v.parttype = val.map(|t| t.to_ascii_lowercase()),
            _ => {}
        }
    }
    Ok(v)
}
