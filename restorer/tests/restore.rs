//! Acceptance of issue 3: `restorer restore` against `appliance serve` (and a plain static
//! server) on loopback, onto file targets and loop devices, checked with the filesystems' own
//! tools and the fixture oracle. Needs root (loop devices, mount) and `cargo build -p appliance`.

mod common;

use bmr_tests::fixtures::{self, FsKind};
use bmr_tests::util::{Cmd, HttpServer, Workspace};
use common::*;
use snapshot::{Digest, Slot};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn same_size_gpt_exact_then_verify() {
    let env = Env::new("same-size-gpt");
    let fx = fixtures::gpt_server().unwrap();
    let id = env.ingest("web1", &[&fx.image]);
    let srv = env.serve();
    let t = env.file("target.img", fx.size);
    let (out, v) = restore(
        &srv.url,
        "web1",
        &[&t],
        &["--pubkey", env.pubkey().to_str().unwrap()],
    );
    assert!(out.success(), "{}", out.describe());
    check_snapshot_exact(&env, &fx, "web1", &id, 0, &t);
    assert_eq!(v["plan"]["signature_checked"], true);
    assert!(summary_u64(&v, 0, "fetched_bytes") > 0);
    assert!(
        summary_u64(&v, 0, "skipped_bytes") > 0,
        "free space is skipped"
    );
    assert_eq!(
        summary_u64(&v, 0, "hashed_bytes"),
        0,
        "a blank target is not read back"
    );
    let out = restorer()
        .args(["verify", "--from", &srv.url, "--host", "web1", "--target"])
        .arg(&t)
        .run();
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("0 differ"), "{}", out.describe());
}

