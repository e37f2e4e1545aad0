//! LVM2 physical volumes: the label (`LABELONE`, one of sectors 0-3), the PV header (UUID, data
//! and metadata areas), the metadata area header (checksum, the raw location of the current
//! metadata in its ring buffer) and the VG metadata text; then each linear or striped LV seen as
//! a block device through its segments ([`LvView`]), probed like a partition, and its used-block
//! map mapped back to the partition.
//!
//! What is kept of a PV partition: everything before the first extent (label, metadata area),
//! everything past the last extent (a second metadata area, slack), the metadata areas, and of
//! each LV either its filesystem's used blocks (linear/striped LV, filesystem understood) or all
//! its extents. Unallocated extents are not stored. A VG spanning several PVs, or any segment
//! that names this PV in a way we do not map, keeps the whole partition: a guessed map would lose
//! data silently.

use super::lvmtext::{self, Section, Value};
use crate::extents::Extents;
use crate::fs::exclude::Exclusions;
use crate::fs::{self, le, Found, Part};
use crate::manifest::{LvmLv, LvmPv, LvmSegment, LvmVg};
use crate::source::ReadAt;
use anyhow::{bail, Context, Result};

const SECTOR: u64 = 512;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const INITIAL_CRC: u32 = 0xf597_a6cf;
/// Metadata text larger than this is refused (lvm2's default area is 1 MiB).
const MAX_TEXT: u64 = 64 << 20;
/// Disk areas listed in a PV header (lvm2 writes one data area and one or two metadata areas).
const MAX_AREAS: usize = 8;

/// lvm2's `calc_crc`: CRC-32 (reflected, polynomial 0xedb88320) without the final inversion.
pub fn crc(initial: u32, data: &[u8]) -> u32 {
    let mut c = initial;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = (c >> 1) ^ (0xedb8_8320 & (c & 1).wrapping_neg());
        }
    }
    c
}

/// What the analysis of a PV partition found.
#[derive(Debug)]
pub struct Analysis {
    pub pv: LvmPv,
    /// Bytes of the partition to keep, relative to its start.
    pub used: Extents,
    /// Things the operator should hear about, one line each.
    pub notes: Vec<String>,
}

/// `None` when the partition carries no LVM2 label; an error when it does but the PV header or
/// every metadata copy is unreadable (the caller copies the partition whole with the reason).
/// The files `ex` names are left out of the LVs' filesystems as of any partition's.
pub fn analyze(
    dev: &dyn ReadAt,
    offset: u64,
    len: u64,
    ex: &Exclusions,
) -> Option<Result<Analysis>> {
    let part = Part { dev, offset, len };
    let (sector, label) = find_label(&part)?;
    Some(analyze_pv(&part, sector, &label, ex))
}

fn find_label(part: &Part) -> Option<(u64, [u8; 512])> {
    for s in 0..4u64 {
        let mut b = [0u8; 512];
        if part.read(s * SECTOR, &mut b, "LVM label").is_err() {
            return None;
        }
        if &b[0..8] == b"LABELONE" && &b[24..32] == b"LVM2 001" {
            return Some((s, b));
        }
    }
    None
}

/// `xxxxxx-xxxx-xxxx-xxxx-xxxx-xxxx-xxxxxx`, as lvm2 prints and its metadata writes UUIDs.
fn format_uuid(raw: &[u8]) -> String {
    let s: String = raw.iter().map(|&c| char::from(c)).collect();
    let mut out = String::new();
    let mut at = 0;
    for (i, n) in [6, 4, 4, 4, 4, 4, 6].iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.push_str(s.get(at..at + n).unwrap_or(""));
        at += n;
    }
    out
}

struct Area {
    offset: u64,
    size: u64,
}

