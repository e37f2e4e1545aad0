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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_and_its_grub_become_the_fallback_once() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let debian = root.join("boot/efi/EFI/debian");
        std::fs::create_dir_all(&debian).unwrap();
        for f in ["shimx64.efi", "grubx64.efi", "mmx64.efi", "grub.cfg"] {
            std::fs::write(debian.join(f), f).unwrap();
        }
        let inv = crate::linux::test_inventory(vec![]);
        let mut ctx = Ctx::for_test(root, &inv);
        let line = fallback(&mut ctx, "boot/efi").unwrap().unwrap();
        assert!(line.contains("\\EFI\\debian\\shimx64.efi"), "{line}");
        let boot = root.join("boot/efi/EFI/BOOT");
        assert_eq!(
            std::fs::read(boot.join("BOOTX64.EFI")).unwrap(),
            b"shimx64.efi"
        );
        assert_eq!(
            std::fs::read(boot.join("grubx64.efi")).unwrap(),
            b"grubx64.efi"
        );
        assert_eq!(std::fs::read(boot.join("grub.cfg")).unwrap(), b"grub.cfg");
        assert_eq!(ctx.changes.list.len(), 4);
        // Present now: nothing more to do.
        assert!(fallback(&mut ctx, "boot/efi").unwrap().is_none());
        assert_eq!(ctx.changes.list.len(), 4);
    }

    #[test]
    fn no_loader_is_a_warning() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("boot/efi/EFI/vendor")).unwrap();
        let inv = crate::linux::test_inventory(vec![]);
        let mut ctx = Ctx::for_test(t.path(), &inv);
        assert!(fallback(&mut ctx, "boot/efi").unwrap().is_none());
        assert_eq!(ctx.warnings.len(), 1);
    }
}
