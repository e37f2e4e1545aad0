//! A UEFI boot entry for the restored system (`restore --efi-boot-entry`, on by default in the
//! boot image when it was booted by UEFI). A replacement server's NVRAM knows nothing of the
//! restored disk, and an OS whose loader lives only in its own directory of the ESP (Debian's
//! `\EFI\debian\shimx64.efi`, Windows' `\EFI\Microsoft\Boot\bootmgfw.efi`) does not boot without
//! an entry; the removable-media fallback `\EFI\BOOT\BOOTX64.EFI` is often absent.
//!
//! The ESP is mounted read-only through a loop device over its byte range, the loader found, and
//! `efibootmgr` (the standard tool) writes the entry, first in `BootOrder`. Entries left by an
//! earlier restore with the same label are replaced, not piled up.

use crate::resize::Loop;
use anyhow::{bail, Context, Result};
use snapshot::ptable::{Guid, PartitionTable};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Loaders by preference: the OS's own shim (Secure Boot), Windows' boot manager, the OS's own
/// GRUB, then the removable-media fallback. `*` is any directory under `EFI/` but `BOOT`.
const LOADERS: &[&str] = &[
    "*/shimx64.efi",
    "Microsoft/Boot/bootmgfw.efi",
    "*/grubx64.efi",
    "BOOT/BOOTX64.EFI",
];

/// Whether this machine was booted by UEFI (so that it has boot entries to write).
pub fn uefi_booted() -> bool {
    Path::new("/sys/firmware/efi/efivars").is_dir()
}

/// The EFI system partition of a table: (number, byte offset, byte size).
pub fn esp_of(table: &PartitionTable, sector: u32) -> Option<(u32, u64, u64)> {
    let PartitionTable::Gpt(g) = table else {
        return None;
    };
    let esp_type = Guid::parse(snapshot::layout::ESP_TYPE)?;
    let esp = g.partitions.iter().find(|p| p.type_guid == esp_type)?;
    g.partitions(sector)
        .into_iter()
        .find(|p| p.number == esp.number)
        .map(|p| (p.number, p.offset, p.size))
}

/// Adds the entry for the ESP `esp` (from [`esp_of`]) of `disk`, a block device whose table was
/// just written. Returns the line to report.
pub fn add(disk: &Path, esp: (u32, u64, u64), sector: u32, label: &str) -> Result<String> {
    let (number, offset, size) = esp;
    let loader = find_loader(disk, offset, size, sector)?;
    for n in entries_labelled(label)? {
        efibootmgr(&["-q", "-b", &n, "-B"])?;
    }
    let part = number.to_string();
    let disk_s = disk.to_string_lossy();
    let out = efibootmgr(&["-c", "-d", &disk_s, "-p", &part, "-L", label, "-l", &loader])?;
    let num = entries_in(&out, label)
        .into_iter()
        .next()
        .unwrap_or_else(|| "?".into());
    Ok(format!(
        "UEFI boot entry Boot{num} \"{label}\": {loader} on partition {part}, first in BootOrder"
    ))
}

/// The loader path (`\EFI\...`) on the ESP at `offset`, mounted read-only for the look.
fn find_loader(disk: &Path, offset: u64, size: u64, sector: u32) -> Result<String> {
    let lo = Loop::attach(disk, offset, size, sector)?;
    let dir = std::env::temp_dir().join(format!("bmr-esp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("a mount point for the ESP")?;
    let mounted = Command::new("mount")
        .args(["-t", "vfat", "-o", "ro,iocharset=utf8"])
        .arg(lo.path())
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .context("running mount")?;
    if !mounted.status.success() {
        let _ = std::fs::remove_dir(&dir);
        bail!(
            "mounting the ESP: {}",
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
    }
    let found = LOADERS.iter().find_map(|l| lookup(&dir.join("EFI"), l));
    let _ = Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    let rel = found.context("no EFI loader on the ESP (looked for EFI/*/shimx64.efi, EFI/Microsoft/Boot/bootmgfw.efi, EFI/*/grubx64.efi, EFI/BOOT/BOOTX64.EFI)")?;
    Ok(format!(
        "\\EFI\\{}",
        rel.to_string_lossy().replace('/', "\\")
    ))
}

/// `pattern` under `efi` (FAT: case-insensitive), as the path relative to `efi` in the case the
/// directory stores it.
fn lookup(efi: &Path, pattern: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![PathBuf::new()];
    for (i, part) in pattern.split('/').enumerate() {
        let mut next = Vec::new();
        for d in &dirs {
            let Ok(rd) = std::fs::read_dir(efi.join(d)) else {
                continue;
            };
            let mut names: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                let any_vendor = part == "*" && i == 0 && !n.eq_ignore_ascii_case("BOOT");
                if any_vendor || n.eq_ignore_ascii_case(part) {
                    next.push(d.join(n));
                }
            }
        }
        dirs = next;
    }
    dirs.into_iter().find(|p| efi.join(p).is_file())
}

/// Boot entry numbers (`0003`) whose label is `label`.
fn entries_labelled(label: &str) -> Result<Vec<String>> {
    Ok(entries_in(&efibootmgr(&[])?, label))
}

fn entries_in(listing: &str, label: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Boot")?;
            let (num, text) = rest.split_at_checked(4)?;
            let text = text.trim_start_matches('*').trim_start();
            (num.chars().all(|c| c.is_ascii_hexdigit())
                && (text == label || text.starts_with(&format!("{label}\t"))))
            .then(|| num.to_string())
        })
        .collect()
}

fn efibootmgr(args: &[&str]) -> Result<String> {
    let out = Command::new("efibootmgr")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running efibootmgr")?;
    if !out.status.success() {
        bail!(
            "efibootmgr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_by_label() {
        let listing = "BootCurrent: 0001\nBootOrder: 0004,0001\n\
                       Boot0001* UEFI PXEv4 (MAC:525400123456)\tPciRoot(0x0)\n\
                       Boot0004* web1 (restored)\tHD(1,GPT,...)/File(\\EFI\\debian\\shimx64.efi)\n\
                       Boot0005  web1 (restored)\n\
                       Boot0006* web1 (restored) old\n";
        assert_eq!(entries_in(listing, "web1 (restored)"), ["0004", "0005"]);
    }

    #[test]
    fn loaders_by_preference_case_insensitive() {
        let d = tempfile::tempdir().unwrap();
        let efi = d.path().join("EFI");
        for f in [
            "BOOT/BOOTX64.EFI",
            "debian/grubx64.efi",
            "debian/shimx64.efi",
        ] {
            let p = efi.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"MZ").unwrap();
        }
        let pick = |efi: &Path| LOADERS.iter().find_map(|l| lookup(efi, l));
        assert_eq!(pick(&efi), Some(PathBuf::from("debian/shimx64.efi")));
        std::fs::remove_file(efi.join("debian/shimx64.efi")).unwrap();
        assert_eq!(pick(&efi), Some(PathBuf::from("debian/grubx64.efi")));
        std::fs::remove_dir_all(efi.join("debian")).unwrap();
        std::fs::create_dir_all(efi.join("Microsoft/Boot")).unwrap();
        std::fs::write(efi.join("Microsoft/Boot/BOOTMGFW.EFI"), b"MZ").unwrap();
        assert_eq!(
            pick(&efi),
            Some(PathBuf::from("Microsoft/Boot/BOOTMGFW.EFI"))
        );
    }
}
