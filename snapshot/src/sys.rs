//! System calls of the store and the readers: block- and loop-device ioctls, `flock`, `syncfs`,
//! the huge-page advice for chunk buffers. Through `rustix` where it covers them; the three
//! ioctls it has no wrapper for and `madvise` (unsafe in rustix too) are the only unsafe code of
//! the crate.
//!
//! Invariants of those: every call passes a valid open file descriptor borrowed from a live
//! `File`, and out-pointers to properly sized, initialised locals; `madvise` gets a range inside
//! a live `&mut [u8]` and an advice that leaves its contents as they are. Nothing here keeps a
//! pointer past the call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// `libc::Ioctl` is the request type of ioctl(2): unsigned long on glibc, int on musl (the
// static restorer of the boot image); the casts keep the bit patterns.
const BLKRRPART: libc::Ioctl = 0x125f;
const BLKGETSIZE64: libc::Ioctl = 0x80081272_u32 as libc::Ioctl;
const LOOP_GET_STATUS64: libc::Ioctl = 0x4c05;

/// `struct loop_info64` of `<linux/loop.h>` (232 bytes).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

/// The file behind a loop device, as the kernel holds it: the (major, minor) of the filesystem
/// it lives on and its inode number, and the device number it stands for when it is itself a
/// block device. Unlike its sysfs path, this survives a rename or the removal of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopBacking {
    pub dev: (u32, u32),
    pub ino: u64,
    pub rdev: (u32, u32),
}

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
    Ok((
        rustix::fs::ioctl_blksszget(f)?,
        rustix::fs::ioctl_blkpbszget(f)?,
    ))
}

/// Ask the kernel to re-read the partition table of a whole-disk block device.
pub fn reread_partitions(f: &File) -> io::Result<()> {
    // SAFETY: BLKRRPART takes no argument.
    check(unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART, 0) })
}

/// The backing file of loop device `f`; `Ok(None)` when no file is bound to it.
pub fn loop_backing(f: &File) -> io::Result<Option<LoopBacking>> {
    // SAFETY: LoopInfo64 is plain data; all-zero bytes are a valid value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one struct loop_info64 through the pointer.
    let rc = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    // The kernel encodes device numbers as huge_encode_dev, which libc's major/minor decode.
    let split = |d: u64| (libc::major(d as libc::dev_t), libc::minor(d as libc::dev_t));
    Ok(Some(LoopBacking {
        dev: split(info.lo_device),
        ino: info.lo_inode,
        rdev: split(info.lo_rdevice),
    }))
}

/// Take an advisory lock on `f`: shared or exclusive, waiting or not.
/// Returns `Ok(false)` when `wait` is false and someone else holds a conflicting lock.
pub fn flock(f: &File, exclusive: bool, wait: bool) -> io::Result<bool> {
    use rustix::fs::FlockOperation as Op;
    let op = match (exclusive, wait) {
        (true, true) => Op::LockExclusive,
        (true, false) => Op::NonBlockingLockExclusive,
        (false, true) => Op::LockShared,
        (false, false) => Op::NonBlockingLockShared,
    };
    match rustix::fs::flock(f, op) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Flush every dirty page and directory entry of the filesystem holding `f`.
pub fn syncfs(f: &File) -> io::Result<()> {
    Ok(rustix::fs::syncfs(f)?)
}

/// The size of a transparent huge page on x86-64 (and of the alignment that gets one).
pub const HUGE_PAGE: usize = 2 << 20;

/// Ask for transparent huge pages behind the whole huge pages inside `buf`. A worker streams
/// each 4 MiB chunk through its buffers (received, decoded, hashed, written): with 4 KiB pages
/// that is a thousand TLB misses per chunk and buffer, and they cost about 6% of a restore's
/// time on 2 cores (docs/benchmarks.md). Only advice: a kernel without THP, or with it off,
/// ignores it, and nothing fails.
pub fn advise_huge_pages(buf: &mut [u8]) {
    let start = buf.as_ptr().align_offset(HUGE_PAGE).min(buf.len());
    let len = (buf.len() - start) / HUGE_PAGE * HUGE_PAGE;
    if len == 0 {
        return;
    }
    let range = &mut buf[start..start + len];
    // SAFETY: `range` is memory this `&mut` borrow owns for the call; MADV_HUGEPAGE changes how
    // it is backed, never what it holds.
    let _ = unsafe {
        rustix::mm::madvise(
            range.as_mut_ptr().cast(),
            range.len(),
            rustix::mm::Advice::LinuxHugepage,
        )
    };
}