fn analyze_pv(part: &Part, sector: u64, label: &[u8; 512], ex: &Exclusions) -> Result<Analysis> {
    let where_ = format!("LVM2 label in sector {sector}");
    if le::u64(label, 8) != sector {
        bail!("{where_}: it says it lies in sector {}", le::u64(label, 8));
    }
    let want = le::u32(label, 16);
    let got = crc(INITIAL_CRC, &label[20..]);
    if want != got {
        bail!("{where_}: checksum {got:#010x} does not match the recorded {want:#010x}");
    }
    let hdr = le::u32(label, 20) as usize;
    if !(32..=512 - 40 - 32).contains(&hdr) {
        bail!("{where_}: PV header offset {hdr} is out of the sector");
    }
    let uuid_raw = &label[hdr..hdr + 32];
    if !uuid_raw.iter().all(|c| c.is_ascii_alphanumeric()) {
        bail!("{where_}: the PV UUID is not printable");
    }
    let uuid = format_uuid(uuid_raw);
    // Disk areas: data areas up to a zero entry, then metadata areas up to a zero entry.
    let mut lists: [Vec<Area>; 2] = [Vec::new(), Vec::new()];
    let mut at = hdr + 40;
    for list in &mut lists {
        loop {
            if at + 16 > 512 || list.len() >= MAX_AREAS {
                bail!("{where_}: the PV header's area list is not terminated");
            }
            let (o, s) = (le::u64(label, at), le::u64(label, at + 8));
            at += 16;
            if o == 0 && s == 0 {
                break;
            }
            list.push(Area { offset: o, size: s });
        }
    }
    let [data, mdas] = lists;
    let Some(da) = data.first() else {
        bail!("PV {uuid}: the PV header lists no data area");
    };
    let pe_start = da.offset;
    if pe_start >= part.len {
        bail!(
            "PV {uuid}: the first extent (byte {pe_start}) lies past the partition ({} bytes)",
            part.len
        );
    }
    let mut best: Option<(u64, Section, Vec<u8>)> = None;
    let mut errors = Vec::new();
    for (i, m) in mdas.iter().enumerate() {
        match read_mda(part, m) {
            Ok(Some(text)) => match parse_vg(&text) {
                Ok((seqno, s)) => {
                    if best.as_ref().is_none_or(|b| seqno > b.0) {
                        best = Some((seqno, s, text));
                    }
                }
                Err(e) => errors.push(format!("metadata area {} : {e:#}", i + 1)),
            },
            Ok(None) => {}
            Err(e) => errors.push(format!("metadata area {}: {e:#}", i + 1)),
        }
    }
    let Some((_, top, _)) = best else {
        if errors.is_empty() {
            bail!("PV {uuid}: no metadata area holds VG metadata (an orphan PV or one whose metadata areas are ignored)");
        }
        bail!(
            "PV {uuid}: no valid VG metadata copy: {}",
            errors.join("; ")
        );
    };
    let mut notes: Vec<String> = errors
        .iter()
        .map(|e| format!("PV {uuid}: {e}: an older or other copy was used"))
        .collect();
    let vg = build_vg(&top, &uuid, pe_start, part.len)?;
    let mut used = Extents::new();
    used.add(0, vg.pe_start);
    for m in &mdas {
        let end = m.offset.saturating_add(m.size).min(part.len);
        if m.offset < end {
            used.add(m.offset, end);
        }
    }
    let data_end = vg.data_end;
    if data_end < part.len {
        used.add(data_end, part.len);
    }
    let mut pv = LvmPv {
        uuid: uuid.clone(),
        pe_start: vg.pe_start,
        extent_size: vg.extent_size,
        pe_count: vg.pe_count,
        vg: LvmVg {
            name: vg.name.clone(),
            uuid: vg.uuid.clone(),
            seqno: vg.seqno,
            pv_count: vg.pv_count,
            lvs: Vec::new(),
        },
    };
    let whole_data = if vg.pv_count != 1 {
        Some(format!(
            "VG {} spans {} PVs: its PV copied whole (only single-PV VGs are mapped)",
            vg.name, vg.pv_count
        ))
    } else {
        vg.unmapped_pv_use.clone()
    };
    for lv in &vg.lvs {
        let mut rec = LvmLv {
            name: lv.name.clone(),
            uuid: lv.uuid.clone(),
            size: lv.extents.saturating_mul(vg.extent_size),
            segments: lv.segments.iter().map(|s| s.record.clone()).collect(),
            fs: None,
            whole: lv.whole.clone(),
            excluded: Vec::new(),
        };
        if whole_data.is_none() {
            let view = LvView {
                dev: part.dev,
                base: part.offset,
                segs: &lv.map,
                size: rec.size,
            };
            let mut keep_all = true;
            if rec.whole.is_none() && !lv.map.is_empty() {
                let (found, excluded, ex_notes) = fs::probe_excluding(&view, 0, rec.size, ex);
                let lv_name = format!("LV {}/{}", vg.name, lv.name);
                notes.extend(ex_notes.iter().map(|n| format!("{lv_name}: {n}")));
                for e in &excluded {
                    notes.push(format!(
                        "{lv_name}: {} excluded: {:.1} MiB of its contents not stored",
                        e.path,
                        e.bytes as f64 / (1u64 << 20) as f64
                    ));
                }
                rec.excluded = excluded;
                match found {
                    Found::Known(p) => {
                        for &(s, e) in p.used.ranges() {
                            view.map(s, e.min(rec.size).saturating_sub(s), |o, n| {
                                used.add(o, o + n)
                            });
                        }
                        rec.fs = Some(p.fs);
                        keep_all = false;
                    }
                    Found::Unknown => {}
                    Found::Damaged { kind, reason } => {
                        let w = format!("{}: {reason}", format!("{kind:?}").to_lowercase());
                        notes.push(format!(
                            "LV {}/{}: copied whole, its used-block map cannot be trusted: {w}",
                            vg.name, lv.name
                        ));
                        rec.whole = Some(w);
                    }
                }
            }
            if keep_all {
                for a in &lv.pv_areas {
                    used.add(a.0, a.1);
                }
            }
        }
        if let Some(w) = &lv.whole {
            notes.push(format!("LV {}/{}: copied whole: {w}", vg.name, lv.name));
        }
        pv.vg.lvs.push(rec);
    }
    if let Some(w) = whole_data {
        notes.push(format!("PV {uuid}: {w}"));
        used = Extents::whole(0, part.len);
    }
    Ok(Analysis { pv, used, notes })
}

