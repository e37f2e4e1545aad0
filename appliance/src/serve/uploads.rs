//! Upload sessions: one per snapshot being uploaded. A session holds the store's writer lock
//! (the shared `flock` on `private/gc.lock` that `LocalStore::writer` takes), so `appliance gc`
//! cannot remove a chunk that the upload found present and is about to reference. It ends with
//! commit, DELETE, one idle period without requests, or server shutdown.
//!
//! Memory: a session's uploaded indexes are streamed to `tmp/uploads/<session>/` as they arrive
//! (hashed on the way, the header checked), never held whole; the directory goes with the
//! session. A token may hold [`MAX_SESSIONS_PER_TOKEN`] sessions at once. A commit loads its
//! indexes (32 bytes a 4 MiB slot) for the chunk check and the publication; one commit at a
//! time does ([`Uploads::commit_gate`]), so at most one session's indexes are in memory.

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};
use snapshot::format::index::{self, ChunkIndex, Slot};
use snapshot::format::{Digest, CHUNK_SIZE};
use snapshot::store::local::{Reservation, WriterGuard};
use snapshot::store::LocalStore;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Open sessions at once; more are refused with 503 until some end.
pub const MAX_SESSIONS: usize = 64;
/// Open sessions of one token at once; more are refused with 429.
pub const MAX_SESSIONS_PER_TOKEN: usize = 4;

/// An uploaded index, on disk under the session's directory.
pub struct StoredIndex {
    pub path: PathBuf,
    /// SHA-256 (hex) of its bytes.
    pub sha256: String,
    pub disk_size: u64,
    /// Its length in bytes.
    pub len: u64,
}

pub struct Session {
    pub id: String,
    pub host: String,
    pub snapshot: String,
    /// Label of the token that opened it, for log lines.
    pub owner: String,
    last_used: Mutex<Instant>,
    /// Uploaded indexes by disk number, in `dir`.
    pub indexes: Mutex<BTreeMap<u32, StoredIndex>>,
    /// `tmp/uploads/<id>/`: removed when the session is dropped.
    dir: PathBuf,
    /// Set while a commit runs, so two commits of one session cannot race.
    pub committing: AtomicBool,
    /// The snapshot id, reserved from the opening of the session to its commit (ingests and
    /// other sessions of the host skip it).
    pub reservation: Reservation,
    /// The writer lock; released when the last user of the session drops it.
    _lock: WriterGuard,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "appliance serve: error: removing {}: {e} (gc removes it later)",
                    self.dir.display()
                );
            }
        }
    }
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
    /// Held by a commit while it has its indexes in memory.
    pub commit_gate: Mutex<()>,
}

/// Why a session could not be opened.
pub enum OpenError {
    /// `gc` holds the store: retry later.
    GcRunning,
    TooMany,
    /// This token has [`MAX_SESSIONS_PER_TOKEN`] sessions open.
    TooManyForToken,
    Other(anyhow::Error),
}

