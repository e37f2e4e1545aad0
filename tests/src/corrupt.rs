//! Damage disk images in controlled ways for bad-input tests: GPT entries rewritten with valid
//! CRCs (so only the layout is wrong), MBR entries, bytes at an offset.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Overwrite bytes at `offset`.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    let f = open_rw(path)?;
    f.write_all_at(bytes, offset)?;
    f.sync_all()?;
    Ok(())
}

/// Read `len` bytes at `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset)?;
    Ok(b)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

/// One GPT partition entry's place: (first LBA, last LBA inclusive).
pub fn gpt_entry_lbas(entries: &[u8], entry_size: usize, index: usize) -> (u64, u64) {
    let e = &entries[index * entry_size..];
    (u64_at(e, 32), u64_at(e, 40))
}

/// Set entry `index` (0-based) to `first..=last` LBAs.
pub fn gpt_set_entry_lbas(
    entries: &mut [u8],
    entry_size: usize,
    index: usize,
    first: u64,
    last: u64,
) {
    let e = &mut entries[index * entry_size..];
    e[32..40].copy_from_slice(&first.to_le_bytes());
    e[40..48].copy_from_slice(&last.to_le_bytes());
}

/// Edit the GPT partition entry array of the image with `edit(entries, entry_size)`, then write it
/// to both the primary and the backup array and fix every CRC, so the table is well-formed and
/// only its content is what the test wants.
pub fn gpt_edit_entries(
    path: &Path,
    sector: u64,
    edit: impl FnOnce(&mut [u8], usize),
) -> Result<()> {
    let f = open_rw(path)?;
    let mut hdr = vec![0u8; sector as usize];
    f.read_exact_at(&mut hdr, sector)?;
    if &hdr[..8] != b"EFI PART" {
        bail!(
            "{}: no GPT header at LBA 1 ({sector}-byte sectors)",
            path.display()
        );
    }
    let entries_lba = u64_at(&hdr, 72);
    let count = u32_at(&hdr, 80) as usize;
    let size = u32_at(&hdr, 84) as usize;
    let backup_lba = u64_at(&hdr, 32);
    let mut entries = vec![0u8; count * size];
    f.read_exact_at(&mut entries, entries_lba * sector)?;
    edit(&mut entries, size);
    let crc = crc32fast::hash(&entries);
    for lba in [1, backup_lba] {
        let mut h = vec![0u8; sector as usize];
        f.read_exact_at(&mut h, lba * sector)?;
        if &h[..8] != b"EFI PART" {
            continue;
        }
        let elba = u64_at(&h, 72);
        f.write_all_at(&entries, elba * sector)?;
        h[88..92].copy_from_slice(&crc.to_le_bytes());
        let hsize = u32_at(&h, 12) as usize;
        h[16..20].fill(0);
        let hcrc = crc32fast::hash(&h[..hsize]);
        h[16..20].copy_from_slice(&hcrc.to_le_bytes());
        f.write_all_at(&h, lba * sector)?;
    }
    f.sync_all()?;
    Ok(())
}

/// MBR primary entry `slot` (0-3): (type, first LBA, sectors).
pub fn mbr_entry(path: &Path, slot: usize) -> Result<(u8, u32, u32)> {
    let b = read_at(path, 446 + 16 * slot as u64, 16)?;
    Ok((b[4], u32_at(&b, 8), u32_at(&b, 12)))
}

/// Rewrite MBR primary entry `slot` (0-3).
pub fn mbr_set_entry(path: &Path, slot: usize, kind: u8, first: u32, sectors: u32) -> Result<()> {
    let mut b = read_at(path, 446 + 16 * slot as u64, 16)?;
    b[4] = kind;
    b[8..12].copy_from_slice(&first.to_le_bytes());
    b[12..16].copy_from_slice(&sectors.to_le_bytes());
    write_at(path, 446 + 16 * slot as u64, &b)
}