/// The current metadata text of one metadata area; `None` when the area is marked ignored or
/// holds no metadata.
fn read_mda(part: &Part, m: &Area) -> Result<Option<Vec<u8>>> {
    let mut h = [0u8; 512];
    part.read(m.offset, &mut h, "LVM metadata area header")?;
    let what = format!("header at byte {}", m.offset);
    if &h[4..20] != MDA_MAGIC {
        bail!("{what}: no metadata area magic");
    }
    let (want, got) = (le::u32(&h, 0), crc(INITIAL_CRC, &h[4..]));
    if want != got {
        bail!("{what}: checksum {got:#010x} does not match the recorded {want:#010x}");
    }
    if le::u32(&h, 20) != 1 {
        bail!("{what}: version {} is not 1", le::u32(&h, 20));
    }
    let (start, size) = (le::u64(&h, 24), le::u64(&h, 32));
    if start != m.offset
        || size < 1024
        || size > m.size.max(size)
        || start.saturating_add(size) > part.len
    {
        bail!("{what}: it says it spans bytes {start}+{size}, not the area the PV header lists");
    }
    // raw_locn[0]: the current copy. offset is from the area start; the text wraps around to
    // the byte after the header.
    let (off, len, sum, flags) = (
        le::u64(&h, 40),
        le::u64(&h, 48),
        le::u32(&h, 56),
        le::u32(&h, 60),
    );
    if flags & 1 != 0 || (off == 0 && len == 0) {
        return Ok(None);
    }
    let ring = size - 512;
    if off < 512 || off >= size || len == 0 || len > ring || len > MAX_TEXT {
        bail!("{what}: the metadata location (offset {off}, {len} bytes) lies outside the area");
    }
    let first = len.min(size - off);
    let mut text = part.read_vec(start + off, first, "LVM metadata text")?;
    if first < len {
        text.extend(part.read_vec(start + 512, len - first, "LVM metadata text (wrapped)")?);
    }
    let got = crc(INITIAL_CRC, &text);
    if got != sum {
        bail!(
            "the metadata text at area byte {off} ({len} bytes) has checksum {got:#010x}, not the recorded {sum:#010x}"
        );
    }
    Ok(Some(text))
}

/// The VG section of a metadata text and its sequence number.
fn parse_vg(text: &[u8]) -> Result<(u64, Section)> {
    let top = lvmtext::parse(text)?;
    let (seqno, _) = vg_section(&top)?;
    Ok((seqno, top))
}

fn vg_section(top: &Section) -> Result<(u64, (&str, &Section))> {
    let (name, vg) = top
        .sections()
        .find(|(_, s)| s.get("seqno").is_some() && s.get("id").is_some())
        .context("the metadata text holds no VG section (with id and seqno)")?;
    let seqno = vg
        .int("seqno")
        .and_then(|v| u64::try_from(v).ok())
        .context("the VG's seqno is not a number")?;
    Ok((seqno, (name, vg)))
}

