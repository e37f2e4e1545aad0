//! Acceptance tests of issue 2 (snapshot store, ingest with used-block maps, verify, gc, serve),
//! run against the real `appliance` binary and the fixtures of `bmr-tests`.
//!
//! Every read-back is checked with independent oracles (`bmr_tests::oracle`): bytes outside the
//! partitions identical, every block the filesystem's own allocation data marks used identical
//! (dumpe2fs, the FAT, `$Bitmap` via ntfscat), `e2fsck -fn` / `fsck.fat -n` / `ntfsfix -n` clean,
//! every file's SHA-256 as written, the deleted file's pattern gone and swap pages zero.
//!
//! Artifacts (command logs, server logs) are kept under `target/e2e/<test>/`.

mod common;

use bmr_tests::corrupt;
use bmr_tests::fixtures::{self, Fixture, FsKind, TableSpec};
use bmr_tests::oracle::{self, Expect};
use bmr_tests::util::{HttpServer, Output};
use common::{same_bytes, Env, BIN};
use snapshot::ptable::{Guid, PartitionTable};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Failures collected so a test reports every problem, not only the first.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, got: T, want: T, what: &str) {
        if got != want {
            self.0
                .push(format!("{what}: manifest has {got:?}, expected {want:?}"));
        }
    }
    #[track_caller]
    fn finish(self, what: &str) {
        if !self.0.is_empty() {
            panic!(
                "{what}: {} problem(s):\n  {}",
                self.0.len(),
                self.0.join("\n  ")
            );
        }
    }
}

/// Check a local read-back with the oracles, then require the HTTP read-backs (a static server
/// of the store directory and `appliance serve`) to be byte-identical to it.
fn roundtrip(env: &Env, fx: &Fixture, host: &str, snap: &str, pr: &mut Problems) {
    let local = match env.read_back(env.store.to_str().unwrap(), host, snap, &env.path("local")) {
        Ok(l) => l,
        Err(e) => {
            pr.0.push(format!(
                "reading {host}/{snap} back from the store directory: {e:#}"
            ));
            return;
        }
    };
    assert_eq!(local.len(), 1);
    if let Err(e) = oracle::compare_disk(
        fx,
        &fx.image,
        &local[0],
        &env.path("oracle"),
        Expect::default(),
    ) {
        pr.0.push(format!("local read-back is wrong: {e:#}"));
    }

    let py = HttpServer::python(&env.store, &env.logs).expect("python3 -m http.server");
    match env.read_back(&py.url, host, snap, &env.path("python")) {
        Ok(got) => {
            pr.check(same_bytes(&got[0], &local[0]), || {
                "read-back over python http.server differs from the local one".into()
            });
            std::fs::remove_file(&got[0]).ok();
        }
        Err(e) => {
            pr.0.push(format!("reading back over python http.server: {e:#}"))
        }
    }
    drop(py);

    match HttpServer::appliance(Path::new(BIN), &env.store, &env.logs) {
        Err(e) => pr.0.push(format!("appliance serve did not start: {e:#}")),
        Ok(srv) => match env.read_back(&srv.url, host, snap, &env.path("serve")) {
            Ok(got) => {
                pr.check(same_bytes(&got[0], &local[0]), || {
                    "read-back through appliance serve differs from the local one".into()
                });
                std::fs::remove_file(&got[0]).ok();
            }
            Err(e) => pr.0.push(format!(
                "reading back through appliance serve: {e:#}\n{}",
                srv.proc.describe()
            )),
        },
    }
    std::fs::remove_file(&local[0]).ok();
}

fn guid(s: &str) -> Guid {
    Guid::parse(s).unwrap_or_else(|| panic!("bad GUID {s}"))
}

