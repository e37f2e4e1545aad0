//! Mounting the restored system (mount(2), umount2(2)): the only unsafe code of the crate.
//! A [`Mounts`] stack unmounts everything it mounted, innermost first, when dropped, so an
//! error anywhere in the adaptation never leaves the restored disks mounted.

use anyhow::{bail, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Default)]
pub struct Mounts {
    stack: Vec<PathBuf>,
}

fn cstr(p: &Path) -> Result<CString> {
    Ok(CString::new(p.as_os_str().as_bytes())?)
}

/// Whether a mount failed because this kernel has no driver for the filesystem type.
pub fn unsupported(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .and_then(|e| e.raw_os_error())
        == Some(libc::ENODEV)
}

impl Mounts {
    /// Mounts `dev` (a filesystem of type `fstype`) on `dir`, read-only when `ro`.
    pub fn mount(&mut self, dev: &str, dir: &Path, fstype: &str, ro: bool) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let flags = if ro { libc::MS_RDONLY } else { 0 };
        // ext3/ext4 journals are replayed by a read-write mount; a read-only probe of a
        // filesystem that needs recovery must not write: `noload` skips the journal.
        let data = if ro && fstype.starts_with("ext") && fstype != "ext2" {
            "noload"
        } else if ro && fstype == "xfs" {
            "norecovery"
        } else {
            ""
        };
        self.raw(dev, dir, fstype, flags, data).map_err(|e| {
            anyhow::Error::new(e).context(format!("mounting {dev} ({fstype}) on {}", dir.display()))
        })
    }

    /// Binds `src` onto `dir` (recursively, for /dev, /proc, /sys, /run of a chroot).
    pub fn bind(&mut self, src: &Path, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        self.raw(
            &src.to_string_lossy(),
            dir,
            "",
            libc::MS_BIND | libc::MS_REC,
            "",
        )
        .map_err(|e| anyhow::anyhow!("binding {} on {}: {e}", src.display(), dir.display()))
    }

    fn raw(
        &mut self,
        src: &str,
        dir: &Path,
        fstype: &str,
        flags: libc::c_ulong,
        data: &str,
    ) -> std::io::Result<()> {
        let to_c = |s: &str| CString::new(s).map_err(|_| std::io::ErrorKind::InvalidInput);
        let (src_c, dir_c, ty_c, data_c) = (
            to_c(src)?,
            cstr(dir).map_err(|_| std::io::ErrorKind::InvalidInput)?,
            to_c(fstype)?,
            to_c(data)?,
        );
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let r = unsafe {
            libc::mount(
                src_c.as_ptr(),
                dir_c.as_ptr(),
                if fstype.is_empty() {
                    std::ptr::null()
                } else {
                    ty_c.as_ptr()
                },
                flags,
                if data.is_empty() {
                    std::ptr::null()
                } else {
                    data_c.as_ptr().cast()
                },
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.stack.push(dir.to_path_buf());
        Ok(())
    }

    /// Unmounts everything, innermost first; the first failure is returned after trying all.
    pub fn unmount_all(&mut self) -> Result<()> {
        let mut first = None;
        while let Some(dir) = self.stack.pop() {
            if let Err(e) = umount(&dir) {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn umount(dir: &Path) -> Result<()> {
    let c = cstr(dir)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    // Recursive binds (/dev/pts under /dev, ...) go with a lazy detach.
    // SAFETY: as above.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    bail!("unmounting {}: {e}", dir.display())
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            eprintln!("restorer: adapt: {e:#}");
        }
    }
}
