//! The plan: which source disk goes to which target, the partition table each target gets, which
//! filesystems grow, and what is written, zeroed or skipped. Computed in full and shown before
//! the first write; `--dry-run` stops after it.

use crate::cli::{LayoutArgs, SourceArgs};
use crate::lvm::{self, LvGrow};
use crate::report::bytes;
use crate::shrink::{self, Place};
use crate::table;
use crate::target::{self, Kind, Safety, Target};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use snapshot::fs::FsKind;
use snapshot::manifest::{Disk, Firmware, LvmPv};
use snapshot::ptable::Partition;
use snapshot::ptable::{Guid, PartitionTable};
use snapshot::sign::PublicKey;
use snapshot::store::{self, Snapshot, Store};
use snapshot::volume::md;
use snapshot::{ChunkIndex, Extents, Slot};
use std::collections::{HashMap, HashSet};

/// Minimum sizes measured by the filesystems' own tools, by (disk, partition); a plan without
/// them estimates from the used data.
pub type Mins = HashMap<(u32, u32), u64>;

/// Bytes of the in-progress marker (see `marker.rs`); the held-back range that holds it must be at
/// least this long.
pub const MARKER_LEN: u64 = 64;

/// A snapshot opened along the trust chain, with the store it came from.
pub struct Source {
    pub store: Box<dyn Store>,
    pub snapshot: Snapshot,
    pub signature_checked: bool,
}

/// What a plan says about `latest` (empty when the snapshot was named or nothing is verified).
fn latest_note(s: &Snapshot) -> String {
    s.latest.describe()
}

