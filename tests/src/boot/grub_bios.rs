//! GRUB for legacy BIOS on a GPT disk image without grub-install (which wants a real device):
//! `grub-mkimage -O i386-pc` makes a core image with an embedded config and every module it needs,
//! written into the BIOS boot partition; GRUB's boot.img goes into the MBR's code area with the
//! core's LBA patched in, and the core's first sector (diskboot) gets the LBA of the rest.

use crate::fixtures::Fixture;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const I386_PC: &str = "/usr/lib/grub/i386-pc";
/// Offset in boot.img of the 64-bit LBA of the core image's first sector.
const BOOT_KERNEL_SECTOR: usize = 0x5c;
/// Offset in diskboot.img (the core's first sector) of its blocklist: LBA (u64), sectors (u16).
const DISKBOOT_BLOCKLIST: usize = 512 - 12;

/// Installs GRUB onto the fixture's image in place (the fixture cache keeps it: idempotent).
pub fn install(f: &Fixture, core_lba: u64, config: &str) -> Result<()> {
    if !Path::new(I386_PC).join("boot.img").exists() {
        bail!("{I386_PC}/boot.img missing: apt-get install grub-pc-bin");
    }
    let work = tempfile::tempdir()?;
    let cfg = work.path().join("embed.cfg");
    std::fs::write(
        &cfg,
        format!("serial --unit=0 --speed=115200\nterminal_output console serial\n{config}"),
    )?;
    let core = work.path().join("core.img");
    let out = Command::new("grub-mkimage")
        .args(["-O", "i386-pc", "-d", I386_PC, "-p", "/boot/grub", "-c"])
        .arg(&cfg)
        .arg("-o")
        .arg(&core)
        .args([
            "biosdisk",
            "part_gpt",
            "ext2",
            "search",
            "search_fs_uuid",
            "linux",
            "boot",
            "echo",
            "serial",
            "terminal",
            "configfile",
            "normal",
        ])
        .output()
        .context("running grub-mkimage (apt-get install grub-common grub-pc-bin)")?;
    if !out.status.success() {
        bail!("grub-mkimage: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut core = std::fs::read(&core)?;
    if core.len() > 1 << 20 {
        bail!(
            "core.img is {} bytes, more than the BIOS boot partition",
            core.len()
        );
    }
    core[DISKBOOT_BLOCKLIST..DISKBOOT_BLOCKLIST + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    let mut boot = std::fs::read(Path::new(I386_PC).join("boot.img"))?;
    boot[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());

    let disk = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&f.image)?;
    disk.write_all_at(&core, core_lba * 512)?;
    // Code area only: the disk signature and the protective MBR's partition entry stay.
    disk.write_all_at(&boot[..440], 0)?;
    disk.sync_all()?;
    Ok(())
}
