//! Linux MD RAID members: the mdadm superblock (metadata 1.1 at the start of the device, 1.2 at
//! 4 KiB, 1.0 and 0.90 near its end), checked by magic, version, checksum and bounds.
//!
//! A RAID1 member holds a complete copy of the array's data at `data_offset`, so the filesystem
//! (or LVM2 physical volume) inside is probed there like a partition's, and only its used blocks
//! are kept. The two members of a mirror then chunk to the same data, which the store keeps once.
//! Everything of the member outside the data area (superblock, write-intent bitmap, bad-block
//! log, reserved space) is kept as it is, so the restored member is the source's, bit for bit
//! where it matters: same array UUID, name, level, device role and event count (`mdadm
//! --examine` reads the same).
//!
//! Copied whole, with the reason: members of striped or parity arrays (RAID0/4/5/6/10, linear:
//! their data is spread over several disks), spares and faulty members, and members being
//! recovered or reshaped (their data area is not a complete copy).

use super::lvm;
use crate::extents::Extents;
use crate::fs::exclude::Exclusions;
use crate::fs::{self, le, Found, Part};
use crate::manifest::MdMember;
use crate::source::ReadAt;
use anyhow::{bail, Result};

const SECTOR: u64 = 512;
const MAGIC: u32 = 0xa92b_4efc;
const SB_BYTES: usize = 4096;
/// 1.x feature bits after which the data area is not a complete copy.
const FEATURE_RECOVERY: u32 = 2;
const FEATURE_RESHAPE: u32 = 4;

/// What the analysis of an MD member found.
#[derive(Debug)]
pub struct Analysis {
    pub member: MdMember,
    /// Bytes of the partition to keep, relative to its start.
    pub used: Extents,
    /// Things the operator should hear about, one line each.
    pub notes: Vec<String>,
}

/// `None` when the device carries no MD superblock; an error when one is found but fails its
/// checks (the caller copies the device whole with the reason).
pub fn analyze(
    dev: &dyn ReadAt,
    offset: u64,
    len: u64,
    ex: &Exclusions,
) -> Option<Result<Analysis>> {
    let part = Part { dev, offset, len };
    let (at, sb) = find(&part)?;
    Some(parse(&sb, at, len).map(|m| map(&part, m, ex)))
}

/// Where a superblock with the MD magic lies: the 1.x places first, then 0.90's.
fn find(part: &Part) -> Option<(u64, Vec<u8>)> {
    let sectors = part.len / SECTOR;
    let mut places = vec![0, 8 * SECTOR];
    if sectors > 16 {
        places.push(((sectors - 16) & !7) * SECTOR);
    }
    if sectors >= 256 {
        places.push(((sectors & !127) - 128) * SECTOR);
    }
    for at in places {
        if at + SB_BYTES as u64 > part.len {
            continue;
        }
        let mut b = vec![0u8; SB_BYTES];
        if part.read(at, &mut b, "MD superblock").is_ok() && le::u32(&b, 0) == MAGIC {
            return Some((at, b));
        }
    }
    None
}

/// The member a superblock found at byte `at` of a `len`-byte device describes.
fn parse(sb: &[u8], at: u64, len: u64) -> Result<MdMember> {
    let m = match le::u32(sb, 4) {
        1 => parse_v1(sb, at, len)?,
        0 => parse_v090(sb, at, len)?,
        v => bail!("MD superblock at byte {at}: major version {v} is not one mdadm writes"),
    };
    let end = m.data_offset.checked_add(m.data_size);
    if end.is_some_and(|e| m.data_offset < at + SB_BYTES as u64 && at < e) {
        bail!("MD superblock at byte {at}: its data area covers it");
    }
    if m.data_size == 0 || end.is_none_or(|e| e > len) {
        bail!(
            "MD superblock at byte {at}: its data area ({} bytes at {}) does not fit the {len}-byte device",
            m.data_size,
            m.data_offset
        );
    }
    Ok(m)
}

