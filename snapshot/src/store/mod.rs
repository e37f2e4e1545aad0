//! Stores: a local directory and any HTTP server of such a directory. Readers need nothing but
//! "get the file at this path"; the snapshot-level logic (signature, index hashes, chunk digests)
//! sits on top in [`open_snapshot`], the same for both.

pub mod http;
pub mod local;

use crate::format::index::ChunkIndex;
use crate::format::{Digest, StoreInfo};
use crate::manifest::Manifest;
use crate::sign::PublicKey;
use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};
use std::io::Read;

pub use http::HttpStore;
pub use local::LocalStore;

/// What [`Store::read_with`] hands a file to: its bytes as a reader, and a size hint.
pub type Sink<'a> = dyn FnMut(&mut dyn Read, u64) -> std::io::Result<u64> + 'a;

/// Why a fetch failed. `NotFound` is an answer (the file is not there); `Other` is a fault.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: not found")]
    NotFound(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Read access to a store's files by relative path (`hosts/web1/latest`, `chunks/ab12/...`).
pub trait Store: Send + Sync {
    /// The file at `path` streamed to `sink`, which reads it to its end and returns how many
    /// bytes it read; it is given a size hint (the declared length, at most `max`, or 0). The
    /// file is refused (never cut short) when it is larger than `max` bytes: the sink sees at
    /// most `max + 1`. A transfer that fails midway may be made again: `sink` is then called
    /// again, from the start of the file.
    fn read_with(&self, path: &str, max: u64, sink: &mut Sink<'_>) -> Result<(), FetchError>;
    /// The file at `path` into `buf` (emptied first; its allocation is reused), refused (never
    /// cut short) when it is larger than `max` bytes.
    fn read_into(&self, path: &str, max: u64, buf: &mut Vec<u8>) -> Result<(), FetchError> {
        self.read_with(path, max, &mut |r, hint| {
            buf.clear();
            buf.reserve(hint as usize);
            r.read_to_end(buf).map(|n| n as u64)
        })
    }
    /// The file at `path`, refused (never cut short) when it is larger than `max` bytes.
    fn get_max(&self, path: &str, max: u64) -> Result<Vec<u8>, FetchError> {
        let mut buf = Vec::new();
        self.read_into(path, max, &mut buf)?;
        Ok(buf)
    }
    /// The file at `path`, at most as large as a file of its kind may be ([`max_len`]).
    fn get(&self, path: &str) -> Result<Vec<u8>, FetchError> {
        self.get_max(path, max_len(path))
    }
    /// Where this store is, for messages.
    fn location(&self) -> String;
    /// The committed snapshots of `host`, if this store can list them (a directory, `appliance
    /// serve`); `None` when it cannot (a static HTTP server).
    fn list_snapshots(&self, _host: &str) -> Result<Option<Vec<Listed>>, FetchError> {
        Ok(None)
    }
}

/// One snapshot of a listing, with its order (sequence, created) when the listing gives it. The
/// listing is not signed: it only says which manifests to look at.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub order: Option<(u64, String)>,
}

/// How the snapshot `latest` named was checked to be the newest. `latest` is a plain file, not
/// signed: the signature covers each manifest, with its sequence number and creation time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatestCheck {
    /// The snapshot was named explicitly: no question of `latest`.
    Named,
    /// No public key: nothing about the snapshot is verified, `latest` included.
    Unverified,
    /// `latest` names the newest of the `listed` snapshots the store lists (their manifests
    /// signed): a rollback would need a server that also hides the newer snapshots.
    Newest { listed: usize },
    /// The store cannot list its snapshots: that `latest` names the newest is not verified.
    Unlisted,
}

impl LatestCheck {
    /// What a restorer prints after "signature verified" (empty when there is nothing to say).
    pub fn describe(&self) -> String {
        match self {
            LatestCheck::Named | LatestCheck::Unverified => String::new(),
            LatestCheck::Newest { listed } => {
                format!("`latest` checked: the newest of {listed} signed snapshots the store lists")
            }
            LatestCheck::Unlisted => "`latest` NOT verified: it is not signed and this store \
                cannot list snapshots, so an older snapshot could be served as the newest; \
                name the snapshot (--snapshot ID) to be sure"
                .to_string(),
        }
    }
}

