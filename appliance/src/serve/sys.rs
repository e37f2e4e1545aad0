//! The only unsafe code of `appliance serve`: waiting for SIGTERM/SIGINT without a signal handler.

use std::io;

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
