//! A store in a local directory: the reader side, and the writer side used by ingest, uploads
//! and gc. The crash-safety and locking rules are in the crate's design note.

use super::{check_name, check_snapshot_id, FetchError, Store};
use crate::format::index::ChunkIndex;
use crate::format::{Digest, StoreInfo};
use crate::manifest::Manifest;
use crate::sign::{Key, PublicKey};
use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

/// Held by every writer for its whole life; `gc` waits for none of them to be left.
pub struct WriterGuard(#[allow(dead_code)] File);

/// A snapshot id held by one writer (an ingest, an upload session) from its start to its commit,
/// so that writers of one host never pick the same id (issue 8: five of six parallel ingests
/// failed at their commit). It is an exclusive `flock` on `tmp/reserved/<host>/<id>`: a writer
/// that dies releases it with its descriptors. Taken only by holders of the writer lock, so `gc`
/// (which clears `tmp/`) never runs while one is held.
pub struct Reservation {
    pub host: String,
    pub id: String,
    path: PathBuf,
    _lock: File,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({}/{})", self.host, self.id)
    }
}

/// What trying one id found.
enum Claim {
    Got(Reservation),
    Committed,
    Busy,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// Create a new store with its signing key. Refuses a directory that already holds a store.
    pub fn init(dir: &Path) -> Result<(LocalStore, PublicKey)> {
        if dir.join("store.json").exists() {
            bail!("{}: a store already exists here", dir.display());
        }
        for sub in ["", "chunks", "hosts", "tmp", "private"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let key = Key::generate()?;
        let key_path = dir.join("private/signing.key");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("creating {}", key_path.display()))?;
        writeln!(f, "{}", key.to_hex())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", key_path.display()))?;
        let store = LocalStore {
            root: dir.to_owned(),
        };
        store.write_atomic(
            Path::new("pubkey"),
            format!("{}\n", key.public().to_hex()).as_bytes(),
        )?;
        let info = serde_json::to_vec_pretty(&StoreInfo::new()).expect("serialises");
        store.write_atomic(Path::new("store.json"), &info)?;
        Ok((store, key.public()))
    }

