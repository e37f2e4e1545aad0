//! The only unsafe code of `appliance serve`: raising the open-files limit, and opening a file below a directory without following any symbolic link (`openat2`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// Let this process open `want` files (sockets and served files), as far as the hard limit
/// allows; the soft limit is often 1024.
pub fn raise_open_files_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one rlimit through a pointer valid for the
    // call and keep no reference to it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= want {
            return;
        }
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// `struct open_how` of `linux/openat2.h` (libc's is `non_exhaustive`, so not constructible).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`:
/// `rel` is resolved inside `dir` only, and no component may be a symbolic link. `ENOSYS` (a
/// kernel before 5.6, or a seccomp filter) tells the caller to fall back.
pub fn openat2_beneath(dir: &File, rel: &str, flags: i32) -> io::Result<File> {
    let path =
        std::ffi::CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `path` is a NUL-terminated string and `how` an initialised `open_how` of the size
    // passed, both alive for the call; the kernel keeps neither pointer. A non-negative result is
    // a new file descriptor that nothing else owns, so `File` may take it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// `openat(dir, name, flags | O_NOFOLLOW)`: one path component, never a symbolic link.
pub fn openat_nofollow(dir: &File, name: &str, flags: i32) -> io::Result<File> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is NUL-terminated and alive for the call; a non-negative result is a fresh
    // descriptor that `File` takes ownership of.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { File::from_raw_fd(fd) })
}
