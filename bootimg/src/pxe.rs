//! DIR/pxe: a directory that is at once an HTTP root for iPXE (`boot.ipxe`, served by
//! `appliance serve --boot DIR` under /boot/), a TFTP root for BIOS PXE (pxelinux) and for UEFI
//! network boot (shim + Debian's signed network GRUB), plus iPXE binaries to chainload.

use crate::bootcfg;
use crate::recipe::Recipe;
use anyhow::{Context, Result};
use std::path::Path;

pub fn write(
    recipe: &Recipe,
    dir: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir.join("pxelinux.cfg"))?;
    std::fs::create_dir_all(dir.join("grub"))?;
    copy(vmlinuz, &dir.join("vmlinuz"))?;
    copy(initrd, &dir.join("initrd.img"))?;
    std::fs::write(dir.join("boot.ipxe"), bootcfg::ipxe(cmdline))?;
    // BIOS TFTP: pxelinux.0 needs ldlinux.c32 beside it.
    copy(recipe.loader("pxelinux")?, &dir.join("pxelinux.0"))?;
    copy(recipe.loader("ldlinux")?, &dir.join("ldlinux.c32"))?;
    std::fs::write(
        dir.join("pxelinux.cfg/default"),
        bootcfg::syslinux(cmdline, ""),
    )?;
    // UEFI TFTP: shim loads grubx64.efi from its own directory; the network GRUB reads
    // $prefix/grub.cfg with prefix (tftp,SERVER)/grub.
    copy(recipe.loader("shim")?, &dir.join("bootx64.efi"))?;
    copy(recipe.loader("mokmanager")?, &dir.join("mmx64.efi"))?;
    copy(recipe.loader("grub-net")?, &dir.join("grubx64.efi"))?;
    std::fs::write(
        dir.join("grub/grub.cfg"),
        bootcfg::grub(cmdline, "/", false),
    )?;
    // For DHCP servers that chainload iPXE first, then boot.ipxe over HTTP.
    copy(recipe.loader("ipxe-efi")?, &dir.join("ipxe.efi"))?;
    copy(recipe.loader("ipxe-bios")?, &dir.join("undionly.kpxe"))?;
    Ok(())
}

pub fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}