    pub fn open(dir: &Path) -> Result<LocalStore> {
        let p = dir.join("store.json");
        let bytes = fs::read(&p).with_context(|| {
            format!(
                "{}: not a snapshot store (reading store.json)",
                dir.display()
            )
        })?;
        StoreInfo::parse(&bytes, &dir.display().to_string())?;
        // Opening writes nothing: a read-only store (on a boot stick, a snapshot) must open.
        Ok(LocalStore {
            root: dir.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn signing_key(&self) -> Result<Key> {
        Key::load(&self.root.join("private/signing.key"))
    }

    pub fn public_key(&self) -> Result<PublicKey> {
        PublicKey::load(&self.root.join("pubkey"))
    }

    pub fn chunk_file(&self, d: &Digest) -> PathBuf {
        self.root.join(d.chunk_path())
    }

    pub fn has_chunk(&self, d: &Digest) -> bool {
        self.chunk_file(d).exists()
    }

    /// The cheap check of a stored chunk (size and header, [`crate::format::blob::check_header`]):
    /// what the upload API's `missing` and commit rely on, where the bytes are not at hand.
    pub fn chunk_held(&self, d: &Digest) -> crate::chunker::Held {
        use crate::chunker::Held;
        use std::os::unix::fs::FileExt;
        let path = self.chunk_file(d);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Held::Absent,
            Err(e) => return Held::Damaged(format!("chunk {d}: unreadable: {e}")),
        };
        let total = match f.metadata() {
            Ok(m) => m.len(),
            Err(e) => return Held::Damaged(format!("chunk {d}: unreadable: {e}")),
        };
        let mut start = [0u8; crate::format::blob::PROBE_LEN];
        let n = (total as usize).min(start.len());
        if let Err(e) = f.read_exact_at(&mut start[..n], 0) {
            return Held::Damaged(format!("chunk {d}: unreadable: {e}"));
        }
        match crate::format::blob::check_header(&start[..n], total, d) {
            Ok(_) => Held::Intact(total),
            Err(e) => Held::Damaged(e.to_string()),
        }
    }

    /// Rewrite a damaged chunk: the new blob replaces the file atomically (temp name, fsync,
    /// rename), so a reader sees the old file or the new one, never a mix. The caller has
    /// checked that `blob` decodes to `d`.
    pub fn replace_chunk(&self, d: &Digest, blob: &[u8]) -> Result<()> {
        let dest = self.chunk_file(d);
        let dir = dest.parent().expect("chunk path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = self.tmp_path(&format!("chunk-{}", d.hex()));
        write_synced(&tmp, blob)?;
        fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        sync_dir(dir)
    }

    /// Move a damaged chunk out of `chunks/` into `private/quarantine/` (kept for inspection,
    /// never served): from then on it is missing, so the next ingest or upload of it stores it
    /// again.
    pub fn quarantine_chunk(&self, d: &Digest) -> Result<PathBuf> {
        let dir = self.root.join("private").join("quarantine");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dest = dir.join(d.hex());
        let src = self.chunk_file(d);
        fs::rename(&src, &dest)
            .with_context(|| format!("moving {} to {}", src.display(), dest.display()))?;
        Ok(dest)
    }

    /// Take the writer lock (shared); `gc` cannot run while it is held.
    pub fn writer(&self) -> Result<WriterGuard> {
        let f = self.lock_file("gc.lock")?;
        crate::sys::flock(&f, false, true).context("locking the store for writing")?;
        Ok(WriterGuard(f))
    }

    /// The writer lock without waiting: `None` while `gc` runs (for callers that must not wait,
    /// like an HTTP request).
    pub fn try_writer(&self) -> Result<Option<WriterGuard>> {
        let f = self.lock_file("gc.lock")?;
        let got = crate::sys::flock(&f, false, false).context("locking the store for writing")?;
        Ok(got.then_some(WriterGuard(f)))
    }

    /// Reserve a snapshot id of `host` for a writer that holds the writer lock (`_writer`):
    /// `wanted`, or else the UTC time (`20261123T051900Z`, sortable) with `-1`, `-2`... when a
    /// committed snapshot or a live writer has it. The id stays reserved until the reservation
    /// is dropped or committed ([`LocalStore::commit_reserved`]).
    pub fn reserve_snapshot(
        &self,
        _writer: &WriterGuard,
        host: &str,
        wanted: Option<&str>,
    ) -> Result<Reservation> {
        check_name(host, "host")?;
        let dir = self.root.join("tmp").join("reserved").join(host);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(id) = wanted {
            check_snapshot_id(id)?;
            return match self.try_reserve(&dir, host, id)? {
                Claim::Got(r) => Ok(r),
                Claim::Committed => bail!("snapshot {host}/{id} already exists"),
                Claim::Busy => bail!(
                    "snapshot {host}/{id} is being written by another ingest or upload right now"
                ),
            };
        }
        let base = time_id(std::time::SystemTime::now());
        for n in 0..100_000u32 {
            let id = if n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if let Claim::Got(r) = self.try_reserve(&dir, host, &id)? {
                return Ok(r);
            }
        }
        bail!("no free snapshot id for {host} at {base}")
    }

    fn try_reserve(&self, dir: &Path, host: &str, id: &str) -> Result<Claim> {
        let dest = self.snapshot_dir(host, id);
        if dest.exists() {
            return Ok(Claim::Committed);
        }
        let path = dir.join(id);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !crate::sys::flock(&f, true, false)
            .with_context(|| format!("locking {}", path.display()))?
        {
            return Ok(Claim::Busy);
        }
        // Again under the lock: the writer that held it may have committed and let go since.
        if dest.exists() {
            return Ok(Claim::Committed);
        }
        Ok(Claim::Got(Reservation {
            host: host.to_string(),
            id: id.to_string(),
            path,
            _lock: f,
        }))
    }

    fn snapshot_dir(&self, host: &str, id: &str) -> PathBuf {
        self.root
            .join("hosts")
            .join(host)
            .join("snapshots")
            .join(id)
    }

    /// Take the gc lock (exclusive) without waiting; `None` while a writer is active.
    pub fn try_gc_lock(&self) -> Result<Option<WriterGuard>> {
        let f = self.lock_file("gc.lock")?;
        Ok(crate::sys::flock(&f, true, false)
            .context("locking the store for gc")?
            .then_some(WriterGuard(f)))
    }

    fn lock_file(&self, name: &str) -> Result<File> {
        // Every writer takes a lock first: the place to create what writers need.
        for sub in ["chunks", "hosts", "tmp", "private"] {
            let d = self.root.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let p = self.root.join("private").join(name);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }

    /// Store a chunk blob unless the store has it. Returns whether it was new. The caller has
    /// checked that `blob` decodes to `d`.
    pub fn insert_chunk(&self, d: &Digest, blob: &[u8]) -> Result<bool> {
        let dest = self.chunk_file(d);
        if dest.exists() {
            return Ok(false);
        }
        let dir = dest.parent().expect("chunk path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = self.tmp_path(&format!("chunk-{}", d.hex()));
        write_synced(&tmp, blob)?;
        fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        Ok(true)
    }

    fn tmp_path(&self, stem: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{stem}.{}.{n}", std::process::id()))
    }

    /// Write a file at `rel` atomically (temp name, fsync, rename).
    fn write_atomic(&self, rel: &Path, data: &[u8]) -> Result<()> {
        let dest = self.root.join(rel);
        let tmp = self.tmp_path("file");
        write_synced(&tmp, data)?;
        fs::rename(&tmp, &dest).with_context(|| format!("renaming into {}", dest.display()))?;
        sync_dir(dest.parent().unwrap_or(&self.root))
    }

    /// Publish a snapshot under the id `manifest.snapshot`, reserving it first (for writers
    /// that chose their id up front; ingest and uploads reserve at their start instead).
    pub fn commit_snapshot(&self, manifest: &Manifest, indexes: &[ChunkIndex]) -> Result<()> {
        let writer = self.writer()?;
        let r = self.reserve_snapshot(&writer, &manifest.host, Some(&manifest.snapshot))?;
        self.commit_reserved(&r, manifest, indexes)
    }

    /// Publish a snapshot under the id `r` holds: everything it references must already be
    /// stored. The snapshot directory appears whole or not at all. The rename and `latest` happen
    /// under the host's lock, so `latest` names the snapshot committed last, whatever the ids.
    pub fn commit_reserved(
        &self,
        r: &Reservation,
        manifest: &Manifest,
        indexes: &[ChunkIndex],
    ) -> Result<()> {
        if manifest.host != r.host || manifest.snapshot != r.id {
            bail!(
                "manifest names {}/{}, the reservation {}/{}",
                manifest.host,
                manifest.snapshot,
                r.host,
                r.id
            );
        }
        check_name(&manifest.host, "host")?;
        check_snapshot_id(&manifest.snapshot)?;
        let key = self.signing_key()?;
        let snaps = self
            .root
            .join("hosts")
            .join(&manifest.host)
            .join("snapshots");
        fs::create_dir_all(&snaps).with_context(|| format!("creating {}", snaps.display()))?;
        let dest = snaps.join(&manifest.snapshot);
        let tmp = self.tmp_path(&format!("snap-{}", manifest.host));
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for (disk, idx) in manifest.disks.iter().zip(indexes) {
            write_synced(&tmp.join(disk.index_name()), &idx.to_bytes())?;
        }
        // Chunks were fsynced one by one; their directory entries are made durable here, before
        // anything refers to them.
        syncfs(&self.root)?;
        let lock = self.lock_file(&format!("host-{}.lock", manifest.host))?;
        crate::sys::flock(&lock, true, true).context("locking the host for the commit")?;
        let mut manifest = manifest.clone();
        manifest.sequence = Some(self.next_sequence(&manifest.host)?);
        let bytes = manifest.to_bytes();
        write_synced(&tmp.join("manifest.json"), &bytes)?;
        write_synced(&tmp.join("manifest.sig"), key.sign(&bytes).as_bytes())?;
        sync_dir(&tmp)?;
        if dest.exists() {
            bail!(
                "snapshot {}/{} already exists",
                manifest.host,
                manifest.snapshot
            );
        }
        fs::rename(&tmp, &dest).with_context(|| format!("publishing {}", dest.display()))?;
        sync_dir(&snaps)?;
        let rel = PathBuf::from(format!("hosts/{}/latest", manifest.host));
        self.write_atomic(&rel, format!("{}\n", manifest.snapshot).as_bytes())?;
        // The id is taken by the directory now: a writer that opens the reservation file after
        // this finds the snapshot committed, so the file may go.
        let _ = fs::remove_file(&r.path);
        Ok(())
    }

    /// The sequence number of the next commit of `host` (the caller holds the host lock): one
    /// more than any the host's manifests carry or `private/host-<host>.seq` remembers (so a
    /// number is not given twice even when snapshots are deleted). Written before it is used.
    fn next_sequence(&self, host: &str) -> Result<u64> {
        let mut top = 0;
        let counter = PathBuf::from(format!("private/host-{host}.seq"));
        if let Ok(t) = fs::read_to_string(self.root.join(&counter)) {
            top = t.trim().parse().unwrap_or(0);
        }
        for id in self.snapshots(host)? {
            let p = self.snapshot_dir(host, &id).join("manifest.json");
            if let Some(s) = fs::read(&p)
                .ok()
                .and_then(|b| Manifest::parse(&b, &p.display().to_string()).ok())
                .and_then(|m| m.sequence)
            {
                top = top.max(s);
            }
        }
        let next = top + 1;
        self.write_atomic(&counter, format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    pub fn hosts(&self) -> Result<Vec<String>> {
        list_dir(&self.root.join("hosts"))
    }

    /// Complete snapshots of `host`, oldest first.
    pub fn snapshots(&self, host: &str) -> Result<Vec<String>> {
        check_name(host, "host")?;
        let dir = self.root.join("hosts").join(host).join("snapshots");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut v: Vec<String> = list_dir(&dir)?
            .into_iter()
            .filter(|id| dir.join(id).join("manifest.json").exists())
            .collect();
        v.sort();
        Ok(v)
    }

    /// Every chunk file of the store, as (digest, path). Stray names are skipped.
    pub fn chunk_files(&self) -> Result<Vec<(Digest, PathBuf)>> {
        let mut out = Vec::new();
        for sub in list_dir(&self.root.join("chunks"))? {
            let dir = self.root.join("chunks").join(&sub);
            for name in list_dir(&dir)? {
                if let Some(d) = Digest::parse(&name) {
                    out.push((d, dir.join(name)));
                }
            }
        }
        Ok(out)
    }
}

impl Store for LocalStore {
    fn read_with(
        &self,
        path: &str,
        max: u64,
        sink: &mut super::Sink<'_>,
    ) -> Result<(), FetchError> {
        let public = !path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
            && !path.starts_with("private/")
            && !path.starts_with("tmp/");
        if !public {
            return Err(FetchError::NotFound(path.to_string()));
        }
        let p = self.root.join(path);
        match read_max(&p, max, sink) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(FetchError::NotFound(p.display().to_string()))
            }
            Err(e) => Err(FetchError::Other(
                anyhow::Error::new(e).context(format!("reading {}", p.display())),
            )),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn list_snapshots(&self, host: &str) -> Result<Option<Vec<super::Listed>>, FetchError> {
        let ids = self.snapshots(host).map_err(FetchError::Other)?;
        Ok(Some(
            ids.into_iter()
                .map(|id| super::Listed { id, order: None })
                .collect(),
        ))
    }
}

/// Snapshot id of a time: `20261123T051900Z` (UTC, sorts by time).
pub fn time_id(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// Names in `dir` (none when it does not exist), sorted, dot files skipped.
fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        r => r.with_context(|| format!("listing {}", dir.display()))?,
    };
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(name) = e.file_name().to_str() {
            if !name.starts_with('.') {
                v.push(name.to_string());
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Read a whole file, refusing one larger than `max` bytes (as an `InvalidData` error).
fn read_max(path: &Path, max: u64, sink: &mut super::Sink<'_>) -> std::io::Result<()> {
    use std::io::Read;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {max} a file of this kind may hold"),
        ));
    }
    let n = sink(&mut f.take(max.saturating_add(1)), len)?;
    if n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("grew past the {max} bytes a file of this kind may hold"),
        ));
    }
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn syncfs(dir: &Path) -> Result<()> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    crate::sys::syncfs(&f).with_context(|| format!("syncing the filesystem of {}", dir.display()))
}
