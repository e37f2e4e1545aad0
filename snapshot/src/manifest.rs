//! The snapshot manifest (`manifest.json`): what was captured, from which hardware, and how each
//! disk is laid out. Versioned; a reader refuses a version it does not know.

use crate::fs::Filesystem;
use crate::ptable::{Partition, PartitionTable};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub host: String,
    pub snapshot: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// Commit order among the snapshots of the host: 1, 2, 3... assigned (and signed) by the
    /// appliance at commit, so a restorer can tell the newest snapshot from an older one that a
    /// rolled-back `latest` names. Absent in manifests written before it existed (order 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    pub firmware: Firmware,
    #[serde(default)]
    pub hardware: Hardware,
    pub chunk_size: u64,
    pub disks: Vec<Disk>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Uefi,
    Bios,
    Unknown,
}

/// The source machine's devices, for driver injection on dissimilar hardware.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    #[serde(default)]
    pub storage: Vec<PciDevice>,
    #[serde(default)]
    pub nics: Vec<Nic>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PciDevice {
    /// `vvvv:dddd`
    pub pci_id: String,
    #[serde(default)]
    pub driver: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    #[serde(default)]
    pub pci_id: Option<String>,
    #[serde(default)]
    pub driver: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    /// 0-based disk number; the index file is `disk<N>.idx`.
    pub number: u32,
    pub size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub table: PartitionTable,
    /// Data partitions in byte units with the filesystem found in each.
    pub partitions: Vec<Partition>,
    /// SHA-256 (hex) of `disk<N>.idx`.
    pub index_sha256: String,
    pub totals: DiskTotals,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskTotals {
    /// Bytes the used-block maps keep (whole copies included).
    pub used_bytes: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub unused_chunks: u64,
    /// Sum of the compressed blob sizes this disk references (shared chunks counted once per disk).
    pub stored_bytes: u64,
}

/// An LVM2 physical volume found in a partition (its `lvm` field), with its volume group as the
/// newest valid metadata copy on it describes it. Byte units throughout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LvmPv {
    /// The PV UUID as lvm2 prints it (`xxxxxx-xxxx-...`).
    pub uuid: String,
    /// Where the first physical extent starts, from the partition start.
    pub pe_start: u64,
    pub extent_size: u64,
    /// Physical extents of this PV.
    pub pe_count: u64,
    pub vg: LvmVg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LvmVg {
    pub name: String,
    pub uuid: String,
    /// The metadata sequence number of the copy that was read.
    pub seqno: u64,
    /// PVs the VG spans; only a VG of one PV has its LVs mapped (others are copied whole).
    pub pv_count: u32,
    #[serde(default)]
    pub lvs: Vec<LvmLv>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LvmLv {
    pub name: String,
    pub uuid: String,
    /// Bytes the LV spans (its extents times the extent size).
    pub size: u64,
    pub segments: Vec<LvmSegment>,
    /// The filesystem found in the LV, when its segments are mapped and it was recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Filesystem>,
    /// Why the LV's extents are copied whole (segment type not mapped, used by another LV,
    /// damaged filesystem); absent when it is mapped or simply holds no filesystem we know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<String>,
    /// Files of its filesystem whose contents were not stored (as a partition's `excluded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<crate::fs::exclude::Excluded>,
}

/// A member of a Linux MD RAID array, as its mdadm superblock describes it. Byte units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MdMember {
    /// The mdadm metadata version: `1.0`, `1.1`, `1.2` or `0.90`.
    pub metadata: String,
    /// The array UUID as `mdadm --examine` prints it.
    pub uuid: String,
    /// The array name (`host:name`; empty for 0.90).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `raid1`, `raid5`, `linear`...
    pub level: String,
    pub raid_disks: u32,
    /// This member's slot in the array; absent for a spare or faulty member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<u32>,
    /// Where the array's data starts on the member, from the partition start.
    pub data_offset: u64,
    /// Bytes of array data the member holds (a RAID1 member: the whole array device).
    pub data_size: u64,
    /// The superblock's event count (members of one array in sync agree on it).
    pub events: u64,
    /// The filesystem found in the array's data (RAID1 members only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Filesystem>,
    /// The LVM2 physical volume the array holds (RAID1 members only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<Box<LvmPv>>,
    /// Files of its filesystem whose contents were not stored (as a partition's `excluded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<crate::fs::exclude::Excluded>,
    /// Why the member's data area is copied whole (not RAID1, a spare, being recovered, its
    /// content damaged); absent when it is mapped or holds nothing we know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LvmSegment {
    /// First logical extent of the segment in the LV.
    pub start_extent: u64,
    pub extent_count: u64,
    /// The segment type lvm2 names (`striped` for linear and striped; `thin-pool`, `raid1`...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes of a stripe (striped segments of more than one stripe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_size: Option<u64>,
    /// First physical extent of each stripe on this PV (one for a linear segment; empty for a
    /// segment type that is not mapped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripes: Vec<u64>,
}

impl Disk {
    pub fn index_name(&self) -> String {
        format!("disk{}.idx", self.number)
    }
}

impl Manifest {
    /// Where this snapshot stands among its host's: by sequence, then creation time (RFC 3339
    /// UTC strings of one format sort by time). Both are signed.
    pub fn order(&self) -> (u64, &str) {
        (self.sequence.unwrap_or(0), &self.created)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serialises");
        v.push(b'\n');
        v
    }

    /// Parse and check a manifest; `origin` names the file or URL for the error.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Manifest> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("{origin}: malformed manifest: {e}"))?;
        if v.version != MANIFEST_VERSION {
            bail!(
                "{origin}: manifest version {} is not supported (this build reads {MANIFEST_VERSION})",
                v.version
            );
        }
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("{origin}: malformed manifest: {e}"))?;
        if m.chunk_size != crate::CHUNK_SIZE {
            bail!("{origin}: chunk size {} is not supported", m.chunk_size);
        }
        for (i, d) in m.disks.iter().enumerate() {
            if d.number as usize != i {
                bail!("{origin}: disk {} listed in position {i}", d.number);
            }
            if !matches!(d.logical_sector, 512 | 4096) {
                bail!(
                    "{origin}: disk {i}: unsupported sector size {}",
                    d.logical_sector
                );
            }
            if let Some(p) = d
                .partitions
                .iter()
                .find(|p| p.offset.saturating_add(p.size) > d.size)
            {
                bail!(
                    "{origin}: disk {i}: partition {} ends past the disk",
                    p.number
                );
            }
        }
        Ok(m)
    }
}
