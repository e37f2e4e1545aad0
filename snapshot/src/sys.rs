//! The only unsafe code of the toolkit: block-device ioctls and `flock`.
//!
//! Invariants: every call passes a valid open file descriptor borrowed from a live `File`, and
//! out-pointers to properly sized, initialised locals. Nothing here keeps a pointer past the call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// `libc::Ioctl` is the request type of ioctl(2): unsigned long on glibc, int on musl (the
// static restorer of the boot image); the casts keep the bit patterns.
const BLKSSZGET: libc::Ioctl = 0x1268;
const BLKRRPART: libc::Ioctl = 0x125f;
const BLKPBSZGET: libc::Ioctl = 0x127b;
const BLKGETSIZE64: libc::Ioctl = 0x80081272_u32 as libc::Ioctl;
const BLKDISCARDZEROES: libc::Ioctl = 0x127c;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Size in bytes of a block device.
pub fn device_size(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    check(unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })?;
    Ok(size)
}

/// Logical and physical sector sizes of a block device.
pub fn sector_sizes(f: &File) -> io::Result<(u32, u32)> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes one int, BLKPBSZGET one unsigned int.
    check(unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut logical as *mut libc::c_int) })?;
    check(unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            BLKPBSZGET,
            &mut physical as *mut libc::c_uint,
        )
    })?;
    Ok((logical as u32, physical as u32))
}

/// Whether a discard of this device is guaranteed to read back as zeros.
pub fn discard_zeroes(f: &File) -> io::Result<bool> {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKDISCARDZEROES writes one unsigned int.
    check(unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARDZEROES, &mut v as *mut libc::c_uint) })?;
    Ok(v != 0)
}

/// Ask the kernel to re-read the partition table of a whole-disk block device.
pub fn reread_partitions(f: &File) -> io::Result<()> {
    // SAFETY: BLKRRPART takes no argument.
    check(unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART, 0) })
}

/// Take an advisory lock on `f`: shared or exclusive, waiting or not.
/// Returns `Ok(false)` when `wait` is false and someone else holds a conflicting lock.
pub fn flock(f: &File, exclusive: bool, wait: bool) -> io::Result<bool> {
    let mut op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    // SAFETY: flock takes an fd and flags.
    let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Flush every dirty page and directory entry of the filesystem holding `f`.
pub fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: syncfs takes an fd.
    check(unsafe { libc::syncfs(f.as_raw_fd()) })
}
