//! Partition tables: GPT (512- and 4096-byte sectors) and MBR with extended/logical partitions.
//! Parsed with every field needed to write the table again exactly, and written again for a
//! target of another size or sector size.

pub mod gpt;
pub mod mbr;

use crate::fs::Filesystem;
use crate::source::ReadAt;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A GUID in its on-disk mixed-endian byte order, shown in the usual text form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parse the text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn parse(s: &str) -> Option<Guid> {
        let hexs: String = s.chars().filter(|c| *c != '-').collect();
        if hexs.len() != 32 || s.len() != 36 {
            return None;
        }
        let mut t = [0u8; 16];
        hex::decode_to_slice(&hexs, &mut t).ok()?;
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&[t[3], t[2], t[1], t[0]]);
        b[4..6].copy_from_slice(&[t[5], t[4]]);
        b[6..8].copy_from_slice(&[t[7], t[6]]);
        b[8..16].copy_from_slice(&t[8..16]);
        Some(Guid(b))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            hex::encode_upper(&b[10..16])
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Guid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Guid, D::Error> {
        let s = String::deserialize(d)?;
        Guid::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad GUID {s:?}")))
    }
}

/// The partition table of a disk, as found at ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PartitionTable {
    /// No table: the disk is copied (or read as one filesystem) whole.
    None,
    Gpt(gpt::Gpt),
    Mbr(mbr::Mbr),
}

/// One partition's place on the disk, in bytes, whatever the table type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    /// 1-based partition number as Linux names it (sda1; MBR logicals start at 5).
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// The filesystem found in it at ingest, if any was recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Filesystem>,
    /// Why a filesystem that was recognised is copied whole instead of by its used-block map
    /// (its metadata is damaged, or its allocation data disagrees with its own counts and
    /// structures). Absent in manifests from older writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<String>,
    /// Files whose contents were not stored (paging, hibernation, swap files: see
    /// [`crate::fs::exclude`]). Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<crate::fs::exclude::Excluded>,
    /// The LVM2 physical volume the partition holds, with its VG and LVs. Absent for other
    /// partitions and in manifests from older writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<Box<crate::manifest::LvmPv>>,
    /// The MD RAID member the partition is, with what its array holds. Absent for other
    /// partitions and in manifests from older writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md: Option<Box<crate::manifest::MdMember>>,
}

