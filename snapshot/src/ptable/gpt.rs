//! GPT: parse (512- and 4096-byte sectors) with every field needed to write the table again, and
//! write it again for a target disk of another size or sector size.
//!
//! Reading checks the header CRC, the entry-array CRC and every location against the disk; a
//! damaged primary header falls back to the backup header at the last LBA (and says so in
//! [`Gpt::notes`]). Partitions outside the usable range or overlapping each other are refused.

use super::{mbr, Guid, Partition};
use crate::fs::le;
use crate::source::ReadAt;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

const SIGNATURE: &[u8; 8] = b"EFI PART";
const HEADER_SIZE: u32 = 92;
const REVISION_1_0: u32 = 0x0001_0000;
/// Largest entry array we accept (the usual one is 16 KiB).
const MAX_ENTRY_ARRAY: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

fn default_revision() -> u32 {
    REVISION_1_0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt {
    pub disk_guid: Guid,
    /// LBA of the partition entry array in the primary header.
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// LBA of the backup header as the source disk had it (for a table made by
    /// [`Gpt::for_target`]: the last LBA of the target).
    pub backup_lba: u64,
    pub partitions: Vec<GptPartition>,
    /// Header revision (0x00010000 for every GPT in the wild).
    #[serde(default = "default_revision")]
    pub revision: u32,
    /// Bytes 446..510 of sector 0 (the four MBR entries of the protective or hybrid MBR), hex, as
    /// the source had them. Written back verbatim when their 0xEE entry still describes the target
    /// disk; otherwise a standard protective MBR is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protective_mbr: Option<String>,
    /// What reading noticed and worked around (backup header used, backup damaged...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
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
    /// The 72 name bytes (hex) when `name` does not encode back to exactly them (bytes after the
    /// terminating NUL, invalid UTF-16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_raw: Option<String>,
}

/// A parsed header (primary or backup) and its entry array.
struct Header {
    revision: u32,
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries: Vec<u8>,
}

enum Found {
    /// No "EFI PART" signature at that LBA.
    Absent,
    /// Signature present, but the header or its entry array does not hold together.
    Damaged(String),
    Valid(Header),
}

fn check_sector(sector: u32) -> Result<()> {
    if !matches!(sector, 512 | 4096) {
        bail!("unsupported logical sector size {sector} (512 or 4096)");
    }
    Ok(())
}

fn entry_sectors(count: u32, size: u32, sector: u32) -> Result<u64> {
    let bytes = u64::from(count)
        .checked_mul(u64::from(size))
        .filter(|&b| b <= MAX_ENTRY_ARRAY)
        .ok_or_else(|| anyhow!("GPT entry array of {count} x {size} bytes is too large"))?;
    Ok(bytes.div_ceil(u64::from(sector)).max(1))
}

fn read_header(dev: &dyn ReadAt, sector: u32, lba: u64, disk_lbas: u64) -> Result<Found> {
    let ss = u64::from(sector);
    let mut buf = vec![0u8; sector as usize];
    let off = lba
        .checked_mul(ss)
        .ok_or_else(|| anyhow!("LBA {lba} overflows"))?;
    dev.read_at(&mut buf, off)
        .with_context(|| format!("reading the GPT header at LBA {lba} (byte {off})"))?;
    if buf.get(0..8) != Some(&SIGNATURE[..]) {
        return Ok(Found::Absent);
    }
    let revision = le::u32(&buf, 8);
    let header_size = le::u32(&buf, 12);
    if header_size < HEADER_SIZE || header_size > sector {
        return Ok(Found::Damaged(format!(
            "header size {header_size} is outside {HEADER_SIZE}..={sector}"
        )));
    }
    let stored_crc = le::u32(&buf, 16);
    let mut h = buf
        .get(0..header_size as usize)
        .unwrap_or_default()
        .to_vec();
    le::put32(&mut h, 16, 0);
    let crc = crc32fast::hash(&h);
    if crc != stored_crc {
        return Ok(Found::Damaged(format!(
            "header CRC32 mismatch (stored {stored_crc:08x}, computed {crc:08x})"
        )));
    }
    let hdr_lba = le::u64(&buf, 24);
    if hdr_lba != lba {
        return Ok(Found::Damaged(format!(
            "header says it lives at LBA {hdr_lba}, found at LBA {lba}"
        )));
    }
    let alternate_lba = le::u64(&buf, 32);
    let first_usable = le::u64(&buf, 40);
    let last_usable = le::u64(&buf, 48);
    let disk_guid = Guid(le::bytes(&buf, 56));
    let entries_lba = le::u64(&buf, 72);
    let entry_count = le::u32(&buf, 80);
    let entry_size = le::u32(&buf, 84);
    let entries_crc = le::u32(&buf, 88);
    if entry_size < 128 || !entry_size.is_power_of_two() {
        return Ok(Found::Damaged(format!(
            "entry size {entry_size} is not 128 x a power of two"
        )));
    }
    if first_usable > last_usable.saturating_add(1) || last_usable >= disk_lbas {
        return Ok(Found::Damaged(format!(
            "usable range LBA {first_usable}..={last_usable} does not fit a disk of {disk_lbas} sectors"
        )));
    }
    let nsec = match entry_sectors(entry_count, entry_size, sector) {
        Ok(n) => n,
        Err(e) => return Ok(Found::Damaged(e.to_string())),
    };
    let entries_end = entries_lba.checked_add(nsec);
    match entries_end {
        Some(end) if entries_lba >= 1 && end <= disk_lbas => {}
        _ => {
            return Ok(Found::Damaged(format!(
                "entry array at LBA {entries_lba} ({nsec} sectors) lies beyond the disk ({disk_lbas} sectors)"
            )))
        }
    }
    let entries_end = entries_end.unwrap_or(u64::MAX);
    // The entry array must stay out of the usable area and off its own header.
    let outside_usable = entries_end <= first_usable || entries_lba > last_usable;
    if !outside_usable || (entries_lba <= lba && lba < entries_end) {
        return Ok(Found::Damaged(format!(
            "entry array LBA {entries_lba}..{entries_end} overlaps the usable area \
             {first_usable}..={last_usable} or the header at LBA {lba}"
        )));
    }
    let bytes = u64::from(entry_count) * u64::from(entry_size);
    let mut entries = vec![0u8; bytes as usize];
    dev.read_at(&mut entries, entries_lba * ss)
        .with_context(|| {
            format!("reading the GPT entry array at LBA {entries_lba} ({bytes} bytes)")
        })?;
    let ecrc = crc32fast::hash(&entries);
    if ecrc != entries_crc {
        return Ok(Found::Damaged(format!(
            "entry array CRC32 mismatch at LBA {entries_lba} (stored {entries_crc:08x}, computed {ecrc:08x})"
        )));
    }
    Ok(Found::Valid(Header {
        revision,
        my_lba: lba,
        alternate_lba,
        first_usable,
        last_usable,
        disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries,
    }))
}

fn decode_name(raw: &[u8]) -> (String, Option<String>) {
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let n = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    let name = String::from_utf16_lossy(units.get(..n).unwrap_or_default());
    let canonical = encode_name(&name).ok();
    let name_raw = match canonical {
        Some(c) if c[..] == *raw => None,
        _ => Some(hex::encode(raw)),
    };
    (name, name_raw)
}

fn encode_name(name: &str) -> Result<[u8; 72]> {
    let mut out = [0u8; 72];
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > 36 {
        bail!("partition name {name:?} is longer than 36 UTF-16 code units");
    }
    for (i, u) in units.iter().enumerate() {
        le::put16(&mut out, 2 * i, *u);
    }
    Ok(out)
}

fn parse_entries(h: &Header) -> Vec<GptPartition> {
    let mut parts = Vec::new();
    for (i, e) in h.entries.chunks_exact(h.entry_size as usize).enumerate() {
        let type_guid = Guid(le::bytes(e, 0));
        if type_guid.is_zero() {
            continue;
        }
        let (name, name_raw) = decode_name(e.get(56..128).unwrap_or_default());
        parts.push(GptPartition {
            number: i as u32 + 1,
            type_guid,
            unique_guid: Guid(le::bytes(e, 16)),
            first_lba: le::u64(e, 32),
            last_lba: le::u64(e, 40),
            attributes: le::u64(e, 48),
            name,
            name_raw,
        });
    }
    parts
}

/// Partitions inside the usable range, not overlapping, numbers within the entry array.
fn check_partitions(
    parts: &[GptPartition],
    first_usable: u64,
    last_usable: u64,
    entry_count: u32,
) -> Result<()> {
    for p in parts {
        if p.number == 0 || p.number > entry_count {
            bail!(
                "GPT partition {} is outside the entry array of {entry_count} entries",
                p.number
            );
        }
        if p.first_lba > p.last_lba {
            bail!(
                "GPT partition {} ends (LBA {}) before it starts (LBA {})",
                p.number,
                p.last_lba,
                p.first_lba
            );
        }
        if p.first_lba < first_usable || p.last_lba > last_usable {
            bail!(
                "GPT partition {} (LBA {}..={}) lies outside the usable range LBA {first_usable}..={last_usable}",
                p.number,
                p.first_lba,
                p.last_lba
            );
        }
    }
    let mut sorted: Vec<&GptPartition> = parts.iter().collect();
    sorted.sort_by_key(|p| (p.first_lba, p.number));
    for w in sorted.windows(2) {
        if let [a, b] = w {
            if b.first_lba <= a.last_lba {
                bail!(
                    "GPT partitions {} (LBA {}..={}) and {} (LBA {}..={}) overlap",
                    a.number,
                    a.first_lba,
                    a.last_lba,
                    b.number,
                    b.first_lba,
                    b.last_lba
                );
            }
        }
    }
    let mut numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
    numbers.sort_unstable();
    if let Some(w) = numbers.windows(2).find(|w| w.first() == w.get(1)) {
        bail!("GPT partition number {} is used twice", w[0]);
    }
    Ok(())
}

/// Standard 255-head, 63-sector CHS address of `lba` (0xFEFFFF past cylinder 1023).
pub(crate) fn chs(lba: u64) -> [u8; 3] {
    const SPC: u64 = 255 * 63;
    if lba >= 1024 * SPC {
        return [0xFE, 0xFF, 0xFF];
    }
    let c = lba / SPC;
    let h = (lba / 63) % 255;
    let s = lba % 63 + 1;
    [
        h as u8,
        (s as u8) | (((c >> 2) & 0xC0) as u8),
        (c & 0xFF) as u8,
    ]
}

impl Gpt {
    /// `Ok(None)` when there is no GPT header at LBA 1 for this sector size (and no usable backup
    /// behind a protective MBR). An error when a GPT is there but damaged beyond the backup's
    /// help, or describes partitions that cannot be right.
    pub fn read(dev: &dyn ReadAt, sector: u32) -> Result<Option<Gpt>> {
        check_sector(sector)?;
        let ss = u64::from(sector);
        let disk_lbas = dev.size() / ss;
        if disk_lbas < 6 {
            return Ok(None);
        }
        let last = disk_lbas - 1;
        let mut notes = Vec::new();
        let (h, backup_lba) = match read_header(dev, sector, 1, disk_lbas)? {
            Found::Valid(h) => {
                let alt = h.alternate_lba;
                if alt >= disk_lbas || alt < 2 {
                    notes.push(format!(
                        "backup GPT header LBA {alt} is outside the disk ({disk_lbas} sectors)"
                    ));
                } else {
                    match read_header(dev, sector, alt, disk_lbas)? {
                        Found::Valid(b) => {
                            if b.disk_guid != h.disk_guid
                                || parse_entries(&b) != parse_entries(&h)
                                || b.first_usable != h.first_usable
                                || b.last_usable != h.last_usable
                            {
                                notes.push(format!(
                                    "backup GPT at LBA {alt} differs from the primary; the primary is used"
                                ));
                            }
                        }
                        Found::Absent => notes.push(format!(
                            "backup GPT header at LBA {alt} is missing; the primary is used"
                        )),
                        Found::Damaged(why) => notes.push(format!(
                            "backup GPT header at LBA {alt} is damaged ({why}); the primary is used"
                        )),
                    }
                }
                if alt != last && alt < disk_lbas {
                    notes.push(format!(
                        "backup GPT header at LBA {alt} is not at the end of the disk (LBA {last})"
                    ));
                }
                (h, alt)
            }
            primary => {
                let why = match primary {
                    Found::Damaged(why) => Some(why),
                    _ => None,
                };
                if why.is_none() && !mbr::is_protective(dev)? {
                    return Ok(None);
                }
                match read_header(dev, sector, last, disk_lbas)? {
                    Found::Valid(b) => {
                        notes.push(format!(
                            "primary GPT header at LBA 1 is {}; using the backup header at LBA {last} \
                             (primary entry array assumed at LBA 2)",
                            why.as_deref().map_or("missing".to_string(), |w| format!("damaged ({w})"))
                        ));
                        let nsec = entry_sectors(b.entry_count, b.entry_size, sector)?;
                        if 2 + nsec > b.first_usable {
                            bail!(
                                "backup GPT at LBA {last}: first usable LBA {} leaves no room for a \
                                 primary entry array of {nsec} sectors",
                                b.first_usable
                            );
                        }
                        let h = Header {
                            entries_lba: 2,
                            alternate_lba: b.my_lba,
                            ..b
                        };
                        (h, last)
                    }
                    backup => {
                        let Some(why) = why else {
                            return Ok(None);
                        };
                        let bwhy = match backup {
                            Found::Damaged(w) => format!("damaged ({w})"),
                            _ => "missing".to_string(),
                        };
                        bail!(
                            "GPT header at LBA 1 ({sector}-byte sectors) is damaged ({why}) and the \
                             backup header at LBA {last} is {bwhy}"
                        );
                    }
                }
            }
        };
        let partitions = parse_entries(&h);
        check_partitions(&partitions, h.first_usable, h.last_usable, h.entry_count)
            .with_context(|| format!("GPT ({sector}-byte sectors)"))?;
        let mut pm = [0u8; 512];
        dev.read_at(&mut pm, 0)
            .context("reading the protective MBR (sector 0)")?;
        let protective_mbr = pm.get(446..510).map(hex::encode);
        let _ = h.my_lba;
        Ok(Some(Gpt {
            disk_guid: h.disk_guid,
            entries_lba: h.entries_lba,
            entry_count: h.entry_count,
            entry_size: h.entry_size,
            first_usable_lba: h.first_usable,
            last_usable_lba: h.last_usable,
            backup_lba,
            partitions,
            revision: h.revision,
            protective_mbr,
            notes,
        }))
    }

    pub fn partitions(&self, sector: u32) -> Vec<Partition> {
        let ss = u64::from(sector);
        self.partitions
            .iter()
            .map(|p| Partition {
                number: p.number,
                offset: p.first_lba.saturating_mul(ss),
                size: p
                    .last_lba
                    .saturating_add(1)
                    .saturating_sub(p.first_lba)
                    .saturating_mul(ss),
                fs: None,
                whole: None,
                excluded: Vec::new(),
                lvm: None,
                md: None,
            })
            .collect()
    }

    fn entry_sectors(&self, sector: u32) -> Result<u64> {
        entry_sectors(self.entry_count, self.entry_size, sector)
    }

    /// This table laid out for a target disk of `target_size` bytes with `target_sector`-byte
    /// logical sectors (the source had `src_sector`). LBAs are converted to target units (an
    /// error names a partition whose start or end is not a whole number of target sectors), the
    /// backup header and entry array move to the end of the target, `last_usable_lba` is
    /// recomputed, and with `grow_last` the partition that ends last grows to the new last usable
    /// LBA (its end aligned down to 1 MiB). A target too small for the partitions is an error
    /// naming the size needed.
    pub fn for_target(
        &self,
        src_sector: u32,
        target_size: u64,
        target_sector: u32,
        grow_last: bool,
    ) -> Result<Gpt> {
        check_sector(src_sector)?;
        check_sector(target_sector)?;
        let src = u64::from(src_sector);
        let ts = u64::from(target_sector);
        let nsec = self.entry_sectors(target_sector)?;
        let convert = |lba: u64, what: &dyn Fn() -> String| -> Result<u64> {
            let bytes = lba
                .checked_mul(src)
                .ok_or_else(|| anyhow!("{}: LBA {lba} overflows", what()))?;
            if !bytes.is_multiple_of(ts) {
                bail!(
                    "{}: byte offset {bytes} is not a multiple of the target's {ts}-byte sectors",
                    what()
                );
            }
            Ok(bytes / ts)
        };
        let (entries_lba, first_usable) = if src_sector == target_sector {
            (self.entries_lba, self.first_usable_lba)
        } else {
            let eb = self
                .entries_lba
                .checked_mul(src)
                .ok_or_else(|| anyhow!("entry array LBA {} overflows", self.entries_lba))?;
            let entries_lba = if eb.is_multiple_of(ts) && eb >= 2 * ts {
                eb / ts
            } else {
                2
            };
            let fu = self
                .first_usable_lba
                .checked_mul(src)
                .ok_or_else(|| anyhow!("first usable LBA overflows"))?
                .div_ceil(ts)
                .max(entries_lba + nsec);
            (entries_lba, fu)
        };
        let mut parts = Vec::with_capacity(self.partitions.len());
        // The partition that grows gets a new end anyway: its old end need not convert exactly.
        let growing = grow_last
            .then(|| {
                self.partitions
                    .iter()
                    .max_by_key(|p| p.last_lba)
                    .map(|p| p.number)
            })
            .flatten();
        for p in &self.partitions {
            let label = || format!("partition {} ({:?})", p.number, p.name);
            let first = convert(p.first_lba, &label)?;
            let end_src = p
                .last_lba
                .checked_add(1)
                .ok_or_else(|| anyhow!("{}: LBA overflows", label()))?;
            let end = if growing == Some(p.number) {
                end_src.saturating_mul(u64::from(src_sector)) / ts
            } else {
                convert(end_src, &|| format!("end of {}", label()))?
            };
            if end <= first {
                bail!("{} is empty", label());
            }
            if first < first_usable {
                bail!(
                    "{} starts at target LBA {first}, before the first usable LBA {first_usable}",
                    label()
                );
            }
            parts.push(GptPartition {
                first_lba: first,
                last_lba: end - 1,
                ..p.clone()
            });
        }
        let disk_lbas = target_size / ts;
        let max_end = parts
            .iter()
            .map(|p| p.last_lba + 1)
            .max()
            .unwrap_or(first_usable);
        // Needed: the partitions, then the backup entry array and the backup header.
        let needed_lbas = max_end.max(first_usable).saturating_add(nsec + 1);
        let table_lbas = entries_lba.saturating_add(2 * nsec + 2);
        if disk_lbas < needed_lbas || disk_lbas < table_lbas {
            let needed = needed_lbas.max(table_lbas).saturating_mul(ts);
            let who = parts
                .iter()
                .max_by_key(|p| p.last_lba)
                .map(|p| {
                    format!(
                        "partition {} ends at byte {}; ",
                        p.number,
                        (p.last_lba + 1).saturating_mul(ts)
                    )
                })
                .unwrap_or_default();
            bail!(
                "the target disk ({target_size} bytes) is too small for this GPT: {who}at least \
                 {needed} bytes are needed"
            );
        }
        let last = disk_lbas - 1;
        let last_usable = last - nsec - 1;
        if grow_last {
            if let Some(p) = parts.iter_mut().max_by_key(|p| p.last_lba) {
                let end_bytes = ((last_usable + 1) * ts) / MIB * MIB;
                let new_end = end_bytes / ts;
                if new_end > p.last_lba + 1 {
                    p.last_lba = new_end - 1;
                }
            }
        }
        let mut gpt = Gpt {
            disk_guid: self.disk_guid,
            entries_lba,
            entry_count: self.entry_count,
            entry_size: self.entry_size,
            first_usable_lba: first_usable,
            last_usable_lba: last_usable,
            backup_lba: last,
            partitions: parts,
            revision: self.revision,
            protective_mbr: if src_sector == target_sector {
                self.protective_mbr.clone()
            } else {
                None
            },
            notes: Vec::new(),
        };
        check_partitions(&gpt.partitions, first_usable, last_usable, gpt.entry_count)
            .context("GPT for the target")?;
        // Record the protective MBR exactly as it will be written.
        gpt.protective_mbr = gpt.protective_entries(last).get(..64).map(hex::encode);
        Ok(gpt)
    }

    /// The entry array bytes (`entry_count` x `entry_size`).
    fn entry_array(&self) -> Result<Vec<u8>> {
        let es = self.entry_size as usize;
        if es < 128 || !self.entry_size.is_power_of_two() {
            bail!(
                "GPT entry size {} is not 128 x a power of two",
                self.entry_size
            );
        }
        let bytes = u64::from(self.entry_count) * u64::from(self.entry_size);
        if bytes > MAX_ENTRY_ARRAY {
            bail!("GPT entry array of {bytes} bytes is too large");
        }
        let mut a = vec![0u8; bytes as usize];
        for p in &self.partitions {
            let i = p
                .number
                .checked_sub(1)
                .filter(|&i| i < self.entry_count)
                .ok_or_else(|| {
                    anyhow!(
                        "GPT partition {} is outside the entry array of {} entries",
                        p.number,
                        self.entry_count
                    )
                })? as usize;
            let e = a
                .get_mut(i * es..i * es + 128)
                .ok_or_else(|| anyhow!("GPT partition {}: entry out of range", p.number))?;
            e[0..16].copy_from_slice(&p.type_guid.0);
            e[16..32].copy_from_slice(&p.unique_guid.0);
            le::put64(e, 32, p.first_lba);
            le::put64(e, 40, p.last_lba);
            le::put64(e, 48, p.attributes);
            let name = match &p.name_raw {
                Some(h) => {
                    let mut n = [0u8; 72];
                    hex::decode_to_slice(h, &mut n).map_err(|_| {
                        anyhow!(
                            "GPT partition {}: name_raw is not 72 bytes of hex",
                            p.number
                        )
                    })?;
                    n
                }
                None => {
                    encode_name(&p.name).with_context(|| format!("GPT partition {}", p.number))?
                }
            };
            e[56..128].copy_from_slice(&name);
        }
        Ok(a)
    }

    fn header(
        &self,
        sector: u32,
        my: u64,
        alt: u64,
        entries_lba: u64,
        entries_crc: u32,
    ) -> Vec<u8> {
        let mut h = vec![0u8; sector as usize];
        h[0..8].copy_from_slice(SIGNATURE);
        le::put32(&mut h, 8, self.revision);
        le::put32(&mut h, 12, HEADER_SIZE);
        le::put64(&mut h, 24, my);
        le::put64(&mut h, 32, alt);
        le::put64(&mut h, 40, self.first_usable_lba);
        le::put64(&mut h, 48, self.last_usable_lba);
        le::put(&mut h, 56, &self.disk_guid.0);
        le::put64(&mut h, 72, entries_lba);
        le::put32(&mut h, 80, self.entry_count);
        le::put32(&mut h, 84, self.entry_size);
        le::put32(&mut h, 88, entries_crc);
        let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
        le::put32(&mut h, 16, crc);
        h
    }

    /// The protective MBR's four entries and 0x55AA (bytes 446..512 of sector 0).
    fn protective_entries(&self, last_lba: u64) -> [u8; 66] {
        let size = last_lba.min(u64::from(u32::MAX)) as u32;
        let mut out = [0u8; 66];
        if let Some(src) = &self.protective_mbr {
            let mut e = [0u8; 64];
            if hex::decode_to_slice(src, &mut e).is_ok() {
                let fits = e.chunks_exact(16).any(|x| {
                    x.get(4) == Some(&0xEE) && le::u32(x, 8) == 1 && le::u32(x, 12) == size
                });
                if fits {
                    out[..64].copy_from_slice(&e);
                    out[64] = 0x55;
                    out[65] = 0xAA;
                    return out;
                }
            }
        }
        out[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
        out[4] = 0xEE;
        out[5..8].copy_from_slice(&chs(u64::from(size)));
        le::put32(&mut out, 8, 1);
        le::put32(&mut out, 12, size);
        out[64] = 0x55;
        out[65] = 0xAA;
        out
    }

    /// Byte patches `(offset, bytes)` that write this table on a disk of `disk_size` bytes with
    /// `sector`-byte sectors: the protective MBR's entries and 0x55AA (bytes 446..512; the boot
    /// code and disk signature before them are left alone), the primary header and entry array,
    /// the backup entry array and the backup header at the last LBA. The table must have been laid
    /// out for this disk ([`Gpt::for_target`]).
    pub fn to_disk(&self, disk_size: u64, sector: u32) -> Result<Vec<(u64, Vec<u8>)>> {
        check_sector(sector)?;
        let ss = u64::from(sector);
        let disk_lbas = disk_size / ss;
        let nsec = self.entry_sectors(sector)?;
        if disk_lbas < 2 * nsec + 4 {
            bail!("disk of {disk_size} bytes is too small for a GPT");
        }
        let last = disk_lbas - 1;
        if self.backup_lba != last {
            bail!(
                "this GPT was laid out for a disk whose last LBA is {}, not {last} ({disk_size} bytes, \
                 {sector}-byte sectors): lay it out for the target first",
                self.backup_lba
            );
        }
        let backup_entries = last - nsec;
        if self.entries_lba < 2 || self.entries_lba.saturating_add(nsec) > self.first_usable_lba {
            bail!(
                "GPT entry array at LBA {} ({nsec} sectors) collides with the header or the first \
                 usable LBA {}",
                self.entries_lba,
                self.first_usable_lba
            );
        }
        if self.last_usable_lba >= backup_entries
            || self.first_usable_lba > self.last_usable_lba.saturating_add(1)
        {
            bail!(
                "GPT usable range {}..={} collides with the backup entry array at LBA {backup_entries}",
                self.first_usable_lba,
                self.last_usable_lba
            );
        }
        check_partitions(
            &self.partitions,
            self.first_usable_lba,
            self.last_usable_lba,
            self.entry_count,
        )?;
        let mut entries = self.entry_array()?;
        let crc = crc32fast::hash(&entries);
        entries.resize((nsec * ss) as usize, 0);
        let primary = self.header(sector, 1, last, self.entries_lba, crc);
        let backup = self.header(sector, last, 1, backup_entries, crc);
        Ok(vec![
            (446, self.protective_entries(last).to_vec()),
            (ss, primary),
            (self.entries_lba.saturating_mul(ss), entries.clone()),
            (backup_entries * ss, entries),
            (last * ss, backup),
        ])
    }

    /// Byte ranges holding this table on a disk of `disk_size` bytes: sector 0, the primary
    /// header and entry array, the backup entry array and header.
    pub fn table_regions(&self, disk_size: u64, sector: u32) -> Vec<(u64, u64)> {
        let ss = u64::from(sector.max(1));
        let nsec = self.entry_sectors(sector).unwrap_or(1);
        let disk_lbas = disk_size / ss;
        // Sector 0: only the protective MBR's entries and signature; the boot code before them
        // (a BIOS boot loader on hybrid-boot disks) and the disk signature are data.
        let mut v = vec![(446, 512), (ss, 2 * ss)];
        let e = self.entries_lba.saturating_mul(ss);
        v.push((e, e.saturating_add(nsec.saturating_mul(ss))));
        if disk_lbas > nsec {
            v.push(((disk_lbas - 1 - nsec) * ss, disk_lbas * ss));
        }
        super::merge_ranges(v)
    }
}
