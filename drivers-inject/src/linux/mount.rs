//! Mounting the restored system (mount(2), umount2(2), through `rustix`).
//! A [`Mounts`] stack unmounts everything it mounted, innermost first, when dropped, so an
//! error anywhere in the adaptation never leaves the restored disks mounted.

use anyhow::{bail, Result};
use rustix::mount::MountFlags;
use std::ffi::CString;
use std::path::{Path, PathBuf};

#[derive(Default)]
pub struct Mounts {
    stack: Vec<PathBuf>,
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
        let flags = if ro {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
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
            MountFlags::BIND | MountFlags::REC,
            "",
        )
        .map_err(|e| anyhow::anyhow!("binding {} on {}: {e}", src.display(), dir.display()))
    }

    fn raw(
        &mut self,
        src: &str,
        dir: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> std::io::Result<()> {
        let data = CString::new(data).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let data = (!data.is_empty()).then_some(data.as_c_str());
        rustix::mount::mount(src, dir, fstype, flags, data)?;
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
    use rustix::mount::{unmount, UnmountFlags};
    let Err(e) = unmount(dir, UnmountFlags::empty()) else {
        return Ok(());
    };
    // Recursive binds (/dev/pts under /dev, ...) go with a lazy detach.
    if unmount(dir, UnmountFlags::DETACH).is_ok() {
        return Ok(());
    }
    bail!("unmounting {}: {}", dir.display(), std::io::Error::from(e))
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            eprintln!("restorer: adapt: {e:#}");
        }
    }
}
