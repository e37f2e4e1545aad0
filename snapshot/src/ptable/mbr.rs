//! MBR with extended/logical partitions: parse and write. (Implementation in progress.)

use super::Partition;
use crate::source::ReadAt;
use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mbr {
    pub disk_signature: u32,
    /// Primary entries (including an extended container) and logical partitions.
    pub partitions: Vec<MbrPartition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MbrPartition {
    /// 1-4 primary, 5+ logical (Linux numbering).
    pub number: u32,
    pub bootable: bool,
    /// Partition type byte (0x83 Linux, 0x07 NTFS, 0x0e FAT16 LBA, 0x05/0x0f extended...).
    pub kind: u8,
    pub first_lba: u64,
    pub sectors: u64,
    /// For logical partitions: LBA of the EBR that describes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebr_lba: Option<u64>,
}

impl MbrPartition {
    pub fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0f | 0x85)
    }
}

impl Mbr {
    /// `Ok(None)` when sector 0 has no 0x55AA signature or is a protective MBR.
    pub fn read(_dev: &dyn ReadAt, _sector: u32) -> Result<Option<Mbr>> {
        Ok(None)
    }

    pub fn partitions(&self, sector: u32) -> Vec<Partition> {
        self.partitions
            .iter()
            .filter(|p| !p.is_extended())
            .map(|p| Partition {
                number: p.number,
                offset: p.first_lba * sector as u64,
                size: p.sectors * sector as u64,
                fs: None,
            })
            .collect()
    }
}
