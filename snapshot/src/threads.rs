//! Threads without panics, and the one parallel map every slot and chunk loop uses.
//!
//! `std::thread::spawn` and `Scope::spawn` panic when the system refuses a thread
//! (`RLIMIT_NPROC`, the pid or thread limit, memory); these return the error instead, as one line
//! naming the threads: `starting 8 worker threads: Resource temporarily unavailable (os error 11)`.
//!
//! [`par_each`] is the work loop of restore, failback, verify and the local reader: items taken
//! in order from a shared counter, a stop flag, the first error returned. The chunker and the
//! capture keep their channels: there one reader streams the disk in order to many workers.
//! [`on_a_core`] admits at most one thread per core at a time into the decoding and hashing of a
//! chunk, however many workers wait on the network and the disk.

use anyhow::{anyhow, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};

/// Run `work(&mut state, k)` for every `k` in `0..n` on up to `threads` threads (never more than
/// `n`), each thread with its own `state` from `init()` (a buffer, a connection). Items are taken
/// in order. The first error stops the other threads before their next item and is returned; a
/// refused thread is such an error (the threads already started stop the same way).
pub fn par_each<S>(
    threads: usize,
    what: &str,
    n: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let fail = |e: anyhow::Error| {
        stop.store(true, Ordering::Relaxed);
        failed.lock().expect("lock").get_or_insert(e);
    };
    let run = || {
        let mut state = init();
        while !stop.load(Ordering::Relaxed) {
            let k = next.fetch_add(1, Ordering::Relaxed);
            if k >= n {
                return;
            }
            if let Err(e) = work(&mut state, k) {
                return fail(e);
            }
        }
    };
    match threads.clamp(1, n.max(1)) {
        1 => run(),
        t => std::thread::scope(|s| {
            if let Err(e) = start_scoped(s, t, what, |_| &run) {
                fail(e);
            }
        }),
    }
    match failed.into_inner().expect("lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

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

/// The threads inside [`on_a_core`] now, at most as many as the machine has cores.
static ON_CORES: Mutex<usize> = Mutex::new(0);
static CORE_FREED: std::sync::Condvar = std::sync::Condvar::new();

fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Run `f`, CPU-bound work on a buffer (decoding or hashing a chunk), once fewer threads than
/// the machine has cores are doing such work. Restore and failback run more workers than cores,
/// so that while some decode and hash, others wait on the network or the disk. When they all
/// decode and hash at once, each is preempted halfway through its chunk and finds its 4 MiB
/// buffers evicted from the cache when it resumes: through here, the work on a chunk runs to its
/// end while its buffers are warm (4% faster restores on 2 cores, docs/benchmarks.md). `f` must
/// not call this again.
pub fn on_a_core<T>(f: impl FnOnce() -> T) -> T {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            *ON_CORES.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            CORE_FREED.notify_one();
        }
    }
    {
        let mut busy = ON_CORES.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= cores() {
            busy = CORE_FREED.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
    }
    let _leave = Leave;
    f()
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

    #[test]
    fn par_each_visits_every_item_once() {
        for threads in [1, 3, 64] {
            let seen: Vec<_> = (0..1000)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect();
            par_each(
                threads,
                "t",
                seen.len(),
                || 0usize,
                |mine, k| {
                    *mine += 1;
                    seen[k].fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
            )
            .unwrap();
            assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        }
        par_each(4, "t", 0, || (), |_, _| unreachable!()).unwrap();
    }

    #[test]
    fn par_each_stops_at_the_first_error() {
        let done = AtomicUsize::new(0);
        let e = par_each(
            4,
            "t",
            100_000,
            || (),
            |_, k| {
                if k == 10 {
                    anyhow::bail!("item {k} failed");
                }
                done.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_micros(50));
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "item 10 failed");
        // Without the stop the others would do all 99,999 (about 1.7 s); the margin allows for
        // the failing thread being preempted on a loaded machine before it returns its error.
        assert!(done.into_inner() < 10_000, "the other threads went on");
    }

    #[test]
    fn no_more_threads_than_cores_work_at_once() {
        let (inside, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        par_each(
            4 * cores() + 2,
            "t",
            64,
            || (),
            |_, _| {
                on_a_core(|| {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    inside.fetch_sub(1, Ordering::SeqCst);
                });
                Ok(())
            },
        )
        .unwrap();
        let most = most.into_inner();
        assert!(
            (1..=cores()).contains(&most),
            "{most} at once on {} cores",
            cores()
        );
        // A panic inside leaves its place free: after as many panics as cores, one more gets in.
        for _ in 0..cores() {
            let _ = std::panic::catch_unwind(|| on_a_core(|| panic!("inside")));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(on_a_core(|| 7)));
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(10)), Ok(7));
    }
}
