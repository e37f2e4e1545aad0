//! What to keep of a disk: its partition table, the filesystem in each partition, and the byte
//! ranges that must be stored. Shared by `appliance ingest` and `restorer capture`.
//!
//! The rule: the whole disk is kept, except inside partitions whose filesystem we understand,
//! where only the filesystem's used blocks are kept. A filesystem whose metadata is damaged is
//! kept whole, and the reason is reported: a guessed map would lose data silently.

use crate::chunker::ChunkStats;
use crate::extents::Extents;
use crate::fs::exclude::Exclusions;
use crate::fs::{self, Found};
use crate::manifest::{Disk, DiskTotals, Firmware};
use crate::ptable::{Guid, Partition, PartitionTable};
use crate::source::ReadAt;
use crate::volume::{lvm, md};
use anyhow::{bail, Context, Result};

/// The layout of one source disk, before chunking.
#[derive(Debug, Clone)]
pub struct DiskLayout {
    pub size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub table: PartitionTable,
    pub partitions: Vec<Partition>,
    /// Byte ranges of the disk to keep.
    pub used: Extents,
    /// Whole-copy fallbacks and other things the operator should hear about, one line each.
    pub notes: Vec<String>,
}

/// Analyse `dev`. `sectors` is the (logical, physical) sector size of a block device, `None` for an
/// image file (the GPT header's position decides). With `raw`, the table is recorded when readable
/// but the whole disk is kept.
pub fn analyze(dev: &dyn ReadAt, sectors: Option<(u32, u32)>, raw: bool) -> Result<DiskLayout> {
    analyze_with(dev, sectors, raw, &Exclusions::default())
}

/// [`analyze`] with the files `ex` names left out of the filesystems' used-block maps.
pub fn analyze_with(
    dev: &dyn ReadAt,
    sectors: Option<(u32, u32)>,
    raw: bool,
    ex: &Exclusions,
) -> Result<DiskLayout> {
    let size = dev.size();
    if size == 0 {
        bail!("the disk is empty (0 bytes)");
    }
    let (table, logical) = PartitionTable::read(dev, sectors.map(|s| s.0))
        .context("reading the partition table (use --raw to copy the disk whole)")?;
    let physical = sectors.map(|s| s.1).unwrap_or(logical);
    let mut partitions = table.partitions(logical);
    if let Some(p) = partitions
        .iter()
        .find(|p| p.offset.saturating_add(p.size) > size)
    {
        bail!(
            "partition {} ends at byte {}, past the end of the disk ({size} bytes): truncated image? (use --raw to copy it whole)",
            p.number,
            p.offset.saturating_add(p.size)
        );
    }
    let mut used = Extents::whole(0, size);
    let mut notes = Vec::new();
    if let PartitionTable::Gpt(g) = &table {
        notes.extend(g.notes.iter().map(|n| format!("GPT: {n}")));
    }
    if table == PartitionTable::None {
        // A filesystem written straight onto the disk is handled like a partition spanning it.
        partitions.push(Partition {
            number: 0,
            offset: 0,
            size,
            fs: None,
            whole: None,
            excluded: Vec::new(),
            lvm: None,
            md: None,
        });
    }
    for p in &mut partitions {
        let name = if p.number == 0 {
            "disk".to_string()
        } else {
            format!("partition {}", p.number)
        };
        let none = Exclusions::none();
        let ex = if raw { &none } else { ex };
        // MD first: a member with its superblock at the end (1.0, 0.90) also looks like the
        // filesystem of its array at its start, and a guessed map from that misses the superblock.
        if let Some(m) = md::analyze(dev, p.offset, p.size, ex) {
            let kept = m.map(|a| {
                p.md = Some(Box::new(a.member));
                (a.used, a.notes)
            });
            let why = "MD RAID member copied whole, its superblock cannot be trusted";
            keep_volume(p, &name, kept, "md", why, raw, &mut used, &mut notes);
            continue;
        }
        if let Some(pv) = lvm::analyze(dev, p.offset, p.size, ex) {
            let kept = pv.map(|a| {
                p.lvm = Some(Box::new(a.pv));
                (a.used, a.notes)
            });
            let why = "LVM2 physical volume copied whole, its metadata cannot be read";
            keep_volume(p, &name, kept, "lvm2", why, raw, &mut used, &mut notes);
            continue;
        }
        let (found, excluded, ex_notes) = fs::probe_excluding(dev, p.offset, p.size, ex);
        notes.extend(ex_notes.iter().map(|n| format!("{name}: {n}")));
        for e in &excluded {
            notes.push(format!(
                "{name}: {} excluded: {:.1} MiB of its contents not stored",
                e.path,
                e.bytes as f64 / (1u64 << 20) as f64
            ));
        }
        p.excluded = excluded;
        match found {
            Found::Known(probe) => {
                if !raw {
                    used.remove(p.offset, p.offset + p.size);
                    used.add_shifted(&probe.used, p.offset);
                }
                p.fs = Some(probe.fs);
            }
            Found::Unknown => {}
            Found::Damaged { kind, reason } => {
                let kind = format!("{kind:?}").to_lowercase();
                let whole = format!("{kind}: {reason}");
                notes.push(format!(
                    "{name}: copied whole, its used-block map cannot be trusted: {whole}"
                ));
                p.whole = Some(whole);
            }
        }
    }
    if table == PartitionTable::None {
        if partitions[0].fs.is_none() && partitions[0].whole.is_none() {
            partitions.clear();
            let mut sig = [0u8; 2];
            if dev.read_at(&mut sig, 510).is_ok() && sig == [0x55, 0xaa] {
                notes.push(
                    "sector 0 has a boot signature but no valid partition table: disk copied whole"
                        .into(),
                );
            }
        } else {
            notes.push("no partition table: the disk holds one filesystem".into());
        }
    }
    Ok(DiskLayout {
        size,
        logical_sector: logical,
        physical_sector: physical,
        table,
        partitions,
        used,
        notes,
    })
}

