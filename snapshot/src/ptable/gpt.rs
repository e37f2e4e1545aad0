//! GPT: parse (512- and 4096-byte sectors) and write. (Implementation in progress.)

use super::{Guid, Partition};
use crate::source::ReadAt;
use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt {
    pub disk_guid: Guid,
    /// LBA of the partition entry array in the primary header.
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// LBA of the backup header as the source disk had it.
    pub backup_lba: u64,
    pub partitions: Vec<GptPartition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptPartition {
    /// 1-based slot in the entry array.
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Gpt {
    /// `Ok(None)` when there is no GPT header at LBA 1 for this sector size.
    pub fn read(_dev: &dyn ReadAt, _sector: u32) -> Result<Option<Gpt>> {
        Ok(None)
    }

    pub fn partitions(&self, sector: u32) -> Vec<Partition> {
        self.partitions
            .iter()
            .map(|p| Partition {
                number: p.number,
                offset: p.first_lba * sector as u64,
                size: (p.last_lba + 1 - p.first_lba) * sector as u64,
                fs: None,
            })
            .collect()
    }
}