impl PartitionTable {
    /// Read the partition table of `dev`. `sector` is the logical sector size when known (block
    /// devices); for image files pass `None` and the GPT header's position decides (512 or 4096).
    /// Returns the table and the logical sector size it was found with.
    pub fn read(dev: &dyn ReadAt, sector: Option<u32>) -> Result<(PartitionTable, u32)> {
        let sizes: &[u32] = match sector {
            Some(512) => &[512],
            Some(4096) => &[4096],
            Some(other) => anyhow::bail!("unsupported logical sector size {other}"),
            None => &[512, 4096],
        };
        for &s in sizes {
            if let Some(g) = gpt::Gpt::read(dev, s)? {
                return Ok((PartitionTable::Gpt(g), s));
            }
        }
        let s = sector.unwrap_or(512);
        match mbr::Mbr::read(dev, s)? {
            Some(m) => Ok((PartitionTable::Mbr(m), s)),
            None if mbr::is_protective(dev)? => anyhow::bail!(
                "protective MBR but no valid GPT (looked for a GPT header with {} sectors)",
                sizes
                    .iter()
                    .map(|s| format!("{s}-byte"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            None => Ok((PartitionTable::None, s)),
        }
    }

    /// This table laid out for a target disk of `target_size` bytes with `target_sector`-byte
    /// logical sectors; the source had `src_sector`. See [`gpt::Gpt::for_target`] and
    /// [`mbr::Mbr::for_target`].
    pub fn for_target(
        &self,
        src_sector: u32,
        target_size: u64,
        target_sector: u32,
        grow_last: bool,
    ) -> Result<PartitionTable> {
        Ok(match self {
            PartitionTable::None => PartitionTable::None,
            PartitionTable::Gpt(g) => PartitionTable::Gpt(g.for_target(
                src_sector,
                target_size,
                target_sector,
                grow_last,
            )?),
            PartitionTable::Mbr(m) => PartitionTable::Mbr(m.for_target(
                src_sector,
                target_size,
                target_sector,
                grow_last,
            )?),
        })
    }

    /// This table with partitions moved or resized: `places` gives `(number, offset, size)` in
    /// bytes (multiples of `sector`) for the partitions that change; the others keep theirs. Lay
    /// the result out for its disk with [`PartitionTable::for_target`]. MBR logical partitions
    /// (their EBR chain would move too) cannot be placed.
    pub fn placed(&self, sector: u32, places: &[(u32, u64, u64)]) -> Result<PartitionTable> {
        let s = u64::from(sector);
        for &(n, off, size) in places {
            if !off.is_multiple_of(s) || !size.is_multiple_of(s) || size == 0 {
                anyhow::bail!(
                    "partition {n}: offset {off} and size {size} must be non-zero multiples of {s}"
                );
            }
        }
        let find = |n: u32| places.iter().find(|p| p.0 == n).map(|p| (p.1 / s, p.2 / s));
        Ok(match self {
            PartitionTable::None => {
                anyhow::bail!("a disk with no partition table has no partitions to place")
            }
            PartitionTable::Gpt(g) => {
                let mut g = g.clone();
                for p in &mut g.partitions {
                    if let Some((first, n)) = find(p.number) {
                        p.first_lba = first;
                        p.last_lba = first + n - 1;
                    }
                }
                PartitionTable::Gpt(g)
            }
            PartitionTable::Mbr(m) => {
                let mut m = m.clone();
                for p in &mut m.partitions {
                    if let Some((first, n)) = find(p.number) {
                        if p.number > 4 || p.is_extended() {
                            anyhow::bail!(
                                "MBR partition {} is a logical partition or an extended container: moving it is not supported",
                                p.number
                            );
                        }
                        p.first_lba = first;
                        p.sectors = n;
                        p.chs = None;
                    }
                }
                PartitionTable::Mbr(m)
            }
        })
    }

    /// Byte patches `(offset, bytes)` writing this table on a disk of `disk_size` bytes with
    /// `sector`-byte sectors (empty for [`PartitionTable::None`]). The table must have been laid
    /// out for that disk with [`PartitionTable::for_target`].
    pub fn to_disk(&self, disk_size: u64, sector: u32) -> Result<Vec<(u64, Vec<u8>)>> {
        match self {
            PartitionTable::None => Ok(Vec::new()),
            PartitionTable::Gpt(g) => g.to_disk(disk_size, sector),
            PartitionTable::Mbr(m) => m.to_disk(sector),
        }
    }

    /// Byte ranges `[start, end)` of a disk of `disk_size` bytes that hold this partition table
    /// (sector 0; the GPT headers and entry arrays; every EBR sector), sorted and merged, so a
    /// restorer can hold them back, write them last, or wipe them on failure.
    pub fn table_regions(&self, disk_size: u64, sector: u32) -> Vec<(u64, u64)> {
        match self {
            PartitionTable::None => Vec::new(),
            PartitionTable::Gpt(g) => g.table_regions(disk_size, sector),
            PartitionTable::Mbr(m) => m.table_regions(sector),
        }
    }

    /// The data partitions in byte units (MBR extended containers excluded), sorted by offset.
    pub fn partitions(&self, sector: u32) -> Vec<Partition> {
        let mut v = match self {
            PartitionTable::None => Vec::new(),
            PartitionTable::Gpt(g) => g.partitions(sector),
            PartitionTable::Mbr(m) => m.partitions(sector),
        };
        v.sort_by_key(|p| p.offset);
        v
    }
}

/// Sort `[start, end)` ranges and merge the ones that touch or overlap; empty ones are dropped.
pub(crate) fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|(s, e)| s < e);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt() -> PartitionTable {
        let part = |number, first_lba, last_lba| gpt::GptPartition {
            number,
            type_guid: Guid([1; 16]),
            unique_guid: Guid([number as u8; 16]),
            first_lba,
            last_lba,
            attributes: 0,
            name: format!("p{number}"),
            name_raw: None,
        };
        PartitionTable::Gpt(gpt::Gpt {
            disk_guid: Guid([9; 16]),
            entries_lba: 2,
            entry_count: 128,
            entry_size: 128,
            first_usable_lba: 34,
            last_usable_lba: 41_943_006,
            backup_lba: 41_943_039,
            partitions: vec![part(1, 2048, 526_335), part(2, 526_336, 41_940_991)],
            revision: 0x0001_0000,
            protective_mbr: None,
            notes: Vec::new(),
        })
    }

    #[test]
    fn placed_moves_and_resizes_only_the_named_partitions() {
        let t = gpt().placed(512, &[(2, 300 << 20, 1 << 30)]).unwrap();
        let laid = t.for_target(512, 2 << 30, 512, false).unwrap();
        let p = laid.partitions(512);
        assert_eq!((p[0].offset, p[0].size), (1 << 20, 256 << 20));
        assert_eq!((p[1].offset, p[1].size), (300 << 20, 1 << 30));
        assert!(
            gpt().placed(512, &[(2, 1000, 1 << 20)]).is_err(),
            "not a sector multiple"
        );
    }

    #[test]
    fn placed_refuses_mbr_logicals() {
        let part = |number, kind, first_lba, sectors, ebr_lba| mbr::MbrPartition {
            number,
            bootable: false,
            kind,
            first_lba,
            sectors,
            ebr_lba,
            chs: None,
        };
        let m = PartitionTable::Mbr(mbr::Mbr {
            disk_signature: 1,
            partitions: vec![
                part(1, 0x83, 2048, 4096, None),
                part(2, 0x05, 8192, 8192, None),
                part(5, 0x83, 10240, 4096, Some(8192)),
            ],
        });
        let moved = m.placed(512, &[(1, 1 << 20, 1 << 20)]).unwrap();
        assert_eq!(moved.partitions(512)[0].size, 1 << 20);
        let e = m.placed(512, &[(5, 4 << 20, 1 << 20)]).unwrap_err();
        assert!(e.to_string().contains("logical"), "{e}");
    }
}