/// A segment's place in the LV and on the PV, in bytes from the partition start.
#[derive(Debug, Clone)]
pub struct Seg {
    /// First LV byte of the segment.
    pub lv_start: u64,
    pub len: u64,
    /// Bytes of one stripe chunk (the segment length for one stripe).
    pub stripe_size: u64,
    /// Partition byte where each stripe starts.
    pub stripes: Vec<u64>,
}

struct Lv {
    name: String,
    uuid: String,
    extents: u64,
    segments: Vec<SegInfo>,
    /// Empty when the LV is not mapped.
    map: Vec<Seg>,
    /// Partition byte ranges the LV occupies on this PV (kept whole when it is not mapped).
    pv_areas: Vec<(u64, u64)>,
    whole: Option<String>,
}

struct SegInfo {
    record: LvmSegment,
}

struct Vg {
    name: String,
    uuid: String,
    seqno: u64,
    pv_count: u32,
    extent_size: u64,
    pe_start: u64,
    pe_count: u64,
    data_end: u64,
    lvs: Vec<Lv>,
    /// Set when a segment uses this PV in a way that is not mapped (the data area is kept whole).
    unmapped_pv_use: Option<String>,
}

fn num(s: &Section, key: &str, what: &str) -> Result<u64> {
    s.int(key)
        .and_then(|v| u64::try_from(v).ok())
        .with_context(|| format!("{what}: {key} is missing or not a non-negative number"))
}