fn parse_v1(sb: &[u8], at: u64, len: u64) -> Result<MdMember> {
    let max_dev = le::u32(sb, 220) as usize;
    if max_dev > (SB_BYTES - 256) / 2 {
        bail!("MD superblock at byte {at}: {max_dev} device roles do not fit in it");
    }
    let size = 256 + max_dev * 2;
    let mut sum: u64 = sb[..size & !3]
        .chunks_exact(4)
        .enumerate()
        .map(|(i, w)| {
            if i == 216 / 4 {
                0
            } else {
                u64::from(le::u32(w, 0))
            }
        })
        .sum();
    if size % 4 == 2 {
        sum += u64::from(le::u16(sb, size - 2));
    }
    let csum = ((sum & 0xffff_ffff) + (sum >> 32)) as u32;
    if csum != le::u32(sb, 216) {
        bail!(
            "MD superblock at byte {at}: checksum {:#010x}, computed {csum:#010x}",
            le::u32(sb, 216)
        );
    }
    let super_offset = le::u64(sb, 144);
    let Some(minor) = ["1.1", "1.2", "1.0"]
        .into_iter()
        .find(|v| superblock_at(v, len) == Some(at))
    else {
        bail!("MD 1.x superblock at byte {at}, where no 1.x version puts it");
    };
    if super_offset.checked_mul(SECTOR) != Some(at) {
        bail!("MD superblock at byte {at} says it lies at sector {super_offset}");
    }
    let dev_number = le::u32(sb, 160) as usize;
    let raid_disks = le::u32(sb, 92);
    let role = (dev_number < max_dev)
        .then(|| u32::from(le::u16(sb, 256 + dev_number * 2)))
        .filter(|&r| r < raid_disks);
    let name_raw = &sb[32..64];
    let name =
        String::from_utf8_lossy(&name_raw[..name_raw.iter().position(|&c| c == 0).unwrap_or(32)])
            .into_owned();
    let features = le::u32(sb, 8);
    let mut whole = None;
    if features & FEATURE_RECOVERY != 0 {
        whole = Some("the member is being recovered: its data area is not a complete copy".into());
    } else if features & FEATURE_RESHAPE != 0 {
        whole = Some("the array is being reshaped".into());
    }
    Ok(MdMember {
        metadata: minor.into(),
        uuid: uuid_bytes(&sb[16..32]),
        name,
        level: level(le::u32(sb, 72) as i32),
        raid_disks,
        role,
        data_offset: le::u64(sb, 128).saturating_mul(SECTOR),
        data_size: le::u64(sb, 80).saturating_mul(SECTOR),
        events: le::u64(sb, 200),
        fs: None,
        lvm: None,
        excluded: Vec::new(),
        whole,
    })
}

fn parse_v090(sb: &[u8], at: u64, len: u64) -> Result<MdMember> {
    let w = |i: usize| le::u32(sb, i * 4);
    if (w(1), w(2)) != (0, 90) {
        bail!("MD superblock at byte {at}: version 0.{} is not 0.90", w(2));
    }
    let expected = ((len / SECTOR) & !127).saturating_sub(128) * SECTOR;
    if at != expected {
        bail!("MD 0.90 superblock at byte {at}, where the device's size puts it at {expected}");
    }
    let sum: u64 = (0..SB_BYTES / 4)
        .map(|i| if i == 38 { 0 } else { u64::from(w(i)) })
        .sum();
    let csum = ((sum & 0xffff_ffff) + (sum >> 32)) as u32;
    if csum != w(38) {
        bail!(
            "MD 0.90 superblock at byte {at}: checksum {:#010x}, computed {csum:#010x}",
            w(38)
        );
    }
    let (raid_disk, state) = (w(995), w(996));
    let faulty = state & 1 != 0;
    let sync = state & 4 != 0;
    let raid_disks = w(10);
    Ok(MdMember {
        metadata: "0.90".into(),
        uuid: [w(5), w(13), w(14), w(15)]
            .iter()
            .map(|x| format!("{x:08x}"))
            .collect::<Vec<_>>()
            .join(":"),
        name: String::new(),
        level: level(w(7) as i32),
        raid_disks,
        role: (!faulty && sync && raid_disk < raid_disks).then_some(raid_disk),
        data_offset: 0,
        data_size: u64::from(w(8)) * 1024,
        events: (u64::from(w(40)) << 32) | u64::from(w(39)),
        fs: None,
        lvm: None,
        excluded: Vec::new(),
        whole: None,
    })
}