/// Largest small file of a store: `store.json`, `latest`, a manifest or its signature, a round.
pub const SMALL_FILE_MAX: u64 = 16 << 20;

/// The most bytes a file at `path` may hold, by kind: a chunk blob its largest encoding, an index
/// the index of the largest supported disk (readers that know the disk ask for its exact length
/// with [`Store::get_max`]), anything else [`SMALL_FILE_MAX`]. One cap for every kind cut a 1 TiB
/// disk's index short (issue 8).
pub fn max_len(path: &str) -> u64 {
    if path.starts_with("chunks/") {
        crate::format::blob::MAX_BLOB_LEN
    } else if path.ends_with(".idx") {
        crate::format::index::file_len(crate::format::index::MAX_DISK_SIZE)
    } else {
        SMALL_FILE_MAX
    }
}

/// Open a store by location: `http://` / `https://` URLs or a local directory path.
pub fn open(location: &str, opts: &http::Options) -> Result<Box<dyn Store>> {
    let store: Box<dyn Store> =
        if location.starts_with("http://") || location.starts_with("https://") {
            Box::new(HttpStore::new(location, opts.clone())?)
        } else {
            Box::new(LocalStore::open(std::path::Path::new(location))?)
        };
    let info = store.get("store.json").map_err(|e| match e {
        FetchError::NotFound(_) => {
            anyhow::anyhow!("{}: no store.json, not a snapshot store", store.location())
        }
        FetchError::Other(e) => e,
    })?;
    StoreInfo::parse(&info, &store.location())?;
    Ok(store)
}

/// A snapshot whose manifest and indexes have been read and checked along the trust chain.
pub struct Snapshot {
    pub manifest: Manifest,
    pub indexes: Vec<ChunkIndex>,
    /// How far the choice of the snapshot by `latest` was verified.
    pub latest: LatestCheck,
}

/// Resolve `snapshot` (an id, or `latest`/`None`) of `host` to an id.
pub fn resolve_id(store: &dyn Store, host: &str, snapshot: Option<&str>) -> Result<String> {
    check_name(host, "host")?;
    match snapshot {
        Some(id) if id != "latest" => {
            check_name(id, "snapshot")?;
            Ok(id.to_string())
        }
        _ => {
            let path = format!("hosts/{host}/latest");
            let text = store.get(&path).map_err(|e| match e {
                FetchError::NotFound(_) => {
                    anyhow::anyhow!("host {host:?} has no snapshot in {}", store.location())
                }
                FetchError::Other(e) => e,
            })?;
            let id = String::from_utf8_lossy(&text).trim().to_string();
            check_name(&id, "snapshot").with_context(|| format!("{}/{path}", store.location()))?;
            Ok(id)
        }
    }
}

/// Read a snapshot: manifest (signature checked when `key` is given), then every index, each
/// checked against the SHA-256 the manifest records. Given `latest` and a key, `latest` is also
/// checked to name the newest signed snapshot the store lists ([`LatestCheck`]).
pub fn open_snapshot(
    store: &dyn Store,
    host: &str,
    snapshot: Option<&str>,
    key: Option<&PublicKey>,
) -> Result<Snapshot> {
    let id = resolve_id(store, host, snapshot)?;
    let by_latest = snapshot.is_none_or(|s| s == "latest");
    let manifest = read_manifest(store, host, &id, key)?;
    let dir = format!("hosts/{host}/snapshots/{id}");
    let latest = match (by_latest, key) {
        (false, _) => LatestCheck::Named,
        (true, None) => LatestCheck::Unverified,
        (true, Some(key)) => check_latest(store, host, &manifest, key)?,
    };
    let mut indexes = Vec::new();
    for disk in &manifest.disks {
        let (idx, _) = read_index(
            store,
            &dir,
            &disk.index_name(),
            disk.size,
            &disk.index_sha256,
            "the manifest",
        )?;
        indexes.push(idx);
    }
    Ok(Snapshot {
        manifest,
        indexes,
        latest,
    })
}

