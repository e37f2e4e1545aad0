//! Store integrity under real-world conditions (issue 8): multi-TiB disks over HTTP, `latest`
//! that follows commits, concurrent writers of one host, damaged chunks healed, and a rolled-back
//! `latest` caught.

mod common;

use bmr_tests::bigdisk::{big_sparse_disk, noise, same_regions};
use bmr_tests::util::Cmd;
use common::http::Server;
use common::{read_back, Env};
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

const TIB: u64 = 1 << 40;

/// Peak resident memory of this process (the test's reader), in MiB.
fn peak_rss_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Issue 8 item 1: a 4 TiB disk's index (32 MiB) used to be cut at 8 MiB by the HTTP reader
/// ("index hashes to ..., the manifest says ..."). Ingest, serve and read back over HTTP.
#[test]
fn four_tib_sparse_disk_restores_over_http() {
    let env = Env::new("four_tib_sparse_disk_restores_over_http");
    let img = env.path("big.img");
    let size = 4 * TIB;
    let regions = big_sparse_disk(&env.path("ext-files"), &img, size);
    let t = Instant::now();
    let out = env.ingest_ok("big", "s1", &[&img]);
    let ingest_secs = t.elapsed().as_secs_f64();
    assert!(out.stdout.contains("committed"), "{}", out.describe());
    let srv = Server::start(&env.store, &[]);
    let t = Instant::now();
    let restored = read_back(
        &srv.url("/store"),
        &env.pubkey(),
        "big",
        "s1",
        &env.path("out"),
    )
    .unwrap_or_else(|e| panic!("reading the 4 TiB snapshot over HTTP: {e:#}"));
    let read_secs = t.elapsed().as_secs_f64();
    assert_eq!(std::fs::metadata(&restored[0]).unwrap().len(), size);
    same_regions(&img, &restored[0], &regions);
    let rss = peak_rss_mib();
    eprintln!(
        "4 TiB sparse disk: ingest {ingest_secs:.1}s, read back over HTTP {read_secs:.1}s, \
         test process peak RSS {rss} MiB"
    );
    assert!(rss < 1024, "peak RSS {rss} MiB");
}

// ---------------------------------------------------------------------------------------------
// Writers of one host: ids reserved at the start, `latest` by commit order.

/// Sleep until just after the next second boundary, so that writers started now all make the
/// same time-based snapshot id unless ids are reserved.
fn sync_to_second() {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::thread::sleep(Duration::from_nanos(1_000_000_000 - ns as u64 + 5_000_000));
}

/// A small raw disk image of noise (no partition table: kept whole).
fn small_image(env: &Env, name: &str, seed: u64) -> std::path::PathBuf {
    let p = env.path(name);
    std::fs::write(&p, noise(seed, 6 << 20)).unwrap();
    p
}

fn ingest_cmd(env: &Env, host: &str, img: &Path) -> Cmd {
    Cmd::new(common::BIN)
        .arg("ingest")
        .arg("--store")
        .arg(&env.store)
        .args(["--host", host])
        .arg(img)
        .timeout(common::CMD_TIMEOUT)
}

