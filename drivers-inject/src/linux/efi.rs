//! The UEFI removable-media fallback `\EFI\BOOT\BOOTX64.EFI`: firmware that has no boot entry
//! for the restored system (a new machine's NVRAM) boots it. Copied from the system's own
//! loader on its ESP when missing: shim with its GRUB and MokManager, else GRUB, else
//! systemd-boot.

use super::Ctx;
use anyhow::Result;

/// `esp` is where the ESP is mounted, relative to the root (`boot/efi`).
pub fn fallback(ctx: &mut Ctx, esp: &str) -> Result<Option<String>> {
    let boot = format!("{esp}/EFI/BOOT");
    // vfat lookups ignore case: one check covers BOOTX64.EFI and bootx64.efi.
    if ctx.changes.path(&format!("{boot}/BOOTX64.EFI")).exists() {
        return Ok(None);
    }
    let mut vendors: Vec<String> = std::fs::read_dir(ctx.changes.path(&format!("{esp}/EFI")))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.eq_ignore_ascii_case("boot"))
        .collect();
    vendors.sort();
    let has =
        |ctx: &Ctx, v: &str, f: &str| ctx.changes.path(&format!("{esp}/EFI/{v}/{f}")).is_file();
    let why =
        "UEFI fallback loader: this machine's firmware has no boot entry for the restored system";
    for (first, extras) in [
        ("shimx64.efi", &["grubx64.efi", "mmx64.efi", "grub.cfg"][..]),
        ("grubx64.efi", &["grub.cfg"][..]),
        ("systemd-bootx64.efi", &[][..]),
    ] {
        let Some(v) = vendors.iter().find(|v| has(ctx, v, first)) else {
            continue;
        };
        ctx.changes.copy(
            &format!("{esp}/EFI/{v}/{first}"),
            &format!("{boot}/BOOTX64.EFI"),
            why,
        )?;
        for x in extras {
            if has(ctx, v, x) {
                ctx.changes
                    .copy(&format!("{esp}/EFI/{v}/{x}"), &format!("{boot}/{x}"), why)?;
            }
        }
        return Ok(Some(format!(
            "\\EFI\\BOOT\\BOOTX64.EFI from \\EFI\\{v}\\{first}"
        )));
    }
    ctx.warnings
        .push("the ESP has no loader to copy as \\EFI\\BOOT\\BOOTX64.EFI".into());
    Ok(None)
}