/// Keep what a volume's analysis says of partition `p` (its used ranges and notes), or the whole
/// partition with the reason when its metadata cannot be trusted (`tag: error`, after `why`).
#[allow(clippy::too_many_arguments)]
fn keep_volume(
    p: &mut Partition,
    name: &str,
    kept: Result<(Extents, Vec<String>)>,
    tag: &str,
    why: &str,
    raw: bool,
    used: &mut Extents,
    notes: &mut Vec<String>,
) {
    match kept {
        Ok((u, n)) => {
            if !raw {
                used.remove(p.offset, p.offset + p.size);
                used.add_shifted(&u, p.offset);
            }
            notes.extend(n.iter().map(|n| format!("{name}: {n}")));
        }
        Err(e) => {
            let whole = format!("{tag}: {e:#}");
            notes.push(format!("{name}: {why}: {whole}"));
            p.whole = Some(whole);
        }
    }
}

impl DiskLayout {
    /// The manifest entry of this disk once it is chunked (ingest and capture write the same).
    pub fn into_disk(self, number: u32, index_sha256: String, s: &ChunkStats) -> Disk {
        Disk {
            number,
            size: self.size,
            logical_sector: self.logical_sector,
            physical_sector: self.physical_sector,
            table: self.table,
            partitions: self.partitions,
            index_sha256,
            totals: DiskTotals {
                used_bytes: s.used_bytes,
                data_chunks: s.data_chunks,
                zero_chunks: s.zero_chunks,
                unused_chunks: s.unused_chunks,
                stored_bytes: s.referenced_bytes,
            },
        }
    }
}

/// GPT type GUID of an EFI system partition.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

/// What a disk's table says its system boots with: an EFI system partition (GPT type, or MBR
/// type 0xEF) means UEFI, any other table BIOS; `None` without a table.
pub fn firmware_of(table: &PartitionTable) -> Option<Firmware> {
    let esp = Guid::parse(ESP_TYPE).expect("valid GUID");
    let uefi = match table {
        PartitionTable::Gpt(g) => g.partitions.iter().any(|p| p.type_guid == esp),
        PartitionTable::Mbr(m) => m.partitions.iter().any(|p| p.kind == 0xef),
        PartitionTable::None => return None,
    };
    Some(if uefi { Firmware::Uefi } else { Firmware::Bios })
}