fn snapshot_ids(env: &Env, host: &str) -> Vec<String> {
    let v = env.list_json();
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["host"] == host)
        .map(|s| s["snapshot"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn latest_of(env: &Env, host: &str) -> String {
    std::fs::read_to_string(env.store.join(format!("hosts/{host}/latest")))
        .unwrap()
        .trim()
        .to_string()
}

/// Issue 8 item 9: of 6 parallel ingests of one host, 5 used to fail at their commit
/// (`Directory not empty`, `already exists`): they had all picked the same id.
#[test]
fn six_parallel_ingests_of_one_host_all_commit() {
    let env = Env::new("six_parallel_ingests_of_one_host_all_commit");
    let img = small_image(&env, "d.img", 7);
    sync_to_second();
    let mut procs: Vec<_> = (0..6)
        .map(|i| {
            ingest_cmd(&env, "web1", &img)
                .spawn(&env.logs, &format!("ingest-{i}"))
                .unwrap()
        })
        .collect();
    for p in procs.iter_mut() {
        let (st, timed_out) = p.wait(Duration::from_secs(300)).unwrap();
        assert!(st.success() && !timed_out, "{}", p.describe());
    }
    let ids = snapshot_ids(&env, "web1");
    assert_eq!(ids.len(), 6, "{ids:?}");
    env.verify(&[]).ok();
}

/// Issue 8 item 9: an upload session and an ingest started in the same second used to get the
/// same id; the capture's commit then failed with `409 already exists` after uploading all.
#[test]
fn upload_session_and_ingest_started_together_both_commit() {
    use common::http::{post_json, send};
    use snapshot::format::index::{ChunkIndex, Slot};
    use snapshot::manifest::{Disk, DiskTotals, Firmware, Hardware, Manifest, MANIFEST_VERSION};
    let env = Env::new("upload_session_and_ingest_started_together_both_commit");
    let img = small_image(&env, "d.img", 8);
    let srv = Server::start(&env.store, &[]);
    sync_to_second();
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        None,
        serde_json::json!({ "host": "web1" }),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let ingest = ingest_cmd(&env, "web1", &img).run();
    env.log("ingest", &ingest);
    assert!(ingest.success(), "{}", ingest.describe());
    let u = r.json()["upload"].as_str().unwrap().to_string();
    let session_id = r.json()["snapshot"].as_str().unwrap().to_string();
    // Upload a one-chunk disk.
    let data = noise(9, 4 << 20);
    let d = snapshot::Digest::of(&data);
    let r = send(
        "PUT",
        &srv.url(&format!("/api/v1/uploads/{u}/chunks/{d}")),
        None,
        &[],
        Some(&snapshot::encode_chunk(&data, 3)),
    );
    assert!(r.status == 201 || r.status == 200, "{}", r.text());
    let mut idx = ChunkIndex::new(data.len() as u64);
    idx.set(0, Slot::Data(d));
    let r = send(
        "PUT",
        &srv.url(&format!("/api/v1/uploads/{u}/indexes/0")),
        None,
        &[],
        Some(&idx.to_bytes()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let m = Manifest {
        version: MANIFEST_VERSION,
        host: "web1".into(),
        snapshot: "x".into(),
        created: "1970-01-01T00:00:00Z".into(),
        sequence: None,
        firmware: Firmware::Bios,
        hardware: Hardware::default(),
        chunk_size: snapshot::CHUNK_SIZE,
        disks: vec![Disk {
            number: 0,
            size: idx.disk_size,
            logical_sector: 512,
            physical_sector: 512,
            table: snapshot::ptable::PartitionTable::None,
            partitions: Vec::new(),
            index_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(idx.to_bytes())),
            totals: DiskTotals::default(),
        }],
    };
    let r = send(
        "POST",
        &srv.url(&format!("/api/v1/uploads/{u}/commit")),
        None,
        &[],
        Some(&m.to_bytes()),
    );
    assert_eq!(r.status, 201, "commit of the upload: {}", r.text());
    let ids = snapshot_ids(&env, "web1");
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&session_id), "{ids:?}");
    // The upload committed last: it is `latest`.
    assert_eq!(latest_of(&env, "web1"), session_id);
}

/// Issue 8 item 2: `latest` used to move only when the new id sorted after the old one as a
/// string, so a named snapshot froze it; and `latest` itself was accepted as a snapshot name.
#[test]
fn latest_follows_commit_order_whatever_the_names() {
    let env = Env::new("latest_follows_commit_order_whatever_the_names");
    let img = small_image(&env, "d.img", 10);
    env.ingest_ok("web1", "before-upgrade", &[&img]);
    assert_eq!(latest_of(&env, "web1"), "before-upgrade");
    let out = ingest_cmd(&env, "web1", &img).run();
    assert!(out.success(), "{}", out.describe());
    let ids = snapshot_ids(&env, "web1");
    let auto = ids.iter().find(|i| *i != "before-upgrade").unwrap().clone();
    assert_eq!(latest_of(&env, "web1"), auto, "latest stayed behind");
    // A name that sorts before the time ids still becomes latest when committed last.
    env.ingest_ok("web1", "0-first", &[&img]);
    assert_eq!(latest_of(&env, "web1"), "0-first");
    for bad in ["latest", "LATEST", "Latest"] {
        let out = env.ingest("web1", Some(bad), &[&img]);
        assert!(!out.success(), "--snapshot {bad} accepted");
        assert!(out.stderr.contains("reserved"), "{}", out.describe());
    }
    assert_eq!(snapshot_ids(&env, "web1").len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Damaged chunks: never trusted by name, healed by ingest and `verify --repair`.

/// Flip one bit in the middle of a stored chunk blob's payload.
fn flip_bit(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn data_chunks(env: &Env) -> Vec<String> {
    env.chunk_files().into_iter().collect()
}

/// Issue 8 item 4: re-ingesting the same data stored "0 new chunks" over a bit-flipped chunk and
/// committed a snapshot that could not be restored.
#[test]
fn bit_flipped_chunk_is_healed_by_reingest_and_verify_repair() {
    let env = Env::new("bit_flipped_chunk_is_healed_by_reingest_and_verify_repair");
    let img = small_image(&env, "d.img", 11);
    env.ingest_ok("web1", "s1", &[&img]);
    let chunks = data_chunks(&env);
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    let victim = env.chunk_path(&chunks[0]);
    flip_bit(&victim);
    assert!(!env.verify(&[]).success());

    // Re-ingest: the damaged chunk is rewritten from the source, and both snapshots restore.
    let out = env.ingest_ok("web1", "s2", &[&img]);
    assert!(out.stdout.contains("1 corrupt"), "{}", out.describe());
    for snap in ["s1", "s2"] {
        let rb = env
            .read_back(
                env.store.to_str().unwrap(),
                "web1",
                snap,
                &env.path(&format!("rb-{snap}")),
            )
            .unwrap_or_else(|e| panic!("reading back {snap}: {e:#}"));
        assert!(common::same_bytes(&img, &rb[0]), "{snap} differs");
    }
    env.verify(&[]).ok();

    // verify --repair with the source at hand rewrites the chunk.
    flip_bit(&victim);
    let out = env.verify(&["--repair", "--source"]);
    assert!(!out.success(), "--source without a value accepted");
    let out = env
        .appliance(["verify", "--repair", "--source"])
        .arg(&img)
        .run();
    env.log("verify-repair-source", &out);
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("repaired 1"), "{}", out.describe());
    env.verify(&[]).ok();

    // Without a correct copy: the damaged snapshots are named, the chunk is set aside so that
    // the next ingest or upload stores it again.
    flip_bit(&victim);
    let out = env.verify(&["--repair"]);
    assert!(!out.success(), "{}", out.describe());
    let all = out.all();
    assert!(
        all.contains("web1/s1") && all.contains("web1/s2"),
        "{}",
        out.describe()
    );
    assert!(!victim.exists(), "corrupt chunk left in place");
    env.ingest_ok("web1", "s3", &[&img]);
    env.verify(&[]).ok();
}

/// Issue 8 item 4: the upload API's `missing` must not call a chunk present whose file is
/// truncated or has a damaged header, and an upload of it replaces the damaged file.
#[test]
fn missing_api_reports_damaged_chunk_files_and_upload_replaces_them() {
    use common::http::{post_json, send};
    let env = Env::new("missing_api_reports_damaged_chunk_files_and_upload_replaces_them");
    let img = small_image(&env, "d.img", 12);
    env.ingest_ok("web1", "s1", &[&img]);
    let chunks = data_chunks(&env);
    let (a, b) = (&chunks[0], &chunks[1]);
    // a: truncated; b: header magic damaged.
    let pa = env.chunk_path(a);
    let len = std::fs::metadata(&pa).unwrap().len();
    File::options()
        .write(true)
        .open(&pa)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let pb = env.chunk_path(b);
    let mut blob = std::fs::read(&pb).unwrap();
    blob[0] ^= 1;
    std::fs::write(&pb, blob).unwrap();

    let srv = Server::start(&env.store, &[]);
    let r = post_json(
        &srv.url("/api/v1/uploads"),
        None,
        serde_json::json!({ "host": "web1" }),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let u = r.json()["upload"].as_str().unwrap().to_string();
    let r = post_json(
        &srv.url(&format!("/api/v1/uploads/{u}/missing")),
        None,
        serde_json::json!({ "digests": [a, b] }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let missing = r.json()["missing"].clone();
    assert_eq!(missing, serde_json::json!([a, b]), "{}", r.text());
    // Upload both again: the damaged files are replaced.
    let data = std::fs::read(&img).unwrap();
    for (i, hexd) in [(0usize, a), (1, b)] {
        let _ = i;
        let d = snapshot::Digest::parse(hexd).unwrap();
        let chunk = data
            .chunks(4 << 20)
            .find(|c| snapshot::Digest::of(c) == d)
            .unwrap();
        let r = send(
            "PUT",
            &srv.url(&format!("/api/v1/uploads/{u}/chunks/{hexd}")),
            None,
            &[],
            Some(&snapshot::encode_chunk(chunk, 3)),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    env.verify(&[]).ok();
}

// ---------------------------------------------------------------------------------------------
// `latest` and the signature.

/// Issue 8 item 11: with a public key, a `latest` pointed back at an older snapshot used to be
/// accepted (and shown as "signature verified"). The newest signed snapshot the store lists wins
/// over `latest`: a rollback is refused with both ids named.
#[test]
fn rolled_back_latest_is_detected_with_the_key() {
    use snapshot::store::{http::Options, open, open_snapshot};
    let env = Env::new("rolled_back_latest_is_detected_with_the_key");
    let img = small_image(&env, "d.img", 13);
    env.ingest_ok("web1", "old", &[&img]);
    env.ingest_ok("web1", "new", &[&img]);
    assert_eq!(latest_of(&env, "web1"), "new");
    std::fs::write(env.store.join("hosts/web1/latest"), "old\n").unwrap();
    let key = env.pubkey();
    let srv = Server::start(&env.store, &[]);
    let opts = Options {
        retry_for: Duration::from_secs(2),
        ..Options::default()
    };
    for location in [srv.url("/store"), env.store.display().to_string()] {
        let store = open(&location, &opts).unwrap();
        let r = open_snapshot(store.as_ref(), "web1", Some("latest"), Some(&key));
        let e = match r {
            Ok(s) => panic!(
                "{location}: rolled-back latest accepted ({})",
                s.manifest.snapshot
            ),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains("old") && e.contains("new") && e.contains("rolled back"),
            "{location}: {e}"
        );
        // Naming a snapshot explicitly is the operator's choice: accepted.
        open_snapshot(store.as_ref(), "web1", Some("old"), Some(&key)).unwrap();
    }
}
