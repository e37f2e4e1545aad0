//! Upload sessions: one per snapshot being uploaded. A session holds the store's writer lock
//! (the shared `flock` on `private/gc.lock` that `LocalStore::writer` takes), so `appliance gc`
//! cannot remove a chunk that the upload found present and is about to reference. It ends with
//! commit, DELETE, one idle period without requests, or server shutdown.

use anyhow::{Context, Result};
use snapshot::format::index::ChunkIndex;
use snapshot::store::local::{Reservation, WriterGuard};
use snapshot::store::LocalStore;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Open sessions at once; more are refused with 503 until some end.
pub const MAX_SESSIONS: usize = 64;

pub struct Session {
    pub id: String,
    pub host: String,
    pub snapshot: String,
    /// Label of the token that opened it, for log lines.
    pub owner: String,
    last_used: Mutex<Instant>,
    /// Uploaded indexes by disk number, each with the SHA-256 (hex) of its bytes.
    pub indexes: Mutex<BTreeMap<u32, (ChunkIndex, String)>>,
    /// Set while a commit runs, so two commits of one session cannot race.
    pub committing: AtomicBool,
    /// The snapshot id, reserved from the opening of the session to its commit (ingests and
    /// other sessions of the host skip it).
    pub reservation: Reservation,
    /// The writer lock; released when the last user of the session drops it.
    _lock: WriterGuard,
}

impl Session {
    pub fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

pub struct Uploads {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    idle: Duration,
}

/// Why a session could not be opened.
pub enum OpenError {
    /// `gc` holds the store: retry later.
    GcRunning,
    TooMany,
    Other(anyhow::Error),
}

impl Uploads {
    pub fn new(idle: Duration) -> Uploads {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            idle,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open a session for `host` with a new snapshot id, reserved now: the UTC time, with `-1`,
    /// `-2`... when a snapshot, an ingest or another session of the host has it.
    pub fn open(
        &self,
        store: &LocalStore,
        host: &str,
        owner: &str,
    ) -> Result<Arc<Session>, OpenError> {
        let lock = store.try_writer().map_err(OpenError::Other)?;
        let Some(lock) = lock else {
            return Err(OpenError::GcRunning);
        };
        let mut map = self.map();
        if map.len() >= MAX_SESSIONS {
            return Err(OpenError::TooMany);
        }
        let reservation = store
            .reserve_snapshot(&lock, host, None)
            .map_err(OpenError::Other)?;
        let snapshot = reservation.id.clone();
        let id = random_id().map_err(OpenError::Other)?;
        let s = Arc::new(Session {
            id: id.clone(),
            host: host.to_string(),
            snapshot,
            owner: owner.to_string(),
            last_used: Mutex::new(Instant::now()),
            indexes: Mutex::new(BTreeMap::new()),
            committing: AtomicBool::new(false),
            reservation,
            _lock: lock,
        });
        map.insert(id, s.clone());
        Ok(s)
    }

    /// The live session `id`, marked as used now. An idle-expired session is gone.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let mut map = self.map();
        let s = map.get(id)?.clone();
        if s.idle_for() >= self.idle {
            map.remove(id);
            log_end(&s, "expired (idle)");
            return None;
        }
        s.touch();
        Some(s)
    }

    /// End a session (commit or DELETE). Its lock goes when the last request using it ends.
    pub fn remove(&self, id: &str, why: &str) -> bool {
        match self.map().remove(id) {
            Some(s) => {
                log_end(&s, why);
                true
            }
            None => false,
        }
    }

    /// End the sessions idle for longer than the idle limit.
    pub fn expire(&self) {
        let mut map = self.map();
        let idle = self.idle;
        map.retain(|_, s| {
            // A commit in progress is not idle, however long it takes.
            let keep = s.idle_for() < idle || s.committing.load(Ordering::SeqCst);
            if !keep {
                log_end(s, "expired (idle)");
            }
            keep
        });
    }

    /// Abort every session (server shutdown).
    pub fn abort_all(&self) -> usize {
        let mut map = self.map();
        let n = map.len();
        for (_, s) in map.drain() {
            log_end(&s, "aborted (server shutting down)");
        }
        n
    }
}

fn log_end(s: &Session, why: &str) {
    eprintln!(
        "appliance serve: upload {} of {}/{} by {} {why}",
        s.id, s.host, s.snapshot, s.owner
    );
}

/// An unguessable session id: 128 bits from the kernel's random source, in hex.
fn random_id() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_411_140);
        assert_eq!(snapshot::store::local::time_id(t), "20261123T051900Z");
        let a = random_id().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_id().unwrap());
    }
}
