//! Starting threads without panicking. `std::thread::spawn` and `Scope::spawn` panic when the
//! system refuses a thread (`RLIMIT_NPROC`, the pid or thread limit, memory); these return the
//! error instead, as one line naming the threads: `starting 8 worker threads: Resource
//! temporarily unavailable (os error 11)`.

use anyhow::{anyhow, Result};
use std::thread::{Scope, ScopedJoinHandle};

/// Start `n` threads in scope `s`, the k-th running the closure `make(k)` returns.
///
/// On the first refusal the error is returned and no further thread is started; the threads
/// already started keep running, so the caller must make them finish (a stop flag, a closed
/// channel) before the scope ends. The closure whose thread could not start is dropped.
pub fn start_scoped<'scope, 'env, F, T>(
    s: &'scope Scope<'scope, 'env>,
    n: usize,
    what: &str,
    mut make: impl FnMut(usize) -> F,
) -> Result<Vec<ScopedJoinHandle<'scope, T>>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    (0..n)
        .map(|k| {
            std::thread::Builder::new()
                .name(format!("{what}-{k}"))
                .spawn_scoped(s, make(k))
                .map_err(|e| refused(n, what, e))
        })
        .collect()
}

/// Start one thread in scope `s`.
pub fn start_one_scoped<'scope, 'env, F, T>(
    s: &'scope Scope<'scope, 'env>,
    what: &str,
    f: F,
) -> Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    std::thread::Builder::new()
        .name(what.to_string())
        .spawn_scoped(s, f)
        .map_err(|e| refused(1, what, e))
}

/// Start one thread outside any scope.
pub fn start<F, T>(what: &str, f: F) -> Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(what.to_string())
        .spawn(f)
        .map_err(|e| refused(1, what, e))
}

fn refused(n: usize, what: &str, e: std::io::Error) -> anyhow::Error {
    if n == 1 {
        anyhow!("starting the {what} thread: {e}")
    } else {
        anyhow!("starting {n} {what} threads: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_start_and_run() {
        let hits = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let hits = &hits;
            let h = start_scoped(s, 3, "test", |k| {
                move || hits.fetch_add(k + 1, std::sync::atomic::Ordering::Relaxed)
            })
            .unwrap();
            assert_eq!(h.len(), 3);
        });
        assert_eq!(hits.into_inner(), 6);
        assert_eq!(start("one", || 7).unwrap().join().unwrap(), 7);
        let e = refused(8, "worker", std::io::Error::from_raw_os_error(libc::EAGAIN));
        assert_eq!(
            e.to_string(),
            "starting 8 worker threads: Resource temporarily unavailable (os error 11)"
        );
    }
}