impl Source {
    /// Open the store and the snapshot: manifest (signature checked when `--pubkey` is given),
    /// then every index against the SHA-256 the manifest records.
    pub fn open(a: &SourceArgs) -> Result<Source> {
        let key = match &a.pubkey {
            Some(p) => Some(PublicKey::load(p)?),
            None => None,
        };
        let store = store::open(&a.from, &a.net.http_options())?;
        let snapshot =
            store::open_snapshot(store.as_ref(), &a.host, Some(&a.snapshot), key.as_ref())?;
        Ok(Source {
            store,
            snapshot,
            signature_checked: key.is_some(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Plan {
    pub host: String,
    pub snapshot: String,
    pub created: String,
    pub firmware: Firmware,
    pub signature_checked: bool,
    /// How `latest` was checked to be the newest snapshot (empty when the snapshot was named).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub latest_check: String,
    /// Source disks not restored, and why that loses nothing (mirrors run degraded).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub disks: Vec<DiskPlan>,
}

/// How a filesystem is adapted after its data is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeKind {
    /// `resize2fs` (after `e2fsck -fp`).
    Ext,
    /// `ntfsresize`.
    Ntfs,
    /// `mkswap` with the source's UUID and label.
    Swap,
    /// `xfs_growfs` on the filesystem mounted at a temporary directory (XFS grows only while
    /// mounted; it cannot shrink).
    Xfs,
    /// An LVM2 PV: `pvresize`, then `lvextend` of the LV the plan names and its filesystem.
    Lvm,
}

impl ResizeKind {
    /// The tool that does it, as the plan and the summary name it.
    pub fn tool(self) -> &'static str {
        match self {
            ResizeKind::Ext => "resize2fs",
            ResizeKind::Ntfs => "ntfsresize",
            ResizeKind::Swap => "mkswap",
            ResizeKind::Xfs => "xfs_growfs",
            ResizeKind::Lvm => "pvresize",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Resize {
    pub partition: u32,
    pub kind: ResizeKind,
    /// The partition on the target, in bytes.
    pub offset: u64,
    pub size: u64,
    pub from_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// For an LVM2 PV: the LV that takes the new extents (none: they stay free).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lv: Option<LvGrow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartPlan {
    pub number: u32,
    /// On the target.
    pub offset: u64,
    pub source_offset: u64,
    pub size: u64,
    pub source_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The MD member or LVM2 PV the partition is, and what it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    pub action: String,
}

#[derive(Debug, Serialize)]
pub struct DiskPlan {
    pub disk: u32,
    pub target: Target,
    pub source_size: u64,
    pub source_sector: u32,
    pub target_sector: u32,
    /// `gpt`, `mbr` or `none`.
    pub table: &'static str,
    /// `same`, `bigger` or `smaller`.
    pub fit: &'static str,
    /// On a smaller target: the partitions that shrink or move (rebuilt in the scratch directory
    /// and copied to their new place in the data phase).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relocate: Vec<Place>,
    /// Data bytes of the snapshot inside the partitions of `relocate`: what rebuilding them stores
    /// in the scratch directory.
    #[serde(skip_serializing_if = "is_zero")]
    pub scratch_bytes: u64,
    pub partitions: Vec<PartPlan>,
    pub resize: Vec<Resize>,
    pub data_slots: u64,
    pub distinct_chunks: u64,
    pub data_bytes: u64,
    pub zero_slots: u64,
    pub zero_bytes: u64,
    pub unused_slots: u64,
    pub unused_bytes: u64,
    pub notes: Vec<String>,
    /// The table written onto the target, last.
    #[serde(skip)]
    pub new_table: PartitionTable,
    /// Byte ranges of the target that hold its table: held back (zero, plus the marker) during the
    /// data phase, written last, wiped on failure.
    #[serde(skip)]
    pub held: Extents,
    /// Byte ranges where the source disk kept its own table: zeroed in the data, because the
    /// target's table lives where `held` says.
    #[serde(skip)]
    pub source_table: Extents,
    /// Where the in-progress marker goes (inside `held`).
    #[serde(skip)]
    pub marker_at: Option<u64>,
    /// Slots from here on are not written by the data phase: the partitions there are rebuilt.
    #[serde(skip)]
    pub keep_end: Option<u64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn table_name(t: &PartitionTable) -> &'static str {
    match t {
        PartitionTable::None => "none",
        PartitionTable::Gpt(_) => "gpt",
        PartitionTable::Mbr(_) => "mbr",
    }
}

/// How partition `p` grows: its filesystem's tool, or `pvresize` for the PV of a VG of one PV.
fn part_growable(p: &Partition) -> Option<ResizeKind> {
    match (&p.fs, single_pv(p)) {
        (Some(f), _) => growable(f.kind),
        (None, Some(_)) => Some(ResizeKind::Lvm),
        (None, None) => None,
    }
}

/// The PV of `p` when it is mapped: not inside an MD member, its VG on this PV alone.
fn single_pv(p: &Partition) -> Option<&LvmPv> {
    p.lvm
        .as_deref()
        .filter(|pv| p.md.is_none() && p.whole.is_none() && pv.vg.pv_count == 1)
}

fn growable(kind: FsKind) -> Option<ResizeKind> {
    match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => Some(ResizeKind::Ext),
        FsKind::Ntfs => Some(ResizeKind::Ntfs),
        FsKind::Swap => Some(ResizeKind::Swap),
        FsKind::Xfs => Some(ResizeKind::Xfs),
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => None,
    }
}

/// Resolve `--target` into one target per source disk, or per disk of a prefix of them when the
/// disks past it may be left out (see [`left_out`]).
pub fn targets(layout: &LayoutArgs, disks: &[Disk], safety: &Safety) -> Result<Vec<Target>> {
    let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
    if layout.target.len() == 1 && layout.target[0] == "auto" {
        return target::auto_assign(&sizes, target::discover()?, safety).or_else(|e| {
            // Fewer disks than the source had: enough when the rest only mirrored them.
            let k = (1..disks.len()).find(|&k| left_out(disks, k).is_ok());
            match k {
                Some(k) => {
                    target::auto_assign(&sizes[..k], target::discover()?, safety).map_err(|_| e)
                }
                None => Err(e),
            }
        });
    }
    let n = layout.target.len();
    if n > disks.len() || n == 0 {
        bail!(
            "the snapshot has {} disk(s) ({}) but {n} target(s) were given",
            disks.len(),
            disks
                .iter()
                .map(|d| format!("disk {}: {}", d.number, bytes(d.size)))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    if n < disks.len() {
        left_out(disks, n).with_context(|| {
            format!(
                "the snapshot has {} disk(s) but {n} target(s) were given",
                disks.len()
            )
        })?;
    }
    let out = layout
        .target
        .iter()
        .map(|spec| Target::from_path(spec))
        .collect::<Result<Vec<Target>>>()?;
    target::check_distinct(&out)?;
    Ok(out)
}

/// What leaving out the source disks past the first `kept` means, a line each; an error naming
/// what would be lost unless every partition of each is an active RAID1 member whose array keeps
/// an active member on a restored disk (the array then runs degraded), or a BIOS boot partition
/// (GRUB's core image for that disk alone).
pub fn left_out(disks: &[Disk], kept: usize) -> Result<Vec<String>> {
    let restored = |uuid: &str| {
        disks[..kept.min(disks.len())].iter().find_map(|d| {
            d.partitions.iter().find_map(|p| {
                p.md.as_ref()
                    .filter(|m| m.uuid == uuid && m.role.is_some())
                    .map(|_| (d.number, p.number))
            })
        })
    };
    let bios_boot = Guid::parse(BIOS_BOOT_TYPE).expect("valid GUID");
    let mut lines = Vec::new();
    for d in disks.iter().skip(kept) {
        if d.partitions.is_empty() {
            bail!(
                "disk {} ({}) cannot be left out: it holds data no other disk mirrors",
                d.number,
                bytes(d.size)
            );
        }
        let mut arrays = Vec::new();
        for p in &d.partitions {
            let is_bios_boot = match &d.table {
                PartitionTable::Gpt(g) => g
                    .partitions
                    .iter()
                    .any(|e| e.number == p.number && e.type_guid == bios_boot),
                _ => false,
            };
            let mirror =
                p.md.as_ref()
                    .filter(|m| m.level == "raid1" && m.role.is_some());
            match mirror.and_then(|m| restored(&m.uuid).map(|at| (m, at))) {
                Some((m, (dn, pn))) => arrays.push(format!(
                    "{} runs degraded from disk {dn} partition {pn}",
                    m.describe()
                )),
                None if is_bios_boot => {}
                None => bail!(
                    "disk {} ({}) cannot be left out: partition {} is not a mirror member whose array has a member on the disks restored; give a target for every disk",
                    d.number,
                    bytes(d.size),
                    p.number
                ),
            }
        }
        lines.push(format!(
            "disk {} ({}) is not restored: {}; `mdadm --add` a new disk's partition to make it a mirror again",
            d.number,
            bytes(d.size),
            arrays.join("; ")
        ));
    }
    Ok(lines)
}

/// `--grow-lv VG/LV` must name an LV of a VG on a restored disk.
fn check_grow_lv(disks: &[Disk], want: &str) -> Result<()> {
    let Some((vg, lv)) = want.split_once('/') else {
        bail!("--grow-lv {want}: expected VG/LV");
    };
    let vgs: Vec<&LvmPv> = disks
        .iter()
        .flat_map(|d| &d.partitions)
        .filter_map(|p| {
            p.lvm
                .as_deref()
                .or(p.md.as_ref().and_then(|m| m.lvm.as_deref()))
        })
        .collect();
    let Some(pv) = vgs.iter().find(|pv| pv.vg.name == vg) else {
        let names: Vec<&str> = vgs.iter().map(|pv| pv.vg.name.as_str()).collect();
        bail!(
            "--grow-lv {want}: the snapshot has no VG {vg:?} on the disks restored (VGs: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    if !pv.vg.lvs.iter().any(|l| l.name == lv) {
        lvm::choose(pv, Some(want))?;
    }
    Ok(())
}

const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";

/// Plan every disk. Refusals (too small, sector sizes that do not convert, targets in use) are
/// errors here, before anything is written.
/// `safety` is `None` for read-only uses (verify).
pub fn build(
    src: &Source,
    targets: Vec<Target>,
    safety: Option<&Safety>,
    layout: &LayoutArgs,
    mins: &Mins,
) -> Result<Plan> {
    let m = &src.snapshot.manifest;
    let notes = left_out(&m.disks, targets.len())?;
    let grow_last = layout.grow_last();
    let grow_lv = layout.grow_lv.as_deref();
    if let Some(want) = grow_lv {
        check_grow_lv(&m.disks[..targets.len().min(m.disks.len())], want)?;
    }
    let mut disks = Vec::new();
    for ((disk, index), target) in m.disks.iter().zip(&src.snapshot.indexes).zip(targets) {
        if let Some(safety) = safety {
            safety
                .check(&target)
                .with_context(|| format!("disk {}: refusing target", disk.number))?;
        }
        disks.push(
            plan_disk(disk, index, target, grow_last, grow_lv, mins)
                .with_context(|| format!("disk {}", disk.number))?,
        );
    }
    Ok(Plan {
        host: m.host.clone(),
        snapshot: m.snapshot.clone(),
        created: m.created.clone(),
        firmware: m.firmware,
        signature_checked: src.signature_checked,
        latest_check: latest_note(&src.snapshot),
        notes,
        disks,
    })
}

/// The places of the partitions that shrink or move on a target smaller than the source disk; an
/// error naming the size needed when even the smallest layout does not fit.
fn fit(
    disk: &Disk,
    target: &Target,
    src_sector: u32,
    tgt_sector: u32,
    mins: &Mins,
) -> Result<Vec<Place>> {
    let too_small = |why: String| {
        anyhow!(
            "target {} is too small: it has {} bytes ({}), the snapshot's disk {} bytes ({}); {why}",
            target.path.display(),
            target.size,
            bytes(target.size),
            disk.size,
            bytes(disk.size)
        )
    };
    if disk.table == PartitionTable::None {
        return Err(too_small(
            "with no partition table there is nothing to shrink".into(),
        ));
    }
    if src_sector != tgt_sector {
        return Err(too_small(format!(
            "shrinking onto {tgt_sector}-byte sectors from {src_sector} is not supported"
        )));
    }
    let mut parts = disk.partitions.clone();
    parts.sort_by_key(|p| p.offset);
    let measured = !mins.is_empty();
    let min = |p: &Partition| {
        shrink::shrinkable(p).and_then(|_| {
            mins.get(&(disk.number, p.number))
                .copied()
                .or_else(|| shrink::estimate(p))
        })
    };
    let end = shrink::usable_end(&disk.table, target.size, tgt_sector);
    match shrink::layout(&parts, end, min) {
        Ok(places) => Ok(places
            .into_iter()
            .filter(|p| p.moved() || p.shrunk())
            .collect()),
        Err(needed) => {
            let total = shrink::disk_needed(&disk.table, needed, tgt_sector);
            Err(too_small(format!(
                "even with its ext and NTFS filesystems shrunk to {} (XFS and the rest cannot shrink), it needs at least {total} bytes ({})",
                if measured { "the minimums their tools measured" } else { "about their used data" },
                bytes(total)
            )))
        }
    }
}

fn plan_disk(
    disk: &Disk,
    index: &ChunkIndex,
    target: Target,
    grow_last: bool,
    grow_lv: Option<&str>,
    mins: &Mins,
) -> Result<DiskPlan> {
    let src_sector = disk.logical_sector;
    let tgt_sector = target.logical_sector.unwrap_or(src_sector);
    if !matches!(tgt_sector, 512 | 4096) {
        bail!(
            "{} has {tgt_sector}-byte sectors; only 512 and 4096 are supported",
            target.path.display()
        );
    }
    let relocate = if target.size < disk.size {
        fit(disk, &target, src_sector, tgt_sector, mins)?
    } else {
        Vec::new()
    };
    if target.kind == Kind::Block && !target.size.is_multiple_of(tgt_sector as u64) {
        bail!(
            "{}: size is not a multiple of its sector size",
            target.path.display()
        );
    }
    let bigger = target.size > disk.size;
    // md finds a 1.0 or 0.90 superblock from the device's end: on a bigger whole disk it would
    // find none, and the array would be gone.
    let whole_md = disk
        .partitions
        .iter()
        .find(|p| p.number == 0)
        .and_then(|p| p.md.as_ref());
    if let Some(m) = whole_md.filter(|m| bigger && matches!(m.metadata.as_str(), "1.0" | "0.90")) {
        bail!(
            "the disk is an {} with no partition table, whose superblock sits at the device's end: on {} md would not find it; restore onto a disk of exactly {} bytes",
            m.describe(),
            target.path.display(),
            disk.size
        );
    }
    let mut notes = Vec::new();
    let last = disk.partitions.iter().max_by_key(|p| p.offset + p.size);
    let last_growable = last.and_then(part_growable).is_some();
    let grow = grow_last && bigger && disk.table != PartitionTable::None && last_growable;
    if bigger {
        let extra = bytes(target.size - disk.size);
        if disk.table == PartitionTable::None {
            notes.push(format!(
                "no partition table: the {extra} past the snapshot's disk are left as they are"
            ));
        } else if !grow_last {
            notes.push(format!(
                "--grow none: the {extra} past the last partition stay unallocated"
            ));
        } else if !last_growable {
            let what = match (
                last.and_then(|p| p.fs.as_ref()),
                last.and_then(|p| p.lvm.as_ref()),
            ) {
                (Some(f), _) => {
                    format!("its {:?} filesystem cannot be grown", f.kind).to_lowercase()
                }
                (None, _) => match (
                    last.and_then(|p| p.md.as_ref()),
                    last.and_then(|p| p.lvm.as_ref()),
                ) {
                    (Some(m), _) => format!(
                        "it is an {}: growing arrays is not implemented",
                        m.describe()
                    ),
                    (None, Some(pv)) if pv.vg.pv_count > 1 => format!(
                        "it holds a PV of VG {}, which spans {} PVs: only a VG of one PV is grown",
                        pv.vg.name, pv.vg.pv_count
                    ),
                    (None, Some(pv)) => {
                        format!("it holds the PV of VG {}, copied whole", pv.vg.name)
                    }
                    (None, None) => "its filesystem is unknown".to_string(),
                },
            };
            let n = last.map(|p| p.number).unwrap_or(0);
            notes.push(format!(
                "partition {n} is not grown ({what}): the {extra} past it stay unallocated"
            ));
        }
    }
    let placed: Vec<(u32, u64, u64)> = relocate
        .iter()
        .map(|p| (p.number, p.offset, p.size))
        .collect();
    let source_layout = if placed.is_empty() {
        disk.table.clone()
    } else {
        disk.table.placed(src_sector, &placed)?
    };
    let mut attempt = table::for_target(&source_layout, src_sector, target.size, tgt_sector, grow);
    if grow {
        if let Err(e) = &attempt {
            // Growing is a convenience: when it cannot be laid out, restore with the source sizes.
            let plain =
                table::for_target(&source_layout, src_sector, target.size, tgt_sector, false);
            if plain.is_ok() {
                notes.push(format!(
                    "the last partition cannot be grown ({e:#}); the {} past it stay unallocated",
                    bytes(target.size - disk.size)
                ));
                attempt = plain;
            }
        }
    }
    let new_table = attempt.with_context(|| {
        format!(
            "laying out the {} table for {} ({}-byte sectors)",
            table_name(&disk.table),
            target.path.display(),
            tgt_sector
        )
    })?;
    let new_parts = new_table.partitions(tgt_sector);
    let mut partitions = Vec::new();
    let mut resize = Vec::new();
    for p in &disk.partitions {
        let np = new_parts.iter().find(|n| n.number == p.number);
        let (offset, size) = np.map(|n| (n.offset, n.size)).unwrap_or((p.offset, p.size));
        let kind = p.fs.as_ref().map(|f| f.kind);
        if let Some(pl) = relocate.iter().find(|r| r.number == p.number) {
            let mut action = match pl.shrink {
                Some(k) => format!(
                    "shrink to {} ({}; its minimum {} {})",
                    bytes(pl.size),
                    k.tool(),
                    if mins.is_empty() {
                        "is about"
                    } else {
                        "measured"
                    },
                    bytes(pl.min.unwrap_or(0))
                ),
                None => "copy".to_string(),
            };
            if pl.moved() {
                action.push_str(&format!(", move to {}", bytes(pl.offset)));
            }
            partitions.push(PartPlan {
                volume: None,
                number: p.number,
                offset,
                size,
                source_size: p.size,
                fs: kind,
                label: p.fs.as_ref().and_then(|f| f.label.clone()),
                source_offset: p.offset,
                action,
            });
            continue;
        }
        if offset != p.offset {
            bail!(
                "partition {} would move from byte {} to {}: restoring needs the same offsets",
                p.number,
                p.offset,
                offset
            );
        }
        let mut action = "copy".to_string();
        if size > p.size {
            match part_growable(p) {
                Some(ResizeKind::Lvm) => {
                    let pv = single_pv(p).context("a mapped PV")?;
                    let lv = lvm::choose(pv, grow_lv)?;
                    action = match &lv {
                        Some(lv) => format!(
                            "copy, grow the PV to {} (pvresize) and LV {} by {} (lvextend, {})",
                            bytes(size),
                            lv.name(),
                            bytes(lvm::free_after(pv, size)),
                            lv.fs.tool()
                        ),
                        None => format!(
                            "copy, grow the PV to {} (pvresize); no LV holds a filesystem that grows: its {} of free extents stay free",
                            bytes(size),
                            bytes(lvm::free_after(pv, size))
                        ),
                    };
                    resize.push(Resize {
                        partition: p.number,
                        kind: ResizeKind::Lvm,
                        offset,
                        size,
                        from_size: p.size,
                        uuid: None,
                        label: None,
                        lv,
                    });
                }
                Some(k) => {
                    let tool = k.tool();
                    action = format!("copy, grow to {} ({tool})", bytes(size));
                    resize.push(Resize {
                        lv: None,
                        partition: p.number,
                        kind: k,
                        offset,
                        size,
                        from_size: p.size,
                        uuid: p.fs.as_ref().and_then(|f| f.uuid.clone()),
                        label: p.fs.as_ref().and_then(|f| f.label.clone()),
                    });
                }
                None => {
                    action = format!("copy; partition grows to {}, filesystem kept", bytes(size))
                }
            }
        } else if size < p.size {
            bail!(
                "partition {} would shrink from {} to {} bytes",
                p.number,
                p.size,
                size
            );
        }
        if tgt_sector == 4096
            && src_sector == 512
            && matches!(kind, Some(FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32))
        {
            notes.push(format!(
                "partition {}: FAT with 512-byte sectors on a 4096-byte-sector disk; some firmware and Linux refuse to mount it",
                p.number
            ));
        }
        let volume = match (&p.md, &p.lvm) {
            (Some(m), _) => {
                let inner = match (&m.fs, &m.lvm) {
                    (Some(f), _) => format!(", holding {}", format!("{:?}", f.kind).to_lowercase()),
                    (None, Some(pv)) => format!(", holding the LVM2 PV of VG {}", pv.vg.name),
                    (None, None) => String::new(),
                };
                Some(format!("{}{inner}", m.describe()))
            }
            (None, Some(pv)) => Some(format!("LVM2 PV of VG {}", pv.vg.name)),
            (None, None) => None,
        };
        partitions.push(PartPlan {
            volume,
            number: p.number,
            offset,
            source_offset: p.offset,
            size,
            source_size: p.size,
            fs: kind,
            label: p.fs.as_ref().and_then(|f| f.label.clone()),
            action,
        });
    }
    let mut held = Extents::new();
    for (s, e) in table::regions(&new_table, target.size, tgt_sector) {
        held.add(s, e.min(target.size));
    }
    if new_table == PartitionTable::None {
        // No table to hold back: hold back the first 4 KiB (boot sector, superblocks of FAT and
        // NTFS, the ext superblock's neighbourhood) so a half-written disk shows no filesystem.
        held.add(0, 4096.min(disk.size));
        // And an MD member's superblock, so a half-written disk is never assembled.
        if let Some(at) = whole_md.and_then(|m| md::superblock_at(&m.metadata, disk.size)) {
            held.add(at, (at + md::SUPERBLOCK_BYTES).min(disk.size));
        }
    }
    let mut source_table = Extents::new();
    for (s, e) in table::regions(&disk.table, disk.size, src_sector) {
        source_table.add(s, e.min(disk.size));
    }
    let marker_at = held
        .ranges()
        .iter()
        .find(|(s, e)| e - s >= MARKER_LEN)
        .map(|r| r.0);
    let mut plan = DiskPlan {
        disk: disk.number,
        source_size: disk.size,
        source_sector: src_sector,
        target_sector: tgt_sector,
        table: table_name(&disk.table),
        fit: if bigger {
            "bigger"
        } else if target.size == disk.size {
            "same"
        } else {
            "smaller"
        },
        scratch_bytes: relocate
            .iter()
            .map(|p| shrink::data_within(index, p.from_offset, p.from_size))
            .sum(),
        // On a smaller target nothing past the partitions is written (what a source kept after
        // its last partition is not restored).
        keep_end: relocate.iter().map(|p| p.from_offset).min().or_else(|| {
            (target.size < disk.size).then(|| {
                disk.partitions
                    .iter()
                    .map(|p| p.offset + p.size)
                    .max()
                    .unwrap_or(0)
            })
        }),
        relocate,
        partitions,
        resize,
        data_slots: 0,
        distinct_chunks: 0,
        data_bytes: 0,
        zero_slots: 0,
        zero_bytes: 0,
        unused_slots: 0,
        unused_bytes: 0,
        notes,
        new_table,
        held,
        source_table,
        marker_at,
        target,
    };
    let mut distinct = HashSet::new();
    for (i, slot) in index.slots() {
        let (off, len) = index.span(i);
        if plan.keep_end.is_some_and(|k| off >= k) {
            continue;
        }
        match slot {
            Slot::Unused => {
                plan.unused_slots += 1;
                plan.unused_bytes += len;
            }
            Slot::Zeros => {
                plan.zero_slots += 1;
                plan.zero_bytes += len;
            }
            Slot::Data(d) => {
                plan.data_slots += 1;
                plan.data_bytes += len;
                distinct.insert(d);
            }
        }
    }
    plan.distinct_chunks = distinct.len() as u64;
    Ok(plan)
}

impl Plan {
    /// The plan in words, as shown before the first write.
    pub fn print(&self) {
        let sig = match (self.signature_checked, self.latest_check.is_empty()) {
            (true, true) => "signature verified".to_string(),
            (true, false) => format!("signature verified; {}", self.latest_check),
            (false, _) => "signature not checked (no --pubkey)".to_string(),
        };
        println!(
            "snapshot {}/{} (created {}, {:?} firmware, {sig})",
            self.host, self.snapshot, self.created, self.firmware
        );
        for d in &self.disks {
            println!("disk {} -> {}", d.disk, d.target.describe());
            let fit = match d.fit {
                "bigger" => format!("target {} bigger", bytes(d.target.size - d.source_size)),
                "smaller" => format!(
                    "target {} smaller{}",
                    bytes(d.source_size - d.target.size),
                    if d.scratch_bytes > 0 {
                        format!(
                            "; {} of data rebuilt in the scratch directory first",
                            bytes(d.scratch_bytes)
                        )
                    } else {
                        String::new()
                    }
                ),
                _ => "same size".to_string(),
            };
            let conv = if d.source_sector != d.target_sector {
                format!(", table converted to {}-byte sectors", d.target_sector)
            } else {
                String::new()
            };
            println!(
                "  source {} ({} bytes), {} table, {}-byte sectors; {fit}{conv}",
                bytes(d.source_size),
                d.source_size,
                d.table,
                d.source_sector
            );
            for p in &d.partitions {
                let fs = match (p.fs, &p.volume) {
                    (Some(k), _) => format!("{k:?}").to_lowercase(),
                    (None, Some(v)) => v.clone(),
                    (None, None) => "unknown".into(),
                };
                let label = p
                    .label
                    .as_deref()
                    .map(|l| format!(" {l:?}"))
                    .unwrap_or_default();
                let name = if p.number == 0 {
                    "disk".to_string()
                } else {
                    format!("{:>4}", p.number)
                };
                println!(
                    "  {name}  at {:>10}  {:>10}  {fs}{label}: {}",
                    bytes(p.source_offset),
                    bytes(p.source_size),
                    p.action
                );
            }
            println!(
                "  writes {} of data ({} slots, {} distinct chunks) and {} of zeros; skips {} unused",
                bytes(d.data_bytes),
                d.data_slots,
                d.distinct_chunks,
                bytes(d.zero_bytes),
                bytes(d.unused_bytes)
            );
            for n in &d.notes {
                println!("  note: {n}");
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}