fn build_vg(top: &Section, pv_uuid: &str, label_pe_start: u64, part_len: u64) -> Result<Vg> {
    let (seqno, (name, vg)) = vg_section(top)?;
    let what = format!("VG {name}");
    let uuid = vg.str("id").unwrap_or("").to_string();
    let es_sectors = num(vg, "extent_size", &what)?;
    if es_sectors == 0 || es_sectors > (1 << 32) {
        bail!("{what}: extent size of {es_sectors} sectors is not possible");
    }
    let extent_size = es_sectors * SECTOR;
    let pvs = vg
        .section("physical_volumes")
        .with_context(|| format!("{what}: no physical_volumes section"))?;
    let pv_count = u32::try_from(pvs.sections().count()).unwrap_or(u32::MAX);
    let plain = |u: &str| u.chars().filter(|c| *c != '-').collect::<String>();
    let (pv_name, pv) = pvs
        .sections()
        .find(|(_, s)| s.str("id").map(plain) == Some(plain(pv_uuid)))
        .with_context(|| {
            format!("{what}: this PV ({pv_uuid}) is not among its physical volumes")
        })?;
    let pwhat = format!("{what}: PV {pv_name}");
    let pe_start = num(pv, "pe_start", &pwhat)?.saturating_mul(SECTOR);
    let pe_count = num(pv, "pe_count", &pwhat)?;
    if pe_start != label_pe_start {
        bail!("{pwhat}: pe_start {pe_start} disagrees with the PV header's data area at byte {label_pe_start}");
    }
    let data_end = pe_count
        .checked_mul(extent_size)
        .and_then(|n| n.checked_add(pe_start))
        .filter(|&e| e <= part_len)
        .with_context(|| {
            format!("{pwhat}: {pe_count} extents of {extent_size} bytes from byte {pe_start} do not fit the partition ({part_len} bytes)")
        })?;
    let lv_sec = vg.section("logical_volumes");
    let lv_names: Vec<&str> = lv_sec
        .map(|l| l.sections().map(|(n, _)| n).collect())
        .unwrap_or_default();
    // LVs that another LV's segment names (sub-LVs of pools, RAID, mirrors, caches; snapshot
    // origins and their copy-on-write stores) are kept whole.
    let mut used_by: Vec<(String, String)> = Vec::new();
    if let Some(l) = lv_sec {
        for (lname, lv) in l.sections() {
            for (_, seg) in lv.sections() {
                for (k, v) in &seg.0 {
                    if k == "stripes" {
                        continue;
                    }
                    let mut names = Vec::new();
                    match v {
                        Value::Str(s) => names.push(s.as_str()),
                        Value::Array(a) => names.extend(a.iter().filter_map(|x| match x {
                            Value::Str(s) => Some(s.as_str()),
                            _ => None,
                        })),
                        _ => {}
                    }
                    for n in names {
                        if lv_names.contains(&n) && n != lname {
                            used_by.push((n.to_string(), lname.to_string()));
                        }
                    }
                }
            }
        }
    }
    let mut lvs = Vec::new();
    let mut unmapped_pv_use = None;
    let in_pv = |pe: u64, n: u64| pe.checked_add(n).is_some_and(|e| e <= pe_count);
    if let Some(l) = lv_sec {
        for (lname, lv) in l.sections() {
            let lwhat = format!("{what}: LV {lname}");
            let mut lvrec = Lv {
                name: lname.to_string(),
                uuid: lv.str("id").unwrap_or("").to_string(),
                extents: 0,
                segments: Vec::new(),
                map: Vec::new(),
                pv_areas: Vec::new(),
                whole: None,
            };
            let mut mappable = true;
            let mut why = None;
            let mut segs: Vec<(&str, &Section)> = lv
                .sections()
                .filter(|(n, _)| n.starts_with("segment"))
                .collect();
            segs.sort_by_key(|(_, s)| s.int("start_extent").unwrap_or(0));
            for (sname, seg) in segs {
                let swhat = format!("{lwhat} {sname}");
                let start = num(seg, "start_extent", &swhat)?;
                let count = num(seg, "extent_count", &swhat)?;
                let kind = seg.str("type").unwrap_or("").to_string();
                let mut rec = LvmSegment {
                    start_extent: start,
                    extent_count: count,
                    kind: kind.clone(),
                    stripe_size: None,
                    stripes: Vec::new(),
                };
                if start != lvrec.extents {
                    bail!(
                        "{swhat}: starts at extent {start}, not where the one before ends ({})",
                        lvrec.extents
                    );
                }
                lvrec.extents = start
                    .checked_add(count)
                    .with_context(|| format!("{swhat}: extent count overflows"))?;
                // Any (PV name, extent) pair naming this PV, whatever the segment type.
                let mut pairs = Vec::new();
                for (k, v) in &seg.0 {
                    if let Value::Array(a) = v {
                        for w in a.windows(2) {
                            if let [Value::Str(n), Value::Int(pe)] = w {
                                if n == pv_name {
                                    pairs
                                        .push((k.as_str(), u64::try_from(*pe).unwrap_or(u64::MAX)));
                                }
                            }
                        }
                    }
                }
                if kind == "striped" {
                    let n = num(seg, "stripe_count", &swhat)?;
                    let stripe_pairs: Vec<u64> = pairs
                        .iter()
                        .filter(|(k, _)| *k == "stripes")
                        .map(|p| p.1)
                        .collect();
                    let all_stripes = match seg.get("stripes") {
                        Some(Value::Array(a)) => a.len() as u64 / 2,
                        _ => 0,
                    };
                    if n == 0 || all_stripes != n || count % n != 0 {
                        bail!("{swhat}: {n} stripes declared, {all_stripes} listed, over {count} extents");
                    }
                    let per = count / n;
                    if stripe_pairs.len() as u64 != n {
                        mappable = false;
                        why.get_or_insert_with(|| "a stripe lies on another PV".to_string());
                    }
                    for &pe in &stripe_pairs {
                        if !in_pv(pe, per) {
                            bail!("{swhat}: a stripe at extent {pe} ({per} extents) lies past the PV's {pe_count} extents");
                        }
                        let s = pe_start + pe * extent_size;
                        lvrec.pv_areas.push((s, s + per * extent_size));
                    }
                    let ss = if n == 1 {
                        per * extent_size
                    } else {
                        let ss = num(seg, "stripe_size", &swhat)?.saturating_mul(SECTOR);
                        rec.stripe_size = Some(ss);
                        ss
                    };
                    if ss == 0 || (n > 1 && !extent_size.is_multiple_of(ss)) {
                        mappable = false;
                        why.get_or_insert_with(|| {
                            format!("stripe size {ss} does not divide the extent size")
                        });
                    }
                    rec.stripes = stripe_pairs.clone();
                    if mappable {
                        lvrec.map.push(Seg {
                            lv_start: start * extent_size,
                            len: count * extent_size,
                            stripe_size: ss,
                            stripes: stripe_pairs
                                .iter()
                                .map(|pe| pe_start + pe * extent_size)
                                .collect(),
                        });
                    }
                } else {
                    mappable = false;
                    why.get_or_insert_with(|| format!("segment type {kind:?} is not mapped"));
                    if !pairs.is_empty() && unmapped_pv_use.is_none() {
                        unmapped_pv_use = Some(format!(
                            "LV {lname} has a {kind:?} segment on this PV: its extents are copied whole"
                        ));
                    }
                }
                lvrec.segments.push(SegInfo { record: rec });
            }
            if let Some((_, by)) = used_by.iter().find(|(n, _)| n == lname) {
                mappable = false;
                why = Some(format!("used by LV {by}"));
            }
            if !mappable {
                lvrec.map.clear();
                lvrec.whole = why;
            }
            lvs.push(lvrec);
        }
    }
    Ok(Vg {
        name: name.to_string(),
        uuid,
        seqno,
        pv_count,
        extent_size,
        pe_start,
        pe_count,
        data_end,
        lvs,
        unmapped_pv_use,
    })
}