impl Uploads {
    pub fn new(idle: Duration) -> Uploads {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            idle,
            commit_gate: Mutex::new(()),
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
        let idle = self.idle;
        map.retain(|_, s| {
            s.idle_for() < idle || s.committing.load(Ordering::SeqCst) || {
                log_end(s, "expired (idle)");
                false
            }
        });
        if map.values().filter(|s| s.owner == owner).count() >= MAX_SESSIONS_PER_TOKEN {
            return Err(OpenError::TooManyForToken);
        }
        if map.len() >= MAX_SESSIONS {
            return Err(OpenError::TooMany);
        }
        let reservation = store
            .reserve_snapshot(&lock, host, None)
            .map_err(OpenError::Other)?;
        let snapshot = reservation.id.clone();
        let id = random_id().map_err(OpenError::Other)?;
        let dir = store.root().join("tmp").join("uploads").join(&id);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating {}", dir.display()))
            .map_err(OpenError::Other)?;
        let s = Arc::new(Session {
            id: id.clone(),
            host: host.to_string(),
            snapshot,
            owner: owner.to_string(),
            last_used: Mutex::new(Instant::now()),
            indexes: Mutex::new(BTreeMap::new()),
            dir,
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

/// Why an index upload was refused.
pub enum IndexError {
    /// More than this many bytes (for the index, or the session's indexes together).
    TooLarge(u64, &'static str),
    Read(std::io::Error),
    Invalid(String),
    Store(anyhow::Error),
}

/// Read buffer of the index stream.
const STREAM_BUF: usize = 256 << 10;

impl Session {
    /// Stream disk `disk`'s index from `body` to the session's directory, hashing it and
    /// checking its header and length; at most `limit` bytes, and at most `session_limit`
    /// bytes with the session's other indexes. Replaces an earlier upload of the same disk.
    pub fn store_index(
        &self,
        disk: u32,
        body: &mut dyn Read,
        limit: u64,
        session_limit: u64,
    ) -> Result<String, IndexError> {
        let others = |m: &BTreeMap<u32, StoredIndex>| -> u64 {
            m.iter()
                .filter(|(k, _)| **k != disk)
                .map(|(_, i)| i.len)
                .sum()
        };
        let room = session_limit.saturating_sub(others(&self.lock_indexes()));
        let limit_here = limit.min(room);
        let part = self.dir.join(format!(
            "disk{disk}.{}.part",
            random_id().map_err(IndexError::Store)?
        ));
        let r = stream_index(&part, body, limit_here, disk).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            match e {
                IndexError::TooLarge(_, _) if limit_here < limit => {
                    IndexError::TooLarge(session_limit, "the indexes of one upload")
                }
                e => e,
            }
        })?;
        let mut m = self.lock_indexes();
        if others(&m) + r.len > session_limit {
            let _ = std::fs::remove_file(&part);
            return Err(IndexError::TooLarge(
                session_limit,
                "the indexes of one upload",
            ));
        }
        let path = self.dir.join(format!("disk{disk}.idx"));
        if let Err(e) = std::fs::rename(&part, &path) {
            let _ = std::fs::remove_file(&part);
            return Err(IndexError::Store(
                anyhow::Error::from(e).context(format!("renaming into {}", path.display())),
            ));
        }
        let sha = r.sha256.clone();
        m.insert(disk, StoredIndex { path, ..r });
        Ok(sha)
    }

    pub fn lock_indexes(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, StoredIndex>> {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn stream_index(
    part: &Path,
    body: &mut dyn Read,
    limit: u64,
    disk: u32,
) -> Result<StoredIndex, IndexError> {
    let store_err = |e: std::io::Error| {
        IndexError::Store(anyhow::Error::from(e).context(format!("writing {}", part.display())))
    };
    let mut f = File::create(part).map_err(store_err)?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; STREAM_BUF];
    let mut header = Vec::with_capacity(index::HEADER_LEN);
    let mut expected: Option<u64> = None;
    let mut disk_size = 0;
    let mut len = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(IndexError::Read(e)),
        };
        len += n as u64;
        if len > limit {
            return Err(IndexError::TooLarge(limit, "an index"));
        }
        let data = &buf[..n];
        if header.len() < index::HEADER_LEN {
            let take = (index::HEADER_LEN - header.len()).min(n);
            header.extend_from_slice(&data[..take]);
            if header.len() == index::HEADER_LEN {
                disk_size = check_header(&header, disk)?;
                expected = Some(index::file_len(disk_size));
            }
        }
        if let Some(want) = expected {
            if len > want {
                return Err(IndexError::Invalid(format!(
                    "disk{disk}.idx: longer than the {want} bytes its header describes"
                )));
            }
        }
        sha.update(data);
        f.write_all(data).map_err(store_err)?;
    }
    match expected {
        None => Err(IndexError::Invalid(format!(
            "disk{disk}.idx: truncated chunk index ({len} bytes)"
        ))),
        Some(want) if want != len => Err(IndexError::Invalid(format!(
            "disk{disk}.idx: chunk index body is {} bytes, expected {}",
            len - index::HEADER_LEN as u64,
            want - index::HEADER_LEN as u64
        ))),
        Some(_) => Ok(StoredIndex {
            path: part.to_path_buf(),
            sha256: hex::encode(sha.finalize()),
            disk_size,
            len,
        }),
    }
}

/// Check an index header the way `ChunkIndex::parse` does (an index with no slots parses on its
/// own); returns the disk size.
fn check_header(h: &[u8], disk: u32) -> Result<u64, IndexError> {
    let origin = format!("disk{disk}.idx");
    let invalid = |e: anyhow::Error| IndexError::Invalid(format!("{e:#}"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let (disk_size, count) = (u64_at(16), u64_at(32));
    // Parse the header as the index of an empty disk: same magic, version, sizes checks.
    let mut probe = h.to_vec();
    probe[16..24].copy_from_slice(&0u64.to_le_bytes());
    probe[32..40].copy_from_slice(&0u64.to_le_bytes());
    ChunkIndex::parse(&probe, &origin).map_err(invalid)?;
    if disk_size > index::MAX_DISK_SIZE {
        return Err(IndexError::Invalid(format!(
            "{origin}: a disk of {disk_size} bytes is larger than this build supports ({} bytes)",
            index::MAX_DISK_SIZE
        )));
    }
    if count != disk_size.div_ceil(CHUNK_SIZE) {
        return Err(IndexError::Invalid(format!(
            "{origin}: {count} slots do not cover a disk of {disk_size} bytes"
        )));
    }
    Ok(disk_size)
}

/// Read an uploaded index back, slot by slot (no second copy of its bytes in memory).
pub fn load_index(i: &StoredIndex, origin: &str) -> Result<ChunkIndex> {
    let f = File::open(&i.path).with_context(|| format!("opening {}", i.path.display()))?;
    let mut r = std::io::BufReader::with_capacity(STREAM_BUF, f);
    let mut header = [0u8; index::HEADER_LEN];
    r.read_exact(&mut header)
        .with_context(|| format!("reading {}", i.path.display()))?;
    let mut idx = ChunkIndex::new(i.disk_size);
    let mut d = [0u8; 32];
    for n in 0..idx.len() {
        r.read_exact(&mut d)
            .with_context(|| format!("{origin}: reading {}", i.path.display()))?;
        // The raw digest as stored (an all-zero one is an unused slot either way).
        idx.set(n, Slot::Data(Digest(d)));
    }
    Ok(idx)
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