/// The manifest's partition table and filesystems match the fixture's recipe.
fn check_manifest_table(
    m: &snapshot::Manifest,
    fx: &Fixture,
    spec: &fixtures::DiskSpec,
    pr: &mut Problems,
) {
    assert_eq!(m.disks.len(), 1);
    let d = &m.disks[0];
    pr.eq(d.size, fx.size, "disk size");
    pr.eq(d.logical_sector, fx.sector_size, "logical sector size");
    match (&d.table, &spec.table) {
        (PartitionTable::Gpt(g), TableSpec::Gpt { disk_guid }) => {
            pr.eq(g.disk_guid, guid(disk_guid), "GPT disk GUID");
            for p in &spec.parts {
                let Some(e) = g.partitions.iter().find(|e| e.number == p.number) else {
                    pr.0.push(format!("GPT partition {} missing: {g:?}", p.number));
                    continue;
                };
                let n = p.number;
                pr.eq(e.first_lba, p.start, &format!("partition {n} first LBA"));
                pr.eq(
                    e.last_lba,
                    p.start + p.sectors - 1,
                    &format!("partition {n} last LBA"),
                );
                pr.eq(
                    e.type_guid,
                    guid(p.gpt_type.as_deref().unwrap()),
                    &format!("partition {n} type"),
                );
                pr.eq(
                    e.unique_guid,
                    guid(p.uuid.as_deref().unwrap()),
                    &format!("partition {n} GUID"),
                );
                pr.eq(
                    Some(e.name.as_str()),
                    p.name.as_deref(),
                    &format!("partition {n} name"),
                );
                let attrs = match p.attrs.as_deref() {
                    None => 0,
                    Some("LegacyBIOSBootable") => 1 << 2,
                    Some("GUID:63") => 1 << 63,
                    Some(a) => panic!("attrs {a} not handled by the test"),
                };
                pr.eq(e.attributes, attrs, &format!("partition {n} attributes"));
            }
        }
        (PartitionTable::Mbr(mbr), TableSpec::Mbr { signature }) => {
            pr.eq(mbr.disk_signature, *signature, "MBR disk signature");
            for p in &spec.parts {
                let Some(e) = mbr.partitions.iter().find(|e| e.number == p.number) else {
                    pr.0.push(format!("MBR partition {} missing: {mbr:?}", p.number));
                    continue;
                };
                let n = p.number;
                pr.eq(e.first_lba, p.start, &format!("partition {n} start"));
                pr.eq(e.sectors, p.sectors, &format!("partition {n} sectors"));
                pr.eq(Some(e.kind), p.mbr_type, &format!("partition {n} type"));
                pr.eq(e.bootable, p.bootable, &format!("partition {n} boot flag"));
                if n >= 5 {
                    pr.check(e.ebr_lba.is_some(), || {
                        format!("logical partition {n} has no EBR LBA")
                    });
                }
            }
        }
        (t, _) => {
            pr.0.push(format!("wrong table type in the manifest: {t:?}"))
        }
    }
    for p in fx.partitions.iter().filter(|p| !p.extended) {
        let Some(mp) = d.partitions.iter().find(|q| q.number == p.number) else {
            pr.0.push(format!("manifest lacks partition {}", p.number));
            continue;
        };
        let n = p.number;
        pr.eq(
            (mp.offset, mp.size),
            (p.offset, p.size),
            &format!("partition {n} place"),
        );
        let want = p.fs.map(|k| k.name().to_string());
        let got = mp.fs.as_ref().map(|f| {
            serde_json::to_value(f.kind)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        });
        pr.eq(got, want, &format!("partition {n} filesystem kind"));
        if let (Some(u), Some(f)) = (&p.uuid, &mp.fs) {
            pr.eq(
                f.uuid.as_deref().map(str::to_lowercase),
                Some(u.to_lowercase()),
                &format!("partition {n} filesystem UUID"),
            );
        }
        if let (Some(l), Some(f)) = (&p.label, &mp.fs) {
            pr.eq(
                f.label.as_deref(),
                Some(l.as_str()),
                &format!("partition {n} filesystem label"),
            );
        }
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn gpt_server_roundtrip_local_and_http() {
    let fx = fixtures::gpt_server().unwrap();
    let env = Env::new("gpt_server_roundtrip");
    env.ingest_ok("web1", "s1", &[&fx.image]);
    let mut pr = Problems::default();
    let m = env.manifest("web1", "s1");
    check_manifest_table(&m, &fx, &fixtures::gpt_server_spec(), &mut pr);
    pr.eq(
        m.firmware,
        snapshot::manifest::Firmware::Uefi,
        "firmware of a GPT disk with an ESP",
    );
    // chunks with no used block are unused slots: every 4 MiB slot wholly inside the swap
    // partition, past its header page
    let store = snapshot::store::LocalStore::open(&env.store).unwrap();
    let snap = snapshot::store::open_snapshot(&store, "web1", Some("s1"), None).unwrap();
    let idx = &snap.indexes[0];
    let swap = fx.partition(3);
    let mut inside = 0;
    for (i, slot) in idx.slots() {
        let (off, len) = idx.span(i);
        if off >= swap.offset + 4096 && off + len <= swap.offset + swap.size {
            inside += 1;
            pr.check(slot == snapshot::Slot::Unused, || {
                format!("slot {i} (inside swap) is {slot:?}, not unused")
            });
        }
    }
    assert!(inside >= 6, "the swap partition spans {inside} whole slots");
    roundtrip(&env, &fx, "web1", "s1", &mut pr);
    pr.finish("gpt_server");
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn mbr_mixed_roundtrip_local_and_http() {
    let fx = fixtures::mbr_mixed().unwrap();
    let env = Env::new("mbr_mixed_roundtrip");
    env.ingest_ok("dos1", "s1", &[&fx.image]);
    let mut pr = Problems::default();
    let m = env.manifest("dos1", "s1");
    check_manifest_table(&m, &fx, &fixtures::mbr_mixed_spec(), &mut pr);
    roundtrip(&env, &fx, "dos1", "s1", &mut pr);
    pr.finish("mbr_mixed");
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn gpt_4k_roundtrip_and_sector_size() {
    let fx = fixtures::gpt_4k().unwrap();
    let env = Env::new("gpt_4k_roundtrip");
    env.ingest_ok("k4", "s1", &[&fx.image]);
    let raw: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.store.join("hosts/k4/snapshots/s1/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(raw["disks"][0]["logical_sector"], 4096, "4Kn manifest");
    let mut pr = Problems::default();
    let m = env.manifest("k4", "s1");
    check_manifest_table(&m, &fx, &fixtures::gpt_4k_spec(), &mut pr);
    roundtrip(&env, &fx, "k4", "s1", &mut pr);
    pr.finish("gpt_4k");
}

/// What partclone + zstd -3 needs for the same disk: each filesystem's used blocks and metadata
/// (partclone image of the partition, compressed), swap nothing, and the bytes outside the
/// partitions (partition tables, gaps) compressed as they are.
fn partclone_zstd_bytes(fx: &Fixture, scratch: &Path) -> u64 {
    std::fs::create_dir_all(scratch).unwrap();
    let mut total = 0u64;
    let data: Vec<_> = fx.partitions.iter().filter(|p| !p.extended).collect();
    let mut pos = 0u64;
    let mut outside = Vec::new();
    let mut sorted = data.clone();
    sorted.sort_by_key(|p| p.offset);
    for p in &sorted {
        if p.offset > pos {
            outside.push((pos, p.offset));
        }
        pos = pos.max(p.offset + p.size);
    }
    outside.push((pos, fx.size));
    for (s, e) in outside {
        let out = bmr_tests::Cmd::new("sh")
            .arg("-c")
            .arg(format!(
                "dd if={} bs=4096 skip={} count={} iflag=skip_bytes,count_bytes status=none | zstd -3 -c | wc -c",
                fx.image.display(),
                s,
                e - s
            ))
            .ok();
        total += out.stdout.trim().parse::<u64>().unwrap();
    }
    for p in data {
        let tool = match p.fs {
            Some(k) if k.is_ext() => "partclone.extfs",
            Some(k) if k.is_fat() => "partclone.fat",
            Some(FsKind::Ntfs) => "partclone.ntfs",
            _ => continue, // swap: nothing worth keeping
        };
        let part = scratch.join(format!("part{}.img", p.number));
        bmr_tests::util::extract(&fx.image, p.offset, p.size, &part).unwrap();
        let out = bmr_tests::Cmd::new("bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; {tool} -c -s {} -o - 2>/dev/null | zstd -3 -c | wc -c",
                part.display()
            ))
            .ok();
        let n: u64 = out.stdout.trim().parse().unwrap();
        assert!(
            n > 4096,
            "{tool} produced nothing for partition {}",
            p.number
        );
        total += n;
        std::fs::remove_file(&part).ok();
    }
    total
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn stored_bytes_below_partclone_zstd() {
    for fx in [
        fixtures::gpt_server().unwrap(),
        fixtures::mbr_mixed().unwrap(),
    ] {
        let env = Env::new(&format!("stored_bytes_{}", fx.name));
        env.ingest_ok("h", "s1", &[&fx.image]);
        let stored = env.chunk_bytes();
        let reference = partclone_zstd_bytes(&fx, &env.path("pc"));
        let used: u64 = fx.partitions.iter().map(|p| p.used_bytes).sum();
        eprintln!(
            "{}: chunks {stored} bytes, partclone|zstd -3 {reference} bytes, used {used} bytes",
            fx.name
        );
        assert!(
            stored < reference,
            "{}: the store holds {stored} bytes of chunks, more than partclone|zstd -3 ({reference}): free space or swap stored?",
            fx.name
        );
    }
}

/// Physical blocks (in filesystem blocks) of `path` in the ext filesystem image `part`.
fn ext_file_blocks(part: &Path, path: &str) -> Vec<u64> {
    let out = bmr_tests::Cmd::new("debugfs")
        .arg("-R")
        .arg(format!("blocks /{path}"))
        .arg(part)
        .ok();
    out.stdout
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect()
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn reingest_after_1mb_change_and_dedupe_across_hosts() {
    let fx = fixtures::gpt_server().unwrap();
    let env = Env::new("reingest_1mb");
    let img = env.path("disk.img");
    fx.copy_to(&img).unwrap();
    env.ingest_ok("web1", "s1", &[&img]);
    let after_first = env.chunk_files();

    // overwrite 1 MiB inside an allocated file's blocks in the raw image
    let root = fx.partition(2);
    let part = env.path("root.img");
    bmr_tests::util::extract(&img, root.offset, root.size, &part).unwrap();
    let file = "var/lib/data/random-01.bin";
    let blocks = ext_file_blocks(&part, file);
    assert!(blocks.len() >= 512, "{file} has {} blocks", blocks.len());
    let bs = root.block_size as u64;
    let new = bmr_tests::prng::Content::Random {
        seed: 999,
        len: 1 << 20,
    }
    .bytes()
    .unwrap();
    for (k, piece) in new.chunks(bs as usize).enumerate() {
        let b = blocks[256 + k];
        corrupt::write_at(&img, root.offset + b * bs, piece).unwrap();
    }
    let mut fx2 = fx.clone();
    fx2.image = img.clone();
    {
        let mut content = bmr_tests::prng::Content::Random {
            seed: 501,
            len: 4 << 20,
        }
        .bytes()
        .unwrap();
        content[256 * bs as usize..256 * bs as usize + (1 << 20)].copy_from_slice(&new);
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
        let p = fx2.partitions.iter_mut().find(|p| p.number == 2).unwrap();
        let f = p.files.iter_mut().find(|f| f.path == file).unwrap();
        assert_ne!(f.sha256, sha);
        f.sha256 = sha;
    }

    env.ingest_ok("web1", "s2", &[&img]);
    let after_second = env.chunk_files();
    let latest = std::fs::read_to_string(env.store.join("hosts/web1/latest")).unwrap();
    assert_eq!(latest.trim(), "s2", "latest moves to the new snapshot");
    let list = env.list_json();
    let rows: Vec<(String, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["snapshot"].as_str().unwrap().to_string(),
                r["latest"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [("s1".to_string(), false), ("s2".to_string(), true)],
        "{list}"
    );
    let new_chunks = after_second.difference(&after_first).count();
    assert!(
        (1..=3).contains(&new_chunks),
        "a 1 MiB change stored {new_chunks} new chunks (expected 1 to 3)"
    );

    // both snapshots read back correctly
    let s1 = env
        .read_back(env.store.to_str().unwrap(), "web1", "s1", &env.path("s1"))
        .unwrap();
    oracle::compare_disk(&fx, &fx.image, &s1[0], &env.path("o1"), Expect::default())
        .unwrap_or_else(|e| panic!("snapshot s1 after the re-ingest: {e:#}"));
    std::fs::remove_file(&s1[0]).ok();
    let s2 = env
        .read_back(env.store.to_str().unwrap(), "web1", "s2", &env.path("s2"))
        .unwrap();
    oracle::compare_disk(&fx2, &img, &s2[0], &env.path("o2"), Expect::default())
        .unwrap_or_else(|e| panic!("snapshot s2 (changed disk): {e:#}"));
    std::fs::remove_file(&s2[0]).ok();

    // the same disks under other hosts store nothing new
    env.ingest_ok("web2", "s1", &[&fx.image]);
    env.ingest_ok("web3", "s1", &[&img]);
    let after_others = env.chunk_files();
    assert_eq!(
        after_others.len(),
        after_second.len(),
        "ingesting the same images under other hosts stored {} new chunks",
        after_others.len() as i64 - after_second.len() as i64
    );
    env.verify(&[]).ok();
}

/// A data chunk used by `host` only.
fn chunk_of_host_only(env: &Env, host: &str, others: &[&str]) -> String {
    let mine = env.referenced(Some(host));
    let theirs: std::collections::BTreeSet<String> = others
        .iter()
        .flat_map(|h| env.referenced(Some(h)))
        .collect();
    let own: Vec<&String> = mine.difference(&theirs).collect();
    assert!(!own.is_empty(), "{host} has no chunk of its own");
    own[own.len() / 2].clone()
}

fn assert_names(out: &Output, what: &[&str]) {
    let all = out.all();
    for w in what {
        assert!(
            all.contains(w),
            "verify's output does not name {w:?}\n{}",
            out.describe()
        );
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn verify_names_corrupt_and_missing_chunks() {
    let gpt = fixtures::gpt_server().unwrap();
    let mbr = fixtures::mbr_mixed().unwrap();
    let env = Env::new("verify_corrupt");
    env.ingest_ok("web1", "20260101T000000Z", &[&gpt.image]);
    env.ingest_ok("dos1", "20260102T000000Z", &[&mbr.image]);
    env.verify(&[]).ok();

    // a corrupt chunk: one byte flipped in the middle of the blob
    let d = chunk_of_host_only(&env, "web1", &["dos1"]);
    let path = env.chunk_path(&d);
    let original = std::fs::read(&path).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&path, &bad).unwrap();
    let out = env.verify(&[]);
    assert!(
        !out.success(),
        "verify passed a corrupt chunk\n{}",
        out.describe()
    );
    assert_names(&out, &[&d, "web1", "20260101T000000Z"]);
    let only_dos = env.verify(&["--host", "dos1"]);
    assert!(
        only_dos.success(),
        "verify --host dos1 fails on a chunk dos1 does not use\n{}",
        only_dos.describe()
    );
    // the reader refuses it too, naming the chunk
    let err = env
        .read_back(
            env.store.to_str().unwrap(),
            "web1",
            "20260101T000000Z",
            &env.path("rb"),
        )
        .expect_err("read-back of a snapshot with a corrupt chunk succeeded");
    assert!(
        format!("{err:#}").contains(&d),
        "reader error does not name the chunk: {err:#}"
    );

    // a missing chunk
    std::fs::write(&path, &original).unwrap();
    env.verify(&[]).ok();
    let d2 = chunk_of_host_only(&env, "dos1", &["web1"]);
    std::fs::remove_file(env.chunk_path(&d2)).unwrap();
    let out = env.verify(&[]);
    assert!(
        !out.success(),
        "verify passed a missing chunk\n{}",
        out.describe()
    );
    assert_names(&out, &[&d2, "dos1", "20260102T000000Z"]);
    assert!(
        !out.all().contains(&d),
        "the repaired chunk is still reported\n{}",
        out.describe()
    );
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn tampered_manifest_fails_signature_check() {
    let fx = fixtures::mbr_mixed().unwrap();
    let env = Env::new("tampered_manifest");
    env.ingest_ok("dos1", "s1", &[&fx.image]);
    let key = env.pubkey();
    let store = snapshot::store::LocalStore::open(&env.store).unwrap();
    snapshot::store::open_snapshot(&store, "dos1", Some("s1"), Some(&key))
        .expect("the untouched snapshot opens with the public key");

    let path = env.store.join("hosts/dos1/snapshots/s1/manifest.json");
    let original = std::fs::read_to_string(&path).unwrap();
    // a change of meaning (the disk size) that keeps the JSON valid, and a whitespace-only change
    let size = fx.size.to_string();
    assert!(original.contains(&size));
    let tampered = [
        original.replacen(&size, &(fx.size + 512).to_string(), 1),
        original.replacen('{', "{ ", 1),
    ];
    for t in &tampered {
        std::fs::write(&path, t).unwrap();
        let err = snapshot::store::open_snapshot(&store, "dos1", Some("s1"), Some(&key))
            .err()
            .expect("a tampered manifest was accepted");
        assert!(
            format!("{err:#}").to_lowercase().contains("signature"),
            "not a signature error: {err:#}"
        );
        let out = env.verify(&[]);
        assert!(
            !out.success(),
            "verify accepted a tampered manifest\n{}",
            out.describe()
        );
        assert_names(&out, &["dos1", "s1"]);
    }
    // over HTTP too
    let py = HttpServer::python(&env.store, &env.logs).unwrap();
    let err = env
        .read_back(&py.url, "dos1", "s1", &env.path("rb"))
        .expect_err("a tampered manifest was accepted over HTTP");
    assert!(
        format!("{err:#}").to_lowercase().contains("signature"),
        "{err:#}"
    );
    // the original with another appliance's key
    std::fs::write(&path, &original).unwrap();
    let other = Env::new("tampered_manifest_other_key");
    let err = snapshot::store::open_snapshot(&store, "dos1", Some("s1"), Some(&other.pubkey()))
        .err()
        .expect("a manifest signed by another appliance was accepted");
    assert!(
        format!("{err:#}").to_lowercase().contains("signature"),
        "{err:#}"
    );
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn killed_ingest_leaves_a_verifiable_store_and_gc_cleans_up() {
    let small = fixtures::gpt_4k().unwrap();
    let big = fixtures::big_mixed(1 << 30, 0.45).unwrap();
    let env = Env::new("killed_ingest");
    env.ingest_ok("keep", "s1", &[&small.image]);
    let referenced = env.referenced(None);
    let before = env.chunk_files();
    assert_eq!(
        before, referenced,
        "a fresh store holds exactly the referenced chunks"
    );

    let mut ingest = bmr_tests::Cmd::new(BIN)
        .arg("ingest")
        .arg("--store")
        .arg(&env.store)
        .args(["--host", "victim", "--snapshot", "s1"])
        .arg(&big.image)
        .spawn(&env.logs, "victim-ingest")
        .unwrap();
    // kill it once it has written a few chunks of its own
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut written = 0;
    while Instant::now() < deadline && ingest.try_status().is_none() {
        written = env.chunk_files().len() - before.len();
        if written >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ingest.signal(libc::SIGKILL);
    let (status, _) = ingest.wait(Duration::from_secs(10)).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the ingest was not killed mid-way (wrote {written} chunks; status {status}); the fixture is too small\n{}",
        ingest.describe()
    );
    assert!(
        written >= 5,
        "the ingest wrote no chunk before the kill\n{}",
        ingest.describe()
    );

    let list = env.list_json();
    let text = list.to_string();
    assert!(
        !text.contains("victim"),
        "a killed ingest is listed: {text}"
    );
    assert!(
        !env.store.join("hosts/victim/latest").exists(),
        "latest written by a killed ingest"
    );
    assert!(
        !env.store.join("hosts/victim/snapshots/s1").exists(),
        "snapshot dir published by a killed ingest"
    );
    env.verify(&[]).ok();

    // every chunk file present decodes to its digest: no half-written chunk
    let orphans: Vec<String> = env.chunk_files().difference(&referenced).cloned().collect();
    assert!(!orphans.is_empty());
    for d in &orphans {
        let blob = std::fs::read(env.chunk_path(d)).unwrap();
        snapshot::decode_chunk(&blob, &snapshot::Digest::parse(d).unwrap())
            .unwrap_or_else(|e| panic!("half-written chunk left by the killed ingest: {e:#}"));
    }

    let all = env.chunk_files();
    let dry = env.gc(true).ok();
    assert_eq!(
        env.chunk_files(),
        all,
        "gc --dry-run removed chunks\n{}",
        dry.describe()
    );
    assert!(
        dry.stdout.contains(&orphans.len().to_string()),
        "gc --dry-run does not report the {} orphans\n{}",
        orphans.len(),
        dry.describe()
    );
    let gc = env.gc(false).ok();
    assert_eq!(
        env.chunk_files(),
        referenced,
        "gc left orphans or removed live chunks\n{}",
        gc.describe()
    );
    env.verify(&[]).ok();
    let rb = env
        .read_back(env.store.to_str().unwrap(), "keep", "s1", &env.path("rb"))
        .unwrap();
    oracle::compare_disk(
        &small,
        &small.image,
        &rb[0],
        &env.path("o"),
        Expect::default(),
    )
    .unwrap_or_else(|e| panic!("the kept snapshot after gc: {e:#}"));

    // the victim can be ingested again, reusing nothing broken
    env.ingest_ok("victim", "s1", &[&small.image]);
    env.verify(&[]).ok();
}

/// gc while an ingest is writing: gc refuses (the writer holds the store) or removes nothing the
/// ingest goes on to reference; either way the committed snapshot verifies afterwards.
#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn gc_during_ingest_never_removes_what_the_ingest_references() {
    let big = fixtures::big_mixed(1 << 30, 0.45).unwrap();
    let env = Env::new("gc_during_ingest");
    let before = env.chunk_files().len();
    let mut ingest = bmr_tests::Cmd::new(BIN)
        .arg("ingest")
        .arg("--store")
        .arg(&env.store)
        .args(["--host", "busy", "--snapshot", "s1"])
        .arg(&big.image)
        .spawn(&env.logs, "busy-ingest")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && ingest.try_status().is_none()
        && env.chunk_files().len() < before + 3
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        ingest.try_status().is_none(),
        "the ingest finished before gc could run; the fixture is too small\n{}",
        ingest.describe()
    );
    let gc = env.gc(false);
    let (status, timed_out) = ingest.wait(Duration::from_secs(600)).unwrap();
    assert!(
        status.success() && !timed_out,
        "the ingest failed while gc ran\n{}\n{}",
        ingest.describe(),
        gc.describe()
    );
    if !gc.success() {
        let last = gc.stderr.lines().last().unwrap_or("");
        assert!(last.starts_with("appliance: error:"), "{}", gc.describe());
    }
    env.verify(&[]).ok();
    assert_eq!(env.chunk_files(), env.referenced(None));
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn concurrent_ingests_are_safe() {
    let a = fixtures::gpt_server().unwrap();
    let b = fixtures::mbr_mixed().unwrap();
    let env = Env::new("concurrent_ingests");
    let spawn = |host: &str, img: &Path| {
        bmr_tests::Cmd::new(BIN)
            .arg("ingest")
            .arg("--store")
            .arg(&env.store)
            .args(["--host", host, "--snapshot", "s1"])
            .arg(img)
            .spawn(&env.logs, &format!("ingest-{host}"))
            .unwrap()
    };
    let mut procs = [
        spawn("a1", &a.image),
        spawn("b1", &b.image),
        spawn("a2", &a.image),
    ];
    for p in procs.iter_mut() {
        let (st, timed_out) = p.wait(Duration::from_secs(300)).unwrap();
        assert!(
            st.success() && !timed_out,
            "concurrent ingest failed\n{}",
            p.describe()
        );
    }
    env.verify(&[]).ok();
    assert_eq!(env.chunk_files(), env.referenced(None));
    let rb = env
        .read_back(env.store.to_str().unwrap(), "a2", "s1", &env.path("rb"))
        .unwrap();
    oracle::compare_disk(&a, &a.image, &rb[0], &env.path("o"), Expect::default())
        .unwrap_or_else(|e| panic!("{e:#}"));
}

// ---------------------------------------------------------------------------------------------
// Bad input: a clear one-line error, or an explicit whole-copy fallback that reads back exactly;
// never a panic, never silent wrong data.

/// Outcome of ingesting a damaged image.
enum BadOutcome {
    Refused(String),
    /// Ingested; the output of the ingest.
    Ingested(Output),
}

/// Ingest `img`; on success the read-back must equal the image everywhere except the free
/// blocks of the partitions listed in `intact` (filesystems the damage does not touch).
fn ingest_bad(env: &Env, host: &str, img: &Path, fx: &Fixture, intact: &[u32]) -> BadOutcome {
    let out = env.ingest(host, Some("s1"), &[img]);
    assert!(
        !out.timed_out,
        "ingest hung on bad input\n{}",
        out.describe()
    );
    assert!(
        out.status.code().is_some(),
        "ingest died of a signal\n{}",
        out.describe()
    );
    if !out.success() {
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let last = lines.last().copied().unwrap_or("");
        assert!(
            last.starts_with("appliance: error:") && last.len() > 25,
            "no clear error line\n{}",
            out.describe()
        );
        assert!(
            lines.len() <= 3,
            "the error is not short\n{}",
            out.describe()
        );
        assert!(
            !env.store.join(format!("hosts/{host}/latest")).exists(),
            "a refused ingest left a snapshot"
        );
        return BadOutcome::Refused(last.to_string());
    }
    let rb = env
        .read_back(
            env.store.to_str().unwrap(),
            host,
            "s1",
            &env.path(&format!("rb-{host}")),
        )
        .unwrap_or_else(|e| panic!("ingest of bad input succeeded but does not read back: {e:#}"));
    let size = std::fs::metadata(img).unwrap().len();
    assert_eq!(
        std::fs::metadata(&rb[0]).unwrap().len(),
        size,
        "read-back size"
    );
    let mut skip: Vec<(u64, u64)> = Vec::new();
    for n in intact {
        let p = fx.partition(*n);
        let part = env.path("intact.img");
        bmr_tests::util::extract(img, p.offset, p.size, &part).unwrap();
        for (s, e) in oracle::free_ranges(p.fs.unwrap(), &part).unwrap() {
            skip.push((p.offset + s, p.offset + e));
        }
    }
    let must: Vec<(u64, u64, String)> = oracle::complement(&skip, size)
        .into_iter()
        .map(|(s, e)| {
            (
                s,
                e,
                "bytes outside intact filesystems' free blocks".to_string(),
            )
        })
        .collect();
    let diffs = oracle::compare_ranges(img, &rb[0], &must).unwrap();
    assert!(
        diffs.is_empty(),
        "bad input ingested without an error, and read back wrong (silent data loss):\n  {}\n{}",
        diffs.join("\n  "),
        out.describe()
    );
    std::fs::remove_file(&rb[0]).ok();
    BadOutcome::Ingested(out)
}

/// A whole-copy fallback must be said, not silent.
fn assert_fallback_said(out: &Output, what: &str) {
    let text = format!("{}\n{}", out.stdout, out.stderr).to_lowercase();
    let said = ["whole", "fallback"].iter().any(|w| text.contains(w));
    assert!(
        said,
        "{what}: ingested without an explicit whole-copy message\n{}",
        out.describe()
    );
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bad_input_truncated_gpt_image() {
    let fx = fixtures::gpt_server().unwrap();
    let env = Env::new("bad_truncated");
    let img = env.path("truncated.img");
    fx.copy_to(&img).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    match ingest_bad(&env, "t", &img, &fx, &[1]) {
        BadOutcome::Refused(line) => eprintln!("refused: {line}"),
        BadOutcome::Ingested(out) => assert_fallback_said(&out, "truncated image"),
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bad_input_garbage_mbr_entries() {
    let fx = fixtures::mbr_mixed().unwrap();
    let env = Env::new("bad_garbage_mbr");
    let img = env.path("garbage.img");
    fx.copy_to(&img).unwrap();
    let junk = bmr_tests::prng::Content::Random {
        seed: 4242,
        len: 64,
    }
    .bytes()
    .unwrap();
    corrupt::write_at(&img, 446, &junk).unwrap();
    match ingest_bad(&env, "g", &img, &fx, &[]) {
        BadOutcome::Refused(line) => eprintln!("refused: {line}"),
        BadOutcome::Ingested(out) => assert_fallback_said(&out, "garbage MBR"),
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bad_input_garbage_gpt_sector() {
    // both GPT headers destroyed, the protective MBR left: no table can be trusted
    let fx = fixtures::gpt_server().unwrap();
    let env = Env::new("bad_garbage_gpt");
    let img = env.path("garbage.img");
    fx.copy_to(&img).unwrap();
    let junk = bmr_tests::prng::Content::Random {
        seed: 4343,
        len: 512 * 33,
    }
    .bytes()
    .unwrap();
    corrupt::write_at(&img, 512, &junk).unwrap();
    corrupt::write_at(&img, fx.size - 512 * 33, &junk).unwrap();
    match ingest_bad(&env, "g", &img, &fx, &[]) {
        BadOutcome::Refused(line) => eprintln!("refused: {line}"),
        BadOutcome::Ingested(out) => assert_fallback_said(&out, "garbage GPT"),
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bad_input_primary_gpt_header_corrupt_uses_backup_or_refuses() {
    let fx = fixtures::gpt_server().unwrap();
    let env = Env::new("bad_primary_gpt");
    let img = env.path("primary.img");
    fx.copy_to(&img).unwrap();
    let mut hdr = corrupt::read_at(&img, 512, 92).unwrap();
    hdr[40] ^= 0xff; // first usable LBA: the header CRC no longer matches
    corrupt::write_at(&img, 512, &hdr).unwrap();
    // the backup GPT is intact: every filesystem is intact
    match ingest_bad(&env, "p", &img, &fx, &[1, 2, 3]) {
        BadOutcome::Refused(line) => eprintln!("refused: {line}"),
        BadOutcome::Ingested(out) => eprintln!("ingested:\n{}", out.describe()),
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bad_input_overlapping_gpt_partitions() {
    let fx = fixtures::gpt_server().unwrap();
    let env = Env::new("bad_overlap_gpt");
    let img = env.path("overlap.img");
    fx.copy_to(&img).unwrap();
    // swap (entry 3) now starts inside the ext4 root (entry 2); CRCs are valid
    corrupt::gpt_edit_entries(&img, 512, |e, size| {
        let (first2, _) = corrupt::gpt_entry_lbas(e, size, 1);
        let (_, last3) = corrupt::gpt_entry_lbas(e, size, 2);
        corrupt::gpt_set_entry_lbas(e, size, 2, first2 + 4096, last3);
    })
    .unwrap();
    let out = bmr_tests::Cmd::new("sgdisk").arg("-v").arg(&img).run();
    assert!(
        out.all().to_lowercase().contains("overlap"),
        "the edit did not make an overlap\n{}",
        out.describe()
    );
    match ingest_bad(&env, "o", &img, &fx, &[1]) {
        BadOutcome::Refused(line) => eprintln!("refused: {line}"),
        BadOutcome::Ingested(out) => assert_fallback_said(&out, "overlapping partitions"),
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bad_input_overlapping_mbr_partitions() {
    let fx = fixtures::mbr_mixed().unwrap();
    let env = Env::new("bad_overlap_mbr");
    let img = env.path("overlap.img");
    fx.copy_to(&img).unwrap();
    let (kind, first, sectors) = corrupt::mbr_entry(&img, 1).unwrap();
    corrupt::mbr_set_entry(&img, 1, kind, first - 8192, sectors).unwrap();
    match ingest_bad(&env, "o", &img, &fx, &[5]) {
        BadOutcome::Refused(line) => eprintln!("refused: {line}"),
        BadOutcome::Ingested(out) => assert_fallback_said(&out, "overlapping MBR partitions"),
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bad_input_ext4_broken_superblock() {
    let fx = fixtures::gpt_server().unwrap();
    let root = fx.partition(2);
    let cases: [(&str, u64, Vec<u8>); 3] = [
        // s_log_block_size = 40: the magic is there, the geometry is impossible
        ("block_size", 1024 + 24, 40u32.to_le_bytes().to_vec()),
        // s_blocks_count_lo far beyond the partition
        (
            "blocks_count",
            1024 + 4,
            0x7fff_ffffu32.to_le_bytes().to_vec(),
        ),
        // s_blocks_per_group = 0
        ("blocks_per_group", 1024 + 32, 0u32.to_le_bytes().to_vec()),
    ];
    for (name, off, bytes) in cases {
        let env = Env::new(&format!("bad_ext4_sb_{name}"));
        let img = env.path("sb.img");
        fx.copy_to(&img).unwrap();
        corrupt::write_at(&img, root.offset + off, &bytes).unwrap();
        match ingest_bad(&env, "x", &img, &fx, &[1, 3]) {
            BadOutcome::Refused(line) => eprintln!("{name}: refused: {line}"),
            BadOutcome::Ingested(out) => {
                assert_fallback_said(&out, &format!("ext4 superblock ({name})"))
            }
        }
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn ingest_refuses_missing_source_and_bad_names() {
    let env = Env::new("bad_args");
    for (host, src) in [
        ("h", PathBuf::from("/nonexistent/disk.img")),
        ("../evil", PathBuf::from("/dev/null")),
        ("h", PathBuf::from("/dev/null")),
    ] {
        let out = env.ingest(host, Some("s1"), &[&src]);
        assert!(
            !out.success(),
            "ingest of {} as {host} succeeded\n{}",
            src.display(),
            out.describe()
        );
        let last = out.stderr.lines().last().unwrap_or("");
        assert!(last.starts_with("appliance: error:"), "{}", out.describe());
    }
    assert!(env.list_json().as_array().is_some_and(|a| a.is_empty()));
}

/// Output into a reader that is gone (`appliance pubkey | true`): the program ends quietly with
/// 141, as a SIGPIPE death would, instead of panicking (which it did before).
#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn a_closed_stdout_ends_quietly() {
    let env = Env::new("closed_stdout");
    let store = &env.store;
    let mut child = std::process::Command::new(BIN)
        .arg("pubkey")
        .arg("--store")
        .arg(store)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the program writes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}
