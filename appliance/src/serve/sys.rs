//! System calls of `appliance serve`, through `rustix` (no unsafe code): raising the open-files
//! limit, and opening a file below a directory without following any symbolic link (`openat2`).

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::process::{getrlimit, setrlimit, Resource};
use std::fs::File;
use std::io;

/// Let this process open `want` files (sockets and served files), as far as the hard limit
/// allows; the soft limit is often 1024.
pub fn raise_open_files_limit(want: u64) {
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|c| c >= want) || lim.current.is_none() {
        return;
    }
    lim.current = Some(lim.maximum.map_or(want, |m| want.min(m)));
    let _ = setrlimit(Resource::Nofile, lim);
}

fn oflags(flags: i32) -> OFlags {
    OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`:
/// `rel` is resolved inside `dir` only, and no component may be a symbolic link. `ENOSYS` (a
/// kernel before 5.6, or a seccomp filter) tells the caller to fall back.
pub fn openat2_beneath(dir: &File, rel: &str, flags: i32) -> io::Result<File> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let fd = rustix::fs::openat2(dir, rel, oflags(flags), Mode::empty(), resolve)?;
    Ok(File::from(fd))
}

/// `openat(dir, name, flags | O_NOFOLLOW)`: one path component, never a symbolic link.
pub fn openat_nofollow(dir: &File, name: &str, flags: i32) -> io::Result<File> {
    let fd = rustix::fs::openat(dir, name, oflags(flags) | OFlags::NOFOLLOW, Mode::empty())?;
    Ok(File::from(fd))
}
