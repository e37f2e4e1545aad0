//! The pseudo filesystems PID 1 mounts before anything else.

use anyhow::{Context, Result};
use std::ffi::CString;

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (src, tgt, fs, dat) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            dat.as_ptr() as *const libc::c_void,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e).with_context(|| format!("mounting {fstype} on {target}"));
        }
    }
    Ok(())
}

pub fn pseudo() -> Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV;
    mount("proc", "/proc", "proc", nosuid, "")?;
    mount("sysfs", "/sys", "sysfs", nosuid, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620",
    )?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    if std::path::Path::new("/sys/firmware/efi").exists() {
        // Optional: lets the rescue shell inspect and fix boot entries.
        let _ = mount(
            "efivarfs",
            "/sys/firmware/efi/efivars",
            "efivarfs",
            nosuid,
            "",
        );
    }
    Ok(())
}