/// gpt_server without its swap partition: ext4 is last and grows.
fn ext_last_fixture() -> fixtures::Fixture {
    let mut spec = fixtures::gpt_server_spec();
    spec.name = "restorer_gpt_ext_last".into();
    spec.parts.retain(|p| p.number != 3);
    fixtures::build(&spec).unwrap()
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bigger_target_grows_ext4() {
    let env = Env::new("bigger-ext4");
    let fx = ext_last_fixture();
    env.ingest("web2", &[&fx.image]);
    let srv = env.serve();
    let t = env.file("target.img", fx.size + 512 * MIB);
    let (out, v) = restore(&srv.url, "web2", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());
    let resized = v["disks"][0]["resized"].to_string();
    assert!(resized.contains("resize2fs"), "{v}");
    let parts = check_restored(&fx, &t, &env.dir.join("scratch"));
    let root = parts.iter().find(|p| p.number == 2).unwrap();
    assert!(root.size >= fx.partition(2).size + 500 * MIB, "{parts:?}");
    // The filesystem fills its grown partition.
    let img = env.dir.join("root.img");
    bmr_tests::util::extract(&t, root.offset, root.size, &img).unwrap();
    let out = Cmd::new("dumpe2fs").arg("-h").arg(&img).ok();
    let blocks: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .map(|s| s.trim().parse().unwrap())
        .unwrap();
    assert!(
        blocks * 4096 + 4 * MIB >= root.size,
        "{blocks} blocks in {}",
        root.size
    );
    // verify: identical outside the grown filesystem, whose changes are expected.
    let out = restorer()
        .args([
            "verify", "--json", "--from", &srv.url, "--host", "web2", "--target",
        ])
        .arg(&t)
        .run();
    assert!(out.success(), "{}", out.describe());
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn mbr_fat16_ntfs_logical_same_size() {
    let env = Env::new("mbr-mixed");
    let fx = fixtures::mbr_mixed().unwrap();
    let id = env.ingest("dos1", &[&fx.image]);
    let srv = env.serve();
    let same = env.file("same.img", fx.size);
    let (out, _) = restore(&srv.url, "dos1", &[&same], &[]);
    assert!(out.success(), "{}", out.describe());
    check_snapshot_exact(&env, &fx, "dos1", &id, 0, &same);
    let out = Cmd::new("sfdisk").arg("--json").arg(&same).ok();
    assert!(out.stdout.contains("0x12345678"), "{}", out.stdout);
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn mbr_bigger_grows_the_logical_ext2() {
    let env = Env::new("mbr-bigger");
    let fx = fixtures::mbr_mixed().unwrap();
    env.ingest("dos2", &[&fx.image]);
    let srv = env.serve();
    let big = env.file("big.img", fx.size + 256 * MIB);
    let (out, v) = restore(&srv.url, "dos2", &[&big], &[]);
    assert!(out.success(), "{}", out.describe());
    let parts = check_restored(&fx, &big, &env.dir.join("scratch-big"));
    // The logical ext2 partition (and its extended container) grew; the signature is kept.
    let logical = parts.iter().find(|p| p.number == 5).unwrap();
    assert!(
        logical.size > fx.partition(5).size + 200 * MIB,
        "{parts:?} {v}"
    );
    let out = Cmd::new("sfdisk").arg("--json").arg(&big).ok();
    assert!(out.stdout.contains("0x12345678"), "{}", out.stdout);
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn two_disk_host() {
    let env = Env::new("two-disks");
    let a = fixtures::gpt_server().unwrap();
    let b = fixtures::mbr_mixed().unwrap();
    let id = env.ingest("db1", &[&a.image, &b.image]);
    let srv = env.serve();
    let ta = env.file("a.img", a.size);
    let tb = env.file("b.img", b.size);
    let (out, v) = restore(&srv.url, "db1", &[&ta, &tb], &[]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(v["disks"].as_array().unwrap().len(), 2);
    check_snapshot_exact(&env, &a, "db1", &id, 0, &ta);
    check_snapshot_exact(&env, &b, "db1", &id, 1, &tb);
    // Too few targets is refused before anything is written.
    let (out, _) = restore(&srv.url, "db1", &[&ta], &[]);
    assert!(
        !out.success() && out.stderr.contains("2 disk(s)"),
        "{}",
        out.describe()
    );
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn sector_size_conversion_512_to_4kn_and_back() {
    let env = Env::new("4kn");
    let fx = fixtures::gpt_server().unwrap();
    env.ingest("web4", &[&fx.image]);
    let srv = env.serve();
    let file = env.file("4kn.img", fx.size);
    let dev = LoopDev::attach(&file, 4096);
    let (out, v) = restore(&srv.url, "web4", &[&dev.path], &[]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(v["plan"]["disks"][0]["target_sector"], 4096);
    check_restored(&fx, &dev.path, &env.dir.join("scratch"));
    let out = restorer()
        .args(["verify", "--from", &srv.url, "--host", "web4", "--target"])
        .arg(&dev.path)
        .run();
    assert!(out.success(), "{}", out.describe());
    drop(dev);

    // A 4Kn source onto a 512-byte device.
    let fx4 = fixtures::gpt_4k().unwrap();
    env.ingest("web4k", &[&fx4.image]);
    let file = env.file("512.img", fx4.size);
    let dev = LoopDev::attach(&file, 512);
    let (out, _) = restore(&srv.url, "web4k", &[&dev.path], &[]);
    assert!(out.success(), "{}", out.describe());
    check_restored(&fx4, &dev.path, &env.dir.join("scratch4k"));
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn plain_static_http_server() {
    let env = Env::new("static-http");
    let fx = fixtures::gpt_server().unwrap();
    let id = env.ingest("web5", &[&fx.image]);
    let srv = HttpServer::python(&env.store, &env.logs).unwrap();
    let t = env.file("target.img", fx.size);
    let (out, _) = restore(
        &srv.url,
        "web5",
        &[&t],
        &["--pubkey", env.pubkey().to_str().unwrap()],
    );
    assert!(out.success(), "{}", out.describe());
    check_snapshot_exact(&env, &fx, "web5", &id, 0, &t);
}

/// A CA and a certificate it signed for 127.0.0.1, made with `openssl` in `dir`:
/// (ca.pem, cert.pem, key.pem).
fn make_ca(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let p = |f: &str| d.join(f);
    Cmd::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={name} test CA")])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem"))
        .ok();
    Cmd::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("key.pem"))
        .arg("-out")
        .arg(p("req.pem"))
        .ok();
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    Cmd::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("req.pem"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("cert.pem"))
        .ok();
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn https_with_the_stores_ca() {
    let env = Env::new("https");
    let fx = fixtures::gpt_server().unwrap();
    let id = env.ingest("web15", &[&fx.image]);
    let (other_ca, _, _) = make_ca(&env.dir, "other");
    // The appliance's own HTTPS: the CA and certificate `appliance init` made.
    let ca = env.store.join("private/tls/ca.pem");
    let srv =
        HttpServer::appliance_tls(&Workspace::bin("appliance"), &env.store, &env.logs).unwrap();
    let t = env.file("target.img", fx.size);

    // Not trusted: the server's certificate is refused, before any write.
    for extra in [vec![], vec!["--ca", other_ca.to_str().unwrap()]] {
        let (out, _) = restore(&srv.url, "web15", &[&t], &extra);
        assert!(!out.success(), "{}", out.describe());
        assert!(
            out.stderr.to_lowercase().contains("certificate"),
            "names the certificate problem: {}",
            out.describe()
        );
        assert_eq!(allocated(&t), 0, "the target was written");
    }

    // Trusted through --ca: exact.
    let (out, _) = restore(
        &srv.url,
        "web15",
        &[&t],
        &[
            "--ca",
            ca.to_str().unwrap(),
            "--pubkey",
            env.pubkey().to_str().unwrap(),
        ],
    );
    assert!(out.success(), "{}", out.describe());
    check_snapshot_exact(&env, &fx, "web15", &id, 0, &t);

    // Any other TLS server with a certificate from a private CA works the same way.
    let (ca, cert, key) = make_ca(&env.dir, "ours");
    let py = HttpServer::python_tls(&env.store, &env.logs, &cert, &key).unwrap();
    let t2 = env.file("target2.img", fx.size);
    let (out, _) = restore(&py.url, "web15", &[&t2], &["--ca", ca.to_str().unwrap()]);
    assert!(out.success(), "{}", out.describe());
    check_snapshot_exact(&env, &fx, "web15", &id, 0, &t2);
}

/// Wait until `pred` or panic after `secs`.
fn wait_until(secs: u64, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes of a file actually allocated (a sparse target fills as the restore writes).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn appliance_stopped_and_restarted_mid_restore() {
    let env = Env::new("appliance-restart");
    let fx = fixtures::gpt_server().unwrap();
    let id = env.ingest("web6", &[&fx.image]);
    let port = bmr_tests::util::free_port();
    let mut server = serve_on(&env, port, "serve-1");
    let proxy = Proxy::start(port, 8 << 20);
    let url = format!("http://127.0.0.1:{}/store", proxy.port);
    let t = env.file("target.img", fx.size);
    let mut r = Cmd::new(env!("CARGO_BIN_EXE_restorer"))
        .args([
            "restore", "--json", "--jobs", "2", "--from", &url, "--host", "web6", "--target",
        ])
        .arg(&t)
        .spawn(&env.logs, "restore")
        .unwrap();
    wait_until(60, "the restore to write data", || allocated(&t) > 8 * MIB);
    server.stop(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        r.try_status().is_none(),
        "the restore gave up: {}",
        r.describe()
    );
    let _server = serve_on(&env, port, "serve-2");
    let (st, timed_out) = r.wait(Duration::from_secs(300)).unwrap();
    assert!(st.success() && !timed_out, "{}", r.describe());
    assert!(
        r.stderr().contains("retrying"),
        "no fault was seen: {}",
        r.describe()
    );
    check_snapshot_exact(&env, &fx, "web6", &id, 0, &t);
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn killed_and_rerun_fetches_only_what_is_missing() {
    let env = Env::new("kill-rerun");
    let fx = fixtures::gpt_server().unwrap();
    let id = env.ingest("web7", &[&fx.image]);
    let srv = env.serve();
    let proxy = Proxy::start(srv.port, 8 << 20);
    let url = format!("http://127.0.0.1:{}/store", proxy.port);
    let t = env.file("target.img", fx.size);
    let mut r = Cmd::new(env!("CARGO_BIN_EXE_restorer"))
        .args([
            "restore", "--json", "--jobs", "2", "--from", &url, "--host", "web7", "--target",
        ])
        .arg(&t)
        .spawn(&env.logs, "restore-1")
        .unwrap();
    wait_until(60, "the restore to write data", || allocated(&t) > 24 * MIB);
    r.signal(libc::SIGKILL);
    let _ = r.wait(Duration::from_secs(10));
    assert!(
        !has_table(&t),
        "an interrupted restore must not leave a valid table"
    );

    let index = read_index(&env, "web7", &id, 0);
    let wrong = wrong_slots(&index, &t);
    let needed: HashSet<Digest> = wrong
        .iter()
        .chain([0, index.len() - 1].iter()) // the table slots are always rewritten
        .filter_map(|&i| match index.slot(i) {
            Slot::Data(d) => Some(d),
            _ => None,
        })
        .collect();
    let total: HashSet<Digest> = index
        .slots()
        .filter_map(|(_, s)| match s {
            Slot::Data(d) => Some(d),
            _ => None,
        })
        .collect();
    assert!(
        needed.len() < total.len(),
        "the first run wrote nothing useful"
    );

    let (out, v) = restore(&srv.url, "web7", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("interrupted restore"),
        "{}",
        out.describe()
    );
    let fetched = summary_u64(&v, 0, "fetched_chunks");
    assert!(
        fetched <= needed.len() as u64,
        "fetched {fetched} chunks, only {} were missing or wrong",
        needed.len()
    );
    assert!(summary_u64(&v, 0, "verified_in_place_slots") > 0);
    check_snapshot_exact(&env, &fx, "web7", &id, 0, &t);
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn corrupted_chunk_fails_and_leaves_no_table() {
    let env = Env::new("corrupt-chunk");
    let fx = fixtures::gpt_server().unwrap();
    let id = env.ingest("web8", &[&fx.image]);
    let index = read_index(&env, "web8", &id, 0);
    // A data chunk in the middle of the disk (ext4 data).
    let (slot, d) = index
        .slots()
        .filter_map(|(i, s)| match s {
            Slot::Data(d) if i > 20 => Some((i, d)),
            _ => None,
        })
        .next()
        .unwrap();
    let blob = env.store.join(d.chunk_path());
    let mut b = std::fs::read(&blob).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x55;
    std::fs::write(&blob, b).unwrap();
    let srv = env.serve();
    // The target starts as a valid disk: the failed restore must not leave its table behind.
    let t = env.dir.join("target.img");
    fx.copy_to(&t).unwrap();
    assert!(has_table(&t));
    let (out, _) = restore(&srv.url, "web8", &[&t], &[]);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains(&d.hex()),
        "the error names the chunk: {}",
        out.describe()
    );
    assert!(out.stderr.contains("wiped"), "{}", out.describe());
    assert!(
        !has_table(&t),
        "slot {slot}: the target still has a valid partition table"
    );
    // With --keep-on-error the data stays, the table still is not valid (it is written last).
    // (A blank target: the one above already holds the chunk's correct bytes from the copy, and a
    // rerun verifies them in place instead of fetching the corrupt blob.)
    let blank = env.file("blank.img", fx.size);
    let (out, _) = restore(&srv.url, "web8", &[&blank], &["--keep-on-error"]);
    assert!(
        !out.success() && out.stderr.contains("kept"),
        "{}",
        out.describe()
    );
    assert!(!has_table(&blank));
    assert!(allocated(&blank) > 0, "what was written is kept");
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn tampered_manifest_refused_before_any_write() {
    let env = Env::new("tampered");
    let fx = fixtures::gpt_server().unwrap();
    let id = env.ingest("web9", &[&fx.image]);
    let m = env
        .store
        .join(format!("hosts/web9/snapshots/{id}/manifest.json"));
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, text.replacen("\"web9\"", "\"web9\" ", 1)).unwrap();
    let srv = env.serve();
    let t = env.dir.join("target.img");
    fx.copy_to(&t).unwrap();
    let before = sha(&t);
    let (out, _) = restore(
        &srv.url,
        "web9",
        &[&t],
        &["--pubkey", env.pubkey().to_str().unwrap()],
    );
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains("signature"), "{}", out.describe());
    assert_eq!(sha(&t), before, "the target was written");
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn too_small_mounted_and_root_targets_refused() {
    let env = Env::new("refusals");
    let fx = fixtures::gpt_server().unwrap();
    env.ingest("web10", &[&fx.image]);
    let srv = env.serve();
    // Smaller than the used data: no shrinking makes it fit (tests/shrink.rs restores onto a
    // smaller disk that can hold it).
    let small = env.file("small.img", 8 * MIB);
    std::fs::write(&small, vec![0xa5u8; (8 * MIB) as usize]).unwrap();
    let before = sha(&small);
    let (out, _) = restore(&srv.url, "web10", &[&small], &[]);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("too small")
            && out.stderr.contains(&fx.size.to_string())
            && out.stderr.contains("needs at least"),
        "names the size needed: {}",
        out.describe()
    );
    assert_eq!(sha(&small), before);

    // A mounted target (a filesystem on the whole loop device), mounted read-only so that the
    // kernel itself writes nothing to it (a read-write ext4 gets journal commits and superblock
    // updates at any time): a changed hash can only be the restorer's doing.
    let file = env.file("mounted.img", fx.size);
    let tree = env.dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("keep.txt"), "keep").unwrap();
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&file)
        .ok();
    let dev = LoopDev::attach(&file, 512);
    let mnt = Mount::read_only(&dev.path, &env.dir.join("mnt"));
    assert!(mnt.dir.join("keep.txt").exists());
    let before = sha(&dev.path);
    let (out, _) = restore(&srv.url, "web10", &[&dev.path], &[]);
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains("mounted"), "{}", out.describe());
    assert_eq!(sha(&dev.path), before);
    drop(mnt);
    drop(dev);

    // The disk of the running system's root (checked with --dry-run: nothing is opened for writing).
    let root = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .and_then(|l| {
            l.split(" - ")
                .nth(1)
                .and_then(|r| r.split(' ').nth(1))
                .map(String::from)
        })
        .unwrap();
    if root.starts_with("/dev/") && Path::new(&root).exists() {
        let (out, _) = restore(&srv.url, "web10", &[Path::new(&root)], &["--dry-run"]);
        assert!(!out.success(), "{}", out.describe());
        assert!(
            out.stderr.contains("root")
                || out.stderr.contains("mounted")
                || out.stderr.contains("partition"),
            "{}",
            out.describe()
        );
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn dry_run_shows_the_plan_and_writes_nothing() {
    let env = Env::new("dry-run");
    let fx = ext_last_fixture();
    env.ingest("web11", &[&fx.image]);
    let srv = env.serve();
    let t = env.file("target.img", fx.size + 64 * MIB);
    let before = sha(&t);
    let (out, v) = restore(&srv.url, "web11", &[&t], &["--dry-run"]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(sha(&t), before);
    let d = &v["plan"]["disks"][0];
    assert_eq!(d["table"], "gpt");
    assert_eq!(d["fit"], "bigger");
    assert!(d["resize"][0]["kind"] == "ext", "{d}");
    let out = restorer()
        .args([
            "restore",
            "--dry-run",
            "--from",
            &srv.url,
            "--host",
            "web11",
            "--target",
        ])
        .arg(&t)
        .ok();
    assert!(
        out.stdout.contains("resize2fs") && out.stdout.contains("nothing written"),
        "{}",
        out.stdout
    );
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn verify_lists_differing_slots() {
    let env = Env::new("verify-diff");
    let fx = fixtures::gpt_server().unwrap();
    env.ingest("web12", &[&fx.image]);
    let srv = env.serve();
    let t = env.file("target.img", fx.size);
    let (out, _) = restore(&srv.url, "web12", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());
    // Damage a file's data in the ext4 partition.
    let p = fx.partition(2);
    let ext_img = env.dir.join("p2.img");
    bmr_tests::util::extract(&t, p.offset, p.size, &ext_img).unwrap();
    let f = &p.files.iter().max_by_key(|f| f.size).unwrap().path;
    let out = Cmd::new("debugfs")
        .arg("-R")
        .arg(format!("bmap /{f} 0"))
        .arg(&ext_img)
        .ok();
    let block: u64 = out.stdout.trim().parse().unwrap();
    let off = p.offset + block * 4096;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
        file.write_all_at(b"DAMAGED!", off).unwrap();
    }
    let out = restorer()
        .args([
            "verify", "--json", "--from", &srv.url, "--host", "web12", "--target",
        ])
        .arg(&t)
        .run();
    assert!(!out.success(), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let diffs = v["disks"][0]["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{v}");
    assert_eq!(diffs[0]["slot"], off / (4 << 20));
    assert_eq!(diffs[0]["partition"], 2);
    let _ = FsKind::Ext4;
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn capture_through_the_api_then_restore() {
    let env = Env::new("capture");
    let fx = fixtures::gpt_server().unwrap();
    let srv = env.serve();
    let base = srv.url.trim_end_matches("/store").to_string();
    let out = restorer()
        .args(["capture", "--json", "--to", &base, "--host", "cap1"])
        .arg(&fx.image)
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["uploaded_chunks"].as_u64().unwrap() > 0, "{v}");
    let t = env.file("target.img", fx.size);
    let (out, _) = restore(
        &srv.url,
        "cap1",
        &[&t],
        &["--pubkey", env.pubkey().to_str().unwrap()],
    );
    assert!(out.success(), "{}", out.describe());
    check_exact(&fx, &t, &env.dir.join("scratch"));
    // A second capture of the same disk sends no chunk.
    let out = restorer()
        .args(["capture", "--json", "--to", &base, "--host", "cap1"])
        .arg(&fx.image)
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["uploaded_chunks"], 0, "{v}");
    // The snapshot equals what ingest makes of the same image (same used-block logic).
    let id = env.ingest("ing1", &[&fx.image]);
    let a = read_index(&env, "ing1", &id, 0);
    let cap_id = v["snapshot"].as_str().unwrap();
    let b = read_index(&env, "cap1", cap_id, 0);
    assert_eq!(a, b, "capture and ingest chunk the disk the same way");
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bigger_target_recreates_swap_with_its_uuid_and_label() {
    let env = Env::new("bigger-swap");
    let fx = fixtures::gpt_server().unwrap();
    env.ingest("web13", &[&fx.image]);
    let srv = env.serve();
    let t = env.file("target.img", fx.size + 128 * MIB);
    let (out, v) = restore(&srv.url, "web13", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        v["disks"][0]["resized"].to_string().contains("mkswap"),
        "{v}"
    );
    let parts = check_restored(&fx, &t, &env.dir.join("scratch"));
    let swap = parts.iter().find(|p| p.number == 3).unwrap();
    assert!(swap.size > fx.partition(3).size + 100 * MIB, "{parts:?}");
    let img = env.dir.join("swap.img");
    bmr_tests::util::extract(&t, swap.offset, swap.size, &img).unwrap();
    let out = Cmd::new("blkid").args(["-o", "export"]).arg(&img).ok();
    let want = fx.partition(3);
    assert!(out.stdout.contains("TYPE=swap"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("UUID={}", want.uuid.as_deref().unwrap())),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("LABEL={}", want.label.as_deref().unwrap())),
        "{}",
        out.stdout
    );
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bearer_token_is_sent() {
    let env = Env::new("token");
    let fx = fixtures::mbr_mixed().unwrap();
    env.ingest("web14", &[&fx.image]);
    let token = "restore-token-0123456789abcdef";
    std::fs::write(
        env.store.join("private/tokens.json"),
        format!(r#"{{"tokens":[{{"token":"{token}","access":"read","hosts":["web14"]}}]}}"#),
    )
    .unwrap();
    let srv = env.serve();
    let t = env.file("target.img", fx.size);
    let before = sha(&t);
    let (out, _) = restore(&srv.url, "web14", &[&t], &["--retry-for", "2s"]);
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains("401"), "{}", out.describe());
    assert_eq!(sha(&t), before);
    let (out, _) = restore(&srv.url, "web14", &[&t], &["--token", token]);
    assert!(out.success(), "{}", out.describe());
    assert!(has_table(&t));
}

/// A Windows-like GPT disk: the ESP of gpt_server and the NTFS of mbr_mixed, NTFS last.
fn windows_fixture() -> fixtures::Fixture {
    let gpt = fixtures::gpt_server_spec();
    let esp = gpt.parts[0].clone();
    let mut ntfs = fixtures::mbr_mixed_spec()
        .parts
        .into_iter()
        .find(|p| p.number == 2)
        .unwrap();
    ntfs.start = esp.start + esp.sectors;
    ntfs.gpt_type = Some("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7".into());
    ntfs.uuid = Some("B3E0C1A2-0002-4E7A-9C1B-2D3E4F5060AA".into());
    ntfs.name = Some("Basic data partition".into());
    ntfs.mbr_type = None;
    ntfs.bootable = false;
    let size = (ntfs.start + ntfs.sectors) * 512 + MIB;
    let spec = fixtures::DiskSpec {
        name: "restorer_gpt_windows".into(),
        sector_size: 512,
        size,
        table: gpt.table,
        parts: vec![esp, ntfs],
    };
    fixtures::build(&spec).unwrap()
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bigger_target_grows_ntfs() {
    let env = Env::new("bigger-ntfs");
    let fx = windows_fixture();
    let id = env.ingest("win1", &[&fx.image]);
    let srv = env.serve();
    let same = env.file("same.img", fx.size);
    let (out, _) = restore(&srv.url, "win1", &[&same], &[]);
    assert!(out.success(), "{}", out.describe());
    check_snapshot_exact(&env, &fx, "win1", &id, 0, &same);
    let t = env.file("target.img", fx.size + 256 * MIB);
    let (out, v) = restore(&srv.url, "win1", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        v["disks"][0]["resized"].to_string().contains("ntfsresize"),
        "{v}"
    );
    let parts = check_restored(&fx, &t, &env.dir.join("scratch"));
    let p = parts.iter().find(|p| p.number == 2).unwrap();
    assert!(p.size > fx.partition(2).size + 200 * MIB, "{parts:?}");
}