/// The array UUID as `mdadm --examine` prints it.
fn uuid_bytes(b: &[u8]) -> String {
    b.chunks(4).map(hex::encode).collect::<Vec<_>>().join(":")
}

fn level(l: i32) -> String {
    match l {
        -4 => "multipath".into(),
        -1 => "linear".into(),
        l => format!("raid{l}"),
    }
}

/// Keep everything outside the data area; inside it, what the content's own map says (RAID1
/// members in sync) or all of it.
fn map(part: &Part, mut m: MdMember, ex: &Exclusions) -> Analysis {
    let mut used = Extents::whole(0, part.len);
    let mut notes = Vec::new();
    let what = format!("MD {} member of array {} ({})", m.level, m.uuid, m.metadata);
    if m.whole.is_none() {
        if m.level != "raid1" {
            m.whole = Some(format!(
                "{} data is spread over its members; only RAID1 members are mapped",
                m.level
            ));
        } else if m.role.is_none() {
            m.whole = Some("a spare or faulty member".into());
        }
    }
    if let Some(w) = &m.whole {
        notes.push(format!("{what}: copied whole: {w}"));
        return Analysis {
            member: m,
            used,
            notes,
        };
    }
    let (start, len) = (m.data_offset, m.data_size);
    let inner = Extents::whole(0, len);
    let content = match lvm::analyze(part.dev, part.offset + start, len, ex) {
        Some(Ok(a)) => {
            notes.extend(a.notes.iter().map(|n| format!("{what}: {n}")));
            m.lvm = Some(Box::new(a.pv));
            Some(a.used)
        }
        Some(Err(e)) => {
            m.whole = Some(format!("lvm2: {e:#}"));
            None
        }
        None => {
            let (found, excluded, ex_notes) =
                fs::probe_excluding(part.dev, part.offset + start, len, ex);
            notes.extend(ex_notes.iter().map(|n| format!("{what}: {n}")));
            m.excluded = excluded;
            match found {
                Found::Known(p) => {
                    m.fs = Some(p.fs);
                    Some(p.used)
                }
                Found::Unknown => Some(inner),
                Found::Damaged { kind, reason } => {
                    let kind = format!("{kind:?}").to_lowercase();
                    m.whole = Some(format!("{kind}: {reason}"));
                    None
                }
            }
        }
    };
    match content {
        Some(c) => {
            let inner = match (&m.fs, &m.lvm) {
                (Some(f), _) => format!("its {:?} filesystem", f.kind).to_lowercase(),
                (None, Some(pv)) => format!("the LVM2 PV of VG {}", pv.vg.name),
                (None, None) => "its data area (no filesystem recognised, kept whole)".into(),
            };
            notes.push(format!("{}: {inner} mapped inside the array", m.describe()));
            used.remove(start, start + len);
            used.add_shifted(&c, start);
        }
        None => notes.push(format!(
            "{what}: its data area is copied whole, its used-block map cannot be trusted: {}",
            m.whole.as_deref().unwrap_or("")
        )),
    }
    Analysis {
        member: m,
        used,
        notes,
    }
}

/// Where a member's superblock lies on a `len`-byte device, by its metadata version (1.0 and
/// 0.90 sit near the end: on a device of another size, md looks elsewhere).
pub fn superblock_at(metadata: &str, len: u64) -> Option<u64> {
    let sectors = len / SECTOR;
    match metadata {
        "1.1" => Some(0),
        "1.2" => Some(8 * SECTOR),
        "1.0" => sectors.checked_sub(16).map(|s| (s & !7) * SECTOR),
        "0.90" => ((sectors & !127) >= 128).then(|| ((sectors & !127) - 128) * SECTOR),
        _ => None,
    }
}

/// Bytes of the superblock (both layouts write 4 KiB).
pub const SUPERBLOCK_BYTES: u64 = SB_BYTES as u64;

