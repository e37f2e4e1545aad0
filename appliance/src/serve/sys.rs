//! The only unsafe code of `appliance serve`: waiting for SIGTERM/SIGINT without a signal handler,
//! and opening a file below a directory without following any symbolic link (`openat2`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// Block SIGTERM and SIGINT in the calling thread, and so in every thread it starts afterwards
/// (call it before starting any), and return a function that waits for one of them and returns
/// its number. No handler runs in signal context: the waiting thread gets the signal as a value.
pub fn block_termination_signals() -> io::Result<impl Fn() -> io::Result<i32> + Send + 'static> {
    // SAFETY: `set` is a local sigset_t that sigemptyset initialises before any other use;
    // sigaddset and pthread_sigmask only read and write through the pointers given for the length
    // of each call, and a null `oldset` is allowed.
    let set = unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        set
    };
    Ok(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t owned by this closure; sigwait writes one int
        // through `&mut sig` and keeps neither pointer.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    })
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
