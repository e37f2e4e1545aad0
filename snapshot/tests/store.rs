//! The local store end to end without filesystems: chunk a synthetic disk, commit, read back,
//! and check the trust chain refuses tampering.

use snapshot::chunker::{chunk_disk, ChunkOptions};
use snapshot::manifest::{Disk, DiskTotals, Firmware, Hardware, Manifest, MANIFEST_VERSION};
use snapshot::ptable::PartitionTable;
use snapshot::store::{open_snapshot, LocalStore, Store};
use snapshot::{Extents, Slot, CHUNK_SIZE};
use std::os::unix::fs::FileExt;

const MB: u64 = 1 << 20;

fn disk_image() -> Vec<u8> {
    // 5.5 chunks: random, text, zeros, a duplicate of chunk 0, a "free" chunk full of garbage, tail.
    let size = 5 * CHUNK_SIZE + CHUNK_SIZE / 2;
    let mut d = vec![0u8; size as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in d[..CHUNK_SIZE as usize].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let text = b"the quick brown fox jumps over the lazy dog\n".repeat(100_000);
    d[CHUNK_SIZE as usize..2 * CHUNK_SIZE as usize].copy_from_slice(&text[..CHUNK_SIZE as usize]);
    let (a, b) = d.split_at_mut(3 * CHUNK_SIZE as usize);
    b[..CHUNK_SIZE as usize].copy_from_slice(&a[..CHUNK_SIZE as usize]);
    d[4 * CHUNK_SIZE as usize..5 * CHUNK_SIZE as usize].fill(0xee);
    d[5 * CHUNK_SIZE as usize..].fill(0x11);
    d
}

fn manifest(host: &str, id: &str, size: u64, index_sha256: String) -> Manifest {
    Manifest {
        version: MANIFEST_VERSION,
        host: host.into(),
        snapshot: id.into(),
        created: "2026-11-23T00:00:00Z".into(),
        sequence: None,
        firmware: Firmware::Unknown,
        hardware: Hardware::default(),
        chunk_size: CHUNK_SIZE,
        disks: vec![Disk {
            number: 0,
            size,
            logical_sector: 512,
            physical_sector: 512,
            table: PartitionTable::None,
            partitions: vec![],
            index_sha256,
            totals: DiskTotals::default(),
        }],
    }
}

#[test]
fn ingest_commit_read_back_and_tamper() {
    let dir = tempfile::tempdir().unwrap();
    let (store, key) = LocalStore::init(&dir.path().join("s")).unwrap();
    let disk = disk_image();
    // Everything used except chunk 4 and the first MiB of chunk 1.
    let mut used = Extents::whole(0, disk.len() as u64);
    used.remove(4 * CHUNK_SIZE, 5 * CHUNK_SIZE);
    used.remove(CHUNK_SIZE, CHUNK_SIZE + MB);
    let (index, stats) =
        chunk_disk(&disk, &used, &store, &ChunkOptions::default(), &|_| {}).unwrap();
    assert_eq!(index.slot(2), Slot::Zeros);
    assert_eq!(index.slot(4), Slot::Unused);
    assert_eq!(
        index.digest(0),
        index.digest(3),
        "identical chunks share a digest"
    );
    assert_eq!(
        stats.new_chunks, 3,
        "chunk 0 (= chunk 3), chunk 1 and the tail are stored"
    );
    assert!(
        stats.new_bytes < 2 * CHUNK_SIZE,
        "text compresses: {}",
        stats.new_bytes
    );

    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(index.to_bytes()));
    store
        .commit_snapshot(
            &manifest("h1", "s1", disk.len() as u64, sha),
            std::slice::from_ref(&index),
        )
        .unwrap();
    assert_eq!(store.snapshots("h1").unwrap(), vec!["s1"]);

    let snap = open_snapshot(&store, "h1", None, Some(&key)).unwrap();
    let out = tempfile::tempfile().unwrap();
    out.set_len(disk.len() as u64).unwrap();
    snapshot::reader::read_disk(&store, &snap.indexes[0], &out, 4).unwrap();
    let mut back = vec![0u8; disk.len()];
    out.read_exact_at(&mut back, 0).unwrap();
    let mut expect = disk.clone();
    expect[4 * CHUNK_SIZE as usize..5 * CHUNK_SIZE as usize].fill(0);
    expect[CHUNK_SIZE as usize..(CHUNK_SIZE + MB) as usize].fill(0);
    assert!(back == expect, "read-back differs from the used data");

    // Re-chunking the same disk stores nothing new.
    let (_, again) = chunk_disk(&disk, &used, &store, &ChunkOptions::default(), &|_| {}).unwrap();
    assert_eq!(again.new_chunks, 0);

    // Tampered manifest: refused with the key, accepted without it.
    let mpath = dir.path().join("s/hosts/h1/snapshots/s1/manifest.json");
    let text = std::fs::read_to_string(&mpath)
        .unwrap()
        .replace("2026-11-23T00:00:00Z", "2026-11-24T00:00:00Z");
    std::fs::write(&mpath, text).unwrap();
    let err = open_snapshot(&store, "h1", Some("s1"), Some(&key))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("signature"), "{err:#}");
    assert!(open_snapshot(&store, "h1", Some("s1"), None).is_ok());

    // Tampered index: refused even without a key (its hash is in the manifest).
    let ipath = dir.path().join("s/hosts/h1/snapshots/s1/disk0.idx");
    let mut idx = std::fs::read(&ipath).unwrap();
    idx[100] ^= 1;
    std::fs::write(&ipath, idx).unwrap();
    let err = open_snapshot(&store, "h1", Some("s1"), None).err().unwrap();
    assert!(format!("{err:#}").contains("index hashes to"), "{err:#}");

    // Private files are never readable through the Store interface.
    assert!(store.get("private/signing.key").is_err());
    assert!(store.get("hosts/../private/signing.key").is_err());
}

/// `latest` names the snapshot committed last, whatever the ids (issue 8: it used to move only to
/// an id sorting after the old one), and each commit gets the next signed sequence number.
#[test]
fn latest_follows_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LocalStore::init(&dir.path().join("s")).unwrap();
    let empty = snapshot::ChunkIndex::new(CHUNK_SIZE);
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(empty.to_bytes()));
    for id in ["20260102T000000Z", "20260101T000000Z"] {
        store
            .commit_snapshot(
                &manifest("h", id, CHUNK_SIZE, sha.clone()),
                std::slice::from_ref(&empty),
            )
            .unwrap();
    }
    let latest = store.get("hosts/h/latest").unwrap();
    assert_eq!(
        String::from_utf8(latest).unwrap().trim(),
        "20260101T000000Z"
    );
    for (id, seq) in [("20260102T000000Z", 1), ("20260101T000000Z", 2)] {
        let s = open_snapshot(&store, "h", Some(id), None).unwrap();
        assert_eq!(s.manifest.sequence, Some(seq), "{id}");
    }
    let s = open_snapshot(&store, "h", None, None).unwrap();
    assert_eq!(s.manifest.snapshot, "20260101T000000Z");
    let dup = store.commit_snapshot(
        &manifest("h", "20260101T000000Z", CHUNK_SIZE, sha),
        &[empty],
    );
    assert!(dup.is_err(), "a snapshot id is never overwritten");
}
