//! Boot loader configurations. Every entry boots the same kernel with the same command line:
//! consoles on screen and serial (the serial one last, so /dev/console is the serial port that a
//! BMC's serial-over-LAN and our tests read), `restorer.url=` from `--appliance-url`, then the
//! operator's `--cmdline`.

/// Label of the USB image's FAT and the ISO's volume: GRUB finds its files by it, and
/// `restorer init` finds the device it booted from by it, to keep it out of the restore targets.
pub const MEDIA_LABEL: &str = "BMR_RESTORE";

pub fn kernel_cmdline(appliance_url: Option<&str>, extra: &str) -> String {
    let mut c = String::from("console=tty0 console=ttyS0,115200n8");
    if let Some(u) = appliance_url {
        c.push_str(" restorer.url=");
        c.push_str(u);
    }
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// iPXE script; the file names are relative to the script's own URL.
pub fn ipxe(cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         # Bare-metal restore: boots the restorer image from the same directory as this script.\n\
         echo Booting the restore image...\n\
         kernel vmlinuz initrd=initrd.img {cmdline}\n\
         initrd initrd.img\n\
         boot\n"
    )
}

/// SYSLINUX family (pxelinux, syslinux on the USB FAT, isolinux): `dir` prefixes the file names.
pub fn syslinux(cmdline: &str, dir: &str) -> String {
    format!(
        "SERIAL 0 115200\n\
         DEFAULT restore\n\
         PROMPT 0\n\
         TIMEOUT 0\n\
         LABEL restore\n\
         \x20 KERNEL {dir}vmlinuz\n\
         \x20 INITRD {dir}initrd.img\n\
         \x20 APPEND {cmdline}\n"
    )
}

/// GRUB (Debian's signed image, started by shim). `search_label` makes GRUB look for the files on
/// the volume labelled MEDIA_LABEL (USB FAT, ISO); without it, paths are relative to GRUB's root
/// (the TFTP server for network boot).
pub fn grub(cmdline: &str, dir: &str, search_label: bool) -> String {
    let search = if search_label {
        format!("search --no-floppy --set=root --label {MEDIA_LABEL}\n")
    } else {
        String::new()
    };
    format!(
        "set timeout=0\n\
         set default=0\n\
         if serial --unit=0 --speed=115200; then\n\
         \x20 terminal_input --append serial\n\
         \x20 terminal_output --append serial\n\
         fi\n\
         {search}\
         menuentry \"Bare-metal restore\" {{\n\
         \x20 echo \"Loading the restore image...\"\n\
         \x20 linux {dir}vmlinuz {cmdline}\n\
         \x20 initrd {dir}initrd.img\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_extra_land_on_every_entry() {
        let c = kernel_cmdline(Some("http://10.0.2.2:8080/store"), " restorer.host=web1 ");
        assert!(c.ends_with(
            "console=ttyS0,115200n8 restorer.url=http://10.0.2.2:8080/store restorer.host=web1"
        ));
        for cfg in [ipxe(&c), syslinux(&c, "/"), grub(&c, "/", true)] {
            assert!(cfg.contains(&c), "{cfg}");
        }
    }
}