/// `latest` is not signed: with a key, make sure it names the newest snapshot the store lists.
/// Each listed snapshot that the (unsigned) listing does not show as older has its manifest
/// fetched and its signature checked; a signed manifest newer than the one `latest` names means
/// `latest` was rolled back (or is stale), and the restore is refused with both ids named.
fn check_latest(
    store: &dyn Store,
    host: &str,
    current: &Manifest,
    key: &PublicKey,
) -> Result<LatestCheck> {
    let listed = match store.list_snapshots(host) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(LatestCheck::Unlisted),
        Err(FetchError::NotFound(_)) => return Ok(LatestCheck::Unlisted),
        Err(FetchError::Other(e)) => {
            return Err(e.context(format!("listing the snapshots of {host} to check `latest`")))
        }
    };
    let (cur_seq, cur_created) = current.order();
    let mut newest: Option<Manifest> = None;
    for l in &listed {
        if l.id == current.snapshot || check_name(&l.id, "snapshot").is_err() {
            continue;
        }
        if let Some((seq, created)) = &l.order {
            if (*seq, created.as_str()) <= (cur_seq, cur_created) {
                continue;
            }
        }
        // A manifest that does not verify proves nothing either way: skipped.
        let Ok(m) = read_manifest(store, host, &l.id, Some(key)) else {
            continue;
        };
        if m.order() > current.order() && newest.as_ref().is_none_or(|n| m.order() > n.order()) {
            newest = Some(m);
        }
    }
    if let Some(n) = newest {
        bail!(
            "{}/hosts/{host}/latest names snapshot {} (sequence {}, created {}), but snapshot {} \
             (sequence {}, created {}) is newer and signed: `latest` was rolled back or is stale; \
             name the snapshot to restore with --snapshot",
            store.location(),
            current.snapshot,
            cur_seq,
            cur_created,
            n.snapshot,
            n.order().0,
            n.created
        );
    }
    Ok(LatestCheck::Newest {
        listed: listed.len(),
    })
}

/// Read the signed document `dir/name` (a manifest, a round), its signature `dir/sig` checked
/// when `key` is given; `missing` is the error for an absent document. The one trust-chain read:
/// snapshots and failback rounds both start here.
pub fn read_signed(
    store: &dyn Store,
    dir: &str,
    name: &str,
    sig: &str,
    key: Option<&PublicKey>,
    missing: impl FnOnce() -> anyhow::Error,
) -> Result<Vec<u8>> {
    let origin = format!("{}/{dir}/{name}", store.location());
    let bytes = store.get(&format!("{dir}/{name}")).map_err(|e| match e {
        FetchError::NotFound(_) => missing(),
        FetchError::Other(e) => e,
    })?;
    if let Some(key) = key {
        let signature = store.get(&format!("{dir}/{sig}")).map_err(|e| match e {
            FetchError::NotFound(_) => {
                anyhow::anyhow!("{origin}: no signature ({sig} missing)")
            }
            FetchError::Other(e) => e,
        })?;
        key.verify(&bytes, &signature, &origin)?;
    }
    Ok(bytes)
}

/// Read the index `dir/name` of a disk of `size` bytes (never more than such an index holds) and
/// check it against the SHA-256 and the size that `doc`, the signed document naming it, records.
/// Returns the index and its length in bytes.
pub fn read_index(
    store: &dyn Store,
    dir: &str,
    name: &str,
    size: u64,
    sha256: &str,
    doc: &str,
) -> Result<(ChunkIndex, u64)> {
    let origin = format!("{}/{dir}/{name}", store.location());
    if size > crate::format::index::MAX_DISK_SIZE {
        bail!(
            "{origin}: a disk of {size} bytes is larger than this build supports ({} bytes)",
            crate::format::index::MAX_DISK_SIZE
        );
    }
    let len = crate::format::index::file_len(size);
    let bytes = store
        .get_max(&format!("{dir}/{name}"), len)
        .map_err(|e| match e {
            FetchError::NotFound(_) => anyhow::anyhow!("{origin}: index missing"),
            FetchError::Other(e) => e,
        })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != sha256 {
        bail!("{origin}: index hashes to {actual}, {doc} says {sha256} (corrupt or tampered)");
    }
    let idx = ChunkIndex::parse(&bytes, &origin)?;
    if idx.disk_size != size {
        bail!(
            "{origin}: index covers {} bytes, {doc} says {size}",
            idx.disk_size
        );
    }
    Ok((idx, bytes.len() as u64))
}

