//! The partition table as the restorer needs it: rewritten for the target's size and sector
//! size, turned into byte patches, and the byte ranges that hold it (held back during the data
//! phase, written last, wiped on failure).
//!
//! A thin seam over `snapshot::ptable`, so the rest of the restorer names one place.

use anyhow::Result;
use snapshot::ptable::PartitionTable;

/// The table for a target of `target_size` bytes and `target_sector`-byte sectors.
pub fn for_target(
    t: &PartitionTable,
    src_sector: u32,
    target_size: u64,
    target_sector: u32,
    grow_last: bool,
) -> Result<PartitionTable> {
    t.for_target(src_sector, target_size, target_sector, grow_last)
}

/// Byte patches that write the whole table (primary, backup, EBRs) onto a disk.
pub fn to_disk(t: &PartitionTable, disk_size: u64, sector: u32) -> Result<Vec<(u64, Vec<u8>)>> {
    t.to_disk(disk_size, sector)
}

/// Byte ranges `[start, end)` of a disk that hold the table.
pub fn regions(t: &PartitionTable, disk_size: u64, sector: u32) -> Vec<(u64, u64)> {
    t.table_regions(disk_size, sector)
}