/// A logical volume read through its segments: LV byte `o` is found on the PV partition.
pub struct LvView<'a> {
    pub dev: &'a dyn ReadAt,
    /// Disk byte of the partition start.
    pub base: u64,
    pub segs: &'a [Seg],
    pub size: u64,
}

impl LvView<'_> {
    /// Call `f(partition byte, len)` for each piece of LV bytes `[o, o + n)`, in order.
    pub fn map(&self, mut o: u64, mut n: u64, mut f: impl FnMut(u64, u64)) {
        while n > 0 {
            let i = self.segs.partition_point(|s| s.lv_start + s.len <= o);
            let Some(s) = self.segs.get(i) else { return };
            if o < s.lv_start {
                return;
            }
            let rel = o - s.lv_start;
            let k = s.stripes.len() as u64;
            let (pos, take) = if k <= 1 {
                (s.stripes.first().copied().unwrap_or(0) + rel, s.len - rel)
            } else {
                let chunk = rel / s.stripe_size;
                let within = rel % s.stripe_size;
                let stripe = s.stripes[(chunk % k) as usize];
                (
                    stripe + (chunk / k) * s.stripe_size + within,
                    s.stripe_size - within,
                )
            };
            let take = take.min(n);
            f(pos, take);
            o += take;
            n -= take;
        }
    }
}

impl ReadAt for LvView<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let n = buf.len() as u64;
        if offset.checked_add(n).is_none_or(|e| e > self.size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the logical volume",
            ));
        }
        let mut at = 0usize;
        let mut err = None;
        self.map(offset, n, |pos, len| {
            if err.is_some() {
                return;
            }
            let len = len as usize;
            if let Err(e) = self.dev.read_at(&mut buf[at..at + len], self.base + pos) {
                err = Some(e);
            }
            at += len;
        });
        if let Some(e) = err {
            return Err(e);
        }
        if at as u64 != n {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the logical volume's segments do not cover the read",
            ));
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_lvm2() {
        // lvm2's calc_crc over an empty buffer is its initial value.
        assert_eq!(crc(INITIAL_CRC, b""), INITIAL_CRC);
        // Standard CRC-32 of "123456789" is 0xcbf43926 with init and final inversion.
        assert_eq!(!crc(0xffff_ffff, b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn striped_view_maps_chunks_round_robin() {
        let segs = [Seg {
            lv_start: 0,
            len: 8,
            stripe_size: 2,
            stripes: vec![100, 200],
        }];
        let dev = vec![0u8; 1];
        let v = LvView {
            dev: &dev,
            base: 0,
            segs: &segs,
            size: 8,
        };
        let mut got = Vec::new();
        v.map(1, 6, |o, n| got.push((o, n)));
        assert_eq!(got, [(101, 1), (200, 2), (102, 2), (202, 1)]);
    }

    #[test]
    fn no_label_is_none_and_garbage_label_is_an_error() {
        let mut d = vec![0u8; 1 << 20];
        assert!(analyze(&d, 0, d.len() as u64, &Exclusions::none()).is_none());
        d[512..520].copy_from_slice(b"LABELONE");
        d[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        d[512 + 8] = 1;
        assert!(analyze(&d, 0, d.len() as u64, &Exclusions::none())
            .unwrap()
            .is_err());
    }
}