/// Read the manifest of `host`/`id`, its signature checked when `key` is given.
fn read_manifest(
    store: &dyn Store,
    host: &str,
    id: &str,
    key: Option<&PublicKey>,
) -> Result<Manifest> {
    let dir = format!("hosts/{host}/snapshots/{id}");
    let origin = format!("{}/{dir}/manifest.json", store.location());
    let bytes = read_signed(store, &dir, "manifest.json", "manifest.sig", key, || {
        anyhow::anyhow!(
            "snapshot {id} of host {host:?} not found in {}",
            store.location()
        )
    })?;
    let manifest = Manifest::parse(&bytes, &origin)?;
    if manifest.host != host || manifest.snapshot != id {
        bail!(
            "{origin}: manifest names {}/{}, not {host}/{id}",
            manifest.host,
            manifest.snapshot
        );
    }
    Ok(manifest)
}

/// Fetch a chunk and return its verified bytes and the size of its blob (the bytes that crossed
/// the network). The one chunk fetch: restore, failback, verify and the readers use it.
pub fn fetch_chunk(store: &dyn Store, digest: &Digest) -> Result<(Vec<u8>, u64)> {
    let mut buf = Vec::new();
    let blob = get_chunk(store, digest, &mut buf)?;
    Ok((crate::decode_chunk(blob, digest)?, blob.len() as u64))
}

/// A chunk fetched by [`fetch_chunk_into`]: its length, its blob's, and the time spent waiting
/// for the blob (the rest of the call decoded and verified it).
pub struct Fetched {
    pub len: usize,
    pub blob_len: u64,
    pub waited: std::time::Duration,
}

/// [`fetch_chunk`] into the caller's buffers: the verified chunk into `out` (which must hold
/// [`crate::CHUNK_SIZE`] bytes), with `blob` as scratch. The blob is read as it arrives: its
/// header first, then a raw payload straight into `out` (no copy) or a zstd payload into `blob`
/// (kept at its full size, so it is not zeroed again for every chunk) to be decoded into `out`.
pub fn fetch_chunk_into(
    store: &dyn Store,
    digest: &Digest,
    blob: &mut Vec<u8>,
    out: &mut [u8],
) -> Result<Fetched> {
    use crate::format::blob::{is_raw, HEADER_LEN, MAX_BLOB_LEN};
    let started = std::time::Instant::now();
    let path = digest.chunk_path();
    if blob.len() <= MAX_BLOB_LEN as usize {
        // Once per buffer: room for the largest blob and one byte more (to see a longer one),
        // on huge pages where the kernel has them.
        *blob = vec![0; MAX_BLOB_LEN as usize + 1 + crate::sys::HUGE_PAGE];
        crate::sys::advise_huge_pages(blob);
    }
    let mut raw = false;
    let mut total = 0u64;
    store
        .read_with(&path, max_len(&path), &mut |r, _| {
            let head = read_full(r, &mut blob[..HEADER_LEN])?;
            raw = head == HEADER_LEN && is_raw(&blob[..HEADER_LEN]);
            let payload = if raw {
                // Whatever a raw payload holds beyond `out` is counted (and refused below).
                read_full(r, out)? + read_full(r, &mut blob[HEADER_LEN..])?
            } else {
                read_full(r, &mut blob[HEADER_LEN..])?
            };
            total = (head + payload) as u64;
            Ok(total)
        })
        .map_err(|e| chunk_fetch_error(store, digest, e))?;
    let waited = started.elapsed();
    let len = crate::threads::on_a_core(|| {
        if raw {
            crate::format::blob::check_raw_into(&blob[..HEADER_LEN], total, out, digest)
        } else {
            crate::decode_chunk_into(&blob[..total as usize], digest, out)
        }
    })?;
    Ok(Fetched {
        len,
        blob_len: total,
        waited,
    })
}

/// Read into `buf` until it is full or the reader ends; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn chunk_fetch_error(store: &dyn Store, digest: &Digest, e: FetchError) -> anyhow::Error {
    match e {
        FetchError::NotFound(_) => {
            anyhow::anyhow!("chunk {digest} missing from {}", store.location())
        }
        FetchError::Other(e) => e,
    }
}