impl MdMember {
    /// One line for plans and summaries: `md raid1 member 0 of web1:data (1.2, 3b1f...)`.
    pub fn describe(&self) -> String {
        let role = self
            .role
            .map(|r| format!("member {r}"))
            .unwrap_or_else(|| "spare".into());
        let name = if self.name.is_empty() {
            &self.uuid
        } else {
            &self.name
        };
        format!("md {} {role} of {name} ({})", self.level, self.metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: u64 = 8 << 20;

    /// A 1.2 member of a 2-disk RAID1 as mdadm lays it out: superblock at 4 KiB, data at 1 MiB.
    fn member(level: u32, role: u16) -> Vec<u8> {
        let mut d = vec![0u8; LEN as usize];
        let sb = &mut d[4096..8192];
        sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        sb[4..8].copy_from_slice(&1u32.to_le_bytes());
        sb[16..32].copy_from_slice(&[0x11; 16]);
        sb[32..41].copy_from_slice(b"web1:data");
        sb[72..76].copy_from_slice(&level.to_le_bytes());
        sb[80..88].copy_from_slice(&((LEN - (1 << 20)) / 512).to_le_bytes());
        sb[92..96].copy_from_slice(&2u32.to_le_bytes());
        sb[128..136].copy_from_slice(&2048u64.to_le_bytes());
        sb[144..152].copy_from_slice(&8u64.to_le_bytes());
        sb[200..208].copy_from_slice(&42u64.to_le_bytes());
        sb[220..224].copy_from_slice(&2u32.to_le_bytes());
        sb[256..258].copy_from_slice(&role.to_le_bytes());
        sb[258..260].copy_from_slice(&1u16.to_le_bytes());
        let sum: u64 = sb[..260 & !3]
            .chunks_exact(4)
            .map(|w| u64::from(le::u32(w, 0)))
            .sum();
        let csum = ((sum & 0xffff_ffff) + (sum >> 32)) as u32;
        sb[216..220].copy_from_slice(&csum.to_le_bytes());
        d
    }

    #[test]
    fn raid1_member_is_read_and_its_data_area_probed() {
        let d = member(1, 0);
        let a = analyze(&d, 0, LEN, &Exclusions::none()).unwrap().unwrap();
        let m = &a.member;
        assert_eq!((m.metadata.as_str(), m.level.as_str()), ("1.2", "raid1"));
        assert_eq!(m.uuid, "11111111:11111111:11111111:11111111");
        assert_eq!(
            (m.name.as_str(), m.role, m.events),
            ("web1:data", Some(0), 42)
        );
        assert_eq!((m.data_offset, m.data_size), (1 << 20, LEN - (1 << 20)));
        assert!(m.whole.is_none(), "{m:?}");
        // Nothing recognised in the data area: all of it kept.
        assert_eq!(a.used.ranges(), &[(0, LEN)]);
        assert_eq!(superblock_at("1.2", LEN), Some(4096));
    }

    #[test]
    fn damaged_or_unmapped_members_are_said_so() {
        let mut d = member(1, 0);
        d[4096 + 100] ^= 1;
        let e = analyze(&d, 0, LEN, &Exclusions::none())
            .unwrap()
            .unwrap_err();
        assert!(format!("{e:#}").contains("checksum"), "{e:#}");

        let d = member(5, 0);
        let a = analyze(&d, 0, LEN, &Exclusions::none()).unwrap().unwrap();
        assert!(
            a.member.whole.as_deref().unwrap().contains("raid5"),
            "{a:?}"
        );
        assert_eq!(a.used.ranges(), &[(0, LEN)]);

        let d = member(1, 0xffff);
        let a = analyze(&d, 0, LEN, &Exclusions::none()).unwrap().unwrap();
        assert!(a.member.role.is_none() && a.member.whole.is_some(), "{a:?}");

        // A data area past the device's end is refused, not read.
        let d = member(1, 0);
        let e = analyze(&d, 0, LEN / 2, &Exclusions::none());
        assert!(e.is_none_or(|r| r.is_err()));
        assert!(analyze(&vec![0u8; 1 << 20], 0, 1 << 20, &Exclusions::none()).is_none());
    }
}
