//! The pseudo filesystems PID 1 mounts before anything else.

use anyhow::{Context, Result};
use rustix::mount::MountFlags as F;
use std::ffi::CStr;

fn mount(source: &str, target: &str, fstype: &str, flags: F, data: &CStr) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    match rustix::mount::mount(source, target, fstype, flags, data) {
        Ok(()) | Err(rustix::io::Errno::BUSY) => Ok(()),
        Err(e) => {
            Err(std::io::Error::from(e)).with_context(|| format!("mounting {fstype} on {target}"))
        }
    }
}

pub fn pseudo() -> Result<()> {
    let nosuid = F::NOSUID | F::NOEXEC | F::NODEV;
    mount("proc", "/proc", "proc", nosuid, c"")?;
    mount("sysfs", "/sys", "sysfs", nosuid, c"")?;
    mount("devtmpfs", "/dev", "devtmpfs", F::NOSUID, c"mode=0755")?;
    let (pts, tmp) = (F::NOSUID | F::NOEXEC, F::NOSUID | F::NODEV);
    mount("devpts", "/dev/pts", "devpts", pts, c"gid=5,mode=620")?;
    mount("tmpfs", "/run", "tmpfs", tmp, c"mode=0755")?;
    mount("tmpfs", "/tmp", "tmpfs", tmp, c"mode=1777")?;
    if std::path::Path::new("/sys/firmware/efi").exists() {
        // Optional: lets the rescue shell inspect and fix boot entries.
        let _ = mount(
            "efivarfs",
            "/sys/firmware/efi/efivars",
            "efivarfs",
            nosuid,
            c"",
        );
    }
    Ok(())
}
