//! DIR/usb.img: a GPT disk with one FAT32 EFI system partition, built without mounting anything
//! (mkfs.fat --offset, mtools, sgdisk). UEFI: /EFI/BOOT/BOOTX64.EFI is Microsoft-signed shim,
//! which loads Debian's signed GRUB, which loads Debian's signed kernel, so it boots with Secure
//! Boot enforced. Legacy BIOS: syslinux's gptmbr.bin in the MBR boots the partition marked
//! "legacy BIOS bootable", whose boot sector and ldlinux.sys syslinux installs (through mtools).

use crate::bootcfg::{self, MEDIA_LABEL};
use crate::recipe::Recipe;
use crate::run::{require_tools, run};
use anyhow::{Context, Result};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;
/// The partition starts at 1 MiB (LBA 2048), the usual alignment.
const START: u64 = MIB;

pub fn write(
    recipe: &Recipe,
    out: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Result<()> {
    require_tools(&[
        ("sgdisk", "gdisk"),
        ("mkfs.fat", "dosfstools"),
        ("mcopy", "mtools"),
        ("syslinux", "syslinux"),
    ])?;
    let payload = std::fs::metadata(vmlinuz)?.len() + std::fs::metadata(initrd)?.len();
    // FAT32 needs at least 65525 clusters; leave room for the loaders and a spare copy's worth.
    let esp = (payload + 16 * MIB).max(40 * MIB).div_ceil(MIB) * MIB;
    let total = START + esp + MIB; // 1 MiB at the end for the backup GPT
    let tmp = out.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::File::create(&tmp)?.set_len(total)?;

    let t = tmp.display().to_string();
    run(Command::new("sgdisk")
        .args(["--clear", "--disk-guid=R"])
        .arg(format!(
            "--new=1:{}:{}",
            START / 512,
            (START + esp) / 512 - 1
        ))
        .args(["--typecode=1:EF00", "--change-name=1:BMR restore"])
        // bit 2: legacy BIOS bootable, what gptmbr.bin looks for
        .args(["--attributes=1:set:2"])
        .arg(&t))?;
    run(Command::new("mkfs.fat")
        .args(["-F", "32", "-n", MEDIA_LABEL, "-i", "B0071A6E"])
        .arg(format!("--offset={}", START / 512))
        .arg(&t)
        .arg((esp / 1024).to_string()))?;

    let fat = format!("{t}@@{START}");
    mcopy_dirs(&fat, &["/EFI", "/EFI/BOOT", "/EFI/debian", "/syslinux"])?;
    mcopy(&fat, recipe.loader("shim")?, "/EFI/BOOT/BOOTX64.EFI")?;
    mcopy(&fat, recipe.loader("grub-efi")?, "/EFI/BOOT/grubx64.efi")?;
    mcopy(&fat, recipe.loader("mokmanager")?, "/EFI/BOOT/mmx64.efi")?;
    // Debian's signed GRUB reads $prefix/grub.cfg with prefix /EFI/debian on the same volume.
    let grub = bootcfg::grub(cmdline, "/", true);
    mcopy_bytes(&fat, grub.as_bytes(), "/EFI/debian/grub.cfg", out)?;
    mcopy_bytes(&fat, grub.as_bytes(), "/EFI/BOOT/grub.cfg", out)?;
    mcopy_bytes(
        &fat,
        bootcfg::syslinux(cmdline, "/").as_bytes(),
        "/syslinux/syslinux.cfg",
        out,
    )?;
    mcopy(&fat, recipe.loader("ldlinux")?, "/syslinux/ldlinux.c32")?;
    mcopy(&fat, vmlinuz, "/vmlinuz")?;
    mcopy(&fat, initrd, "/initrd.img")?;
    run(Command::new("syslinux")
        .args(["--install", "--directory", "/syslinux"])
        .arg(format!("--offset={START}"))
        .arg(&t))?;

    // MBR boot code (first 440 bytes; the protective MBR's partition entry stays as sgdisk wrote it).
    let mbr = std::fs::read(recipe.loader("gptmbr")?)?;
    let mut f = std::fs::OpenOptions::new().write(true).open(&tmp)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&mbr[..mbr.len().min(440)])?;
    f.sync_all()?;
    drop(f);
    run(Command::new("sgdisk").arg("--verify").arg(&t))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(())
}

pub fn mcopy_dirs(fat: &str, dirs: &[&str]) -> Result<()> {
    for d in dirs {
        run(Command::new("mmd").args(["-i", fat, &format!("::{d}")]))?;
    }
    Ok(())
}

pub fn mcopy(fat: &str, from: &Path, to: &str) -> Result<()> {
    run(Command::new("mcopy")
        .args(["-o", "-i", fat])
        .arg(from)
        .arg(format!("::{to}")))?;
    Ok(())
}

/// Copies generated content (written next to `beside` first) onto the FAT.
pub fn mcopy_bytes(fat: &str, data: &[u8], to: &str, beside: &Path) -> Result<()> {
    let tmp = beside.with_extension("mcopy.tmp");
    std::fs::write(&tmp, data)?;
    let r = mcopy(fat, &tmp, to);
    std::fs::remove_file(&tmp)?;
    r
}