fn get_chunk<'b>(store: &dyn Store, digest: &Digest, buf: &'b mut Vec<u8>) -> Result<&'b [u8]> {
    let path = digest.chunk_path();
    store
        .read_into(&path, max_len(&path), buf)
        .map_err(|e| chunk_fetch_error(store, digest, e))?;
    Ok(buf)
}

/// Words a snapshot may not be named: readers give them a meaning (`--snapshot latest`).
pub const RESERVED_IDS: &[&str] = &["latest"];

/// A snapshot id a writer may use: a safe name ([`check_name`]) that starts with a letter or digit
/// (not an option-like `-x`) and is not reserved ([`RESERVED_IDS`], in any letter case).
pub fn check_snapshot_id(id: &str) -> Result<()> {
    check_name(id, "snapshot")?;
    if RESERVED_IDS.iter().any(|r| r.eq_ignore_ascii_case(id)) {
        bail!("snapshot name {id:?} is reserved (it names the newest snapshot when reading)");
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        bail!("invalid snapshot name {id:?} (must start with a letter or digit)");
    }
    Ok(())
}

/// Host names and snapshot ids become path components: keep them to a safe alphabet.
pub fn check_name(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("invalid {what} name {name:?} (letters, digits and -_. only)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::blob::HEADER_LEN;
    use crate::CHUNK_SIZE;

    /// A store whose chunk files are whatever the test writes, with one pair of worker buffers
    /// reused across fetches, as the restorer reuses them.
    struct Fixture {
        _dir: tempfile::TempDir,
        store: LocalStore,
        blob: Vec<u8>,
        out: Vec<u8>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = LocalStore::init(dir.path()).unwrap();
            Fixture {
                _dir: dir,
                store,
                blob: Vec::new(),
                out: vec![0; CHUNK_SIZE as usize],
            }
        }

        fn put(&self, d: &Digest, blob: &[u8]) {
            let f = self.store.chunk_file(d);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, blob).unwrap();
        }

        fn fetch(&mut self, d: &Digest) -> Result<Vec<u8>> {
            let f = fetch_chunk_into(&self.store, d, &mut self.blob, &mut self.out)?;
            assert_eq!(
                f.blob_len,
                std::fs::metadata(self.store.chunk_file(d))?.len()
            );
            Ok(self.out[..f.len].to_vec())
        }
    }

    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        getrandom::getrandom(&mut v).unwrap();
        v
    }

    #[test]
    fn raw_and_zstd_chunks_arrive_whole_through_reused_buffers() {
        let mut fx = Fixture::new();
        let raw = random(CHUNK_SIZE as usize);
        let text = b"a line of text, and again ".repeat(5000);
        let short_raw = random(10_000);
        for data in [&raw[..], &text[..], &short_raw[..], &text[..100]] {
            let d = Digest::of(data);
            let blob = crate::encode_chunk(data, 3);
            fx.put(&d, &blob);
            assert_eq!(fx.fetch(&d).unwrap(), data);
        }
        assert!(crate::format::blob::is_raw(&crate::encode_chunk(&raw, 3)));
    }

    #[test]
    fn damaged_raw_blobs_are_refused_with_the_reason() {
        let mut fx = Fixture::new();
        let data = random(100_000);
        let d = Digest::of(&data);
        let good = crate::encode_chunk(&data, 3);
        let err = |fx: &mut Fixture, blob: &[u8]| {
            fx.put(&d, blob);
            format!("{:#}", fx.fetch(&d).unwrap_err())
        };
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 500] ^= 1;
        assert!(err(&mut fx, &flipped).contains("corrupt"));
        let cut = &good[..good.len() - 1];
        assert!(err(&mut fx, cut).contains("differs from header"));
        let mut long = good.clone();
        long.extend_from_slice(&[0; 7]);
        assert!(err(&mut fx, &long).contains("differs from header"));
        assert!(err(&mut fx, &good[..10]).contains("truncated"));
        // A raw payload longer than any chunk: counted beyond the chunk buffer, then refused.
        let mut huge = good[..HEADER_LEN].to_vec();
        huge.extend_from_slice(&random(CHUNK_SIZE as usize + 100));
        assert!(err(&mut fx, &huge).contains("differs from header"));
        // And the buffers still serve a good chunk afterwards.
        fx.put(&d, &good);
        assert_eq!(fx.fetch(&d).unwrap(), data);
    }
}
