//! DIR/restore.iso: hybrid El Torito for BMC virtual media and CDs (and `dd` to a stick).
//! BIOS: isolinux. UEFI: an EFI system partition image holding shim and Debian's signed GRUB,
//! which finds /.disk/info on the ISO 9660 volume and reads /boot/grub/grub.cfg from it.
//! An isohybrid MBR and GPT make the same file bootable as a disk.

use crate::bootcfg::{self, MEDIA_LABEL};
use crate::pxe::copy;
use crate::recipe::Recipe;
use crate::run::{require_tools, run};
use crate::usb::{mcopy, mcopy_dirs};
use anyhow::Result;
use std::path::Path;
use std::process::Command;

pub fn write(
    recipe: &Recipe,
    work: &Path,
    out: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Result<()> {
    require_tools(&[
        ("xorriso", "xorriso"),
        ("mkfs.fat", "dosfstools"),
        ("mcopy", "mtools"),
    ])?;
    let root = work.join("iso-root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for d in [".disk", "boot/grub", "isolinux"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(root.join(".disk/info"), "Bare-metal restore image\n")?;
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        bootcfg::grub(cmdline, "/", true),
    )?;
    copy(vmlinuz, &root.join("vmlinuz"))?;
    copy(initrd, &root.join("initrd.img"))?;
    copy(
        recipe.loader("isolinux")?,
        &root.join("isolinux/isolinux.bin"),
    )?;
    copy(
        recipe.loader("ldlinux")?,
        &root.join("isolinux/ldlinux.c32"),
    )?;
    std::fs::write(
        root.join("isolinux/isolinux.cfg"),
        bootcfg::syslinux(cmdline, "/"),
    )?;

    // The El Torito EFI image: a small FAT with the removable-media path /EFI/BOOT/BOOTX64.EFI.
    let efi = root.join("boot/efiboot.img");
    let efi_s = efi.display().to_string();
    run(Command::new("mkfs.fat")
        .args(["-C", "-n", "BMR_EFI", "-i", "B0071A6F"])
        .arg(&efi)
        .arg("8192"))?;
    mcopy_dirs(&efi_s, &["/EFI", "/EFI/BOOT"])?;
    mcopy(&efi_s, recipe.loader("shim")?, "/EFI/BOOT/BOOTX64.EFI")?;
    mcopy(&efi_s, recipe.loader("grub-efi")?, "/EFI/BOOT/grubx64.efi")?;
    mcopy(&efi_s, recipe.loader("mokmanager")?, "/EFI/BOOT/mmx64.efi")?;

    let tmp = out.with_extension("iso.tmp");
    let _ = std::fs::remove_file(&tmp);
    run(Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-r",
            "-J",
            "-V",
            MEDIA_LABEL,
            "-o",
        ])
        .arg(&tmp)
        .arg("-isohybrid-mbr")
        .arg(recipe.loader("isohdpfx")?)
        .args(["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat"])
        .args(["-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"])
        .args([
            "-eltorito-alt-boot",
            "-e",
            "boot/efiboot.img",
            "-no-emul-boot",
        ])
        .arg("-isohybrid-gpt-basdat")
        .arg(&root))?;
    std::fs::rename(&tmp, out)?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
