//! Shared by the restorer's integration tests: a store with snapshots of the fixtures made by the
//! real `appliance` binary, the `restorer` binary, loop devices that are always detached, and
//! checks of a restored disk with the filesystems' own tools.
//!
//! `appliance` must be built in the same target directory and profile first
//! (`cargo build -p appliance`); `cargo test -p restorer` builds `restorer` itself.

#![allow(dead_code)]

use bmr_tests::fixtures::Fixture;
use bmr_tests::oracle;
use bmr_tests::util::{extract, Cmd, HttpServer, Output, Workspace};
use snapshot::{ChunkIndex, Digest, Slot};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const MIB: u64 = 1 << 20;

/// One test's working directory, with a store initialised by `appliance init`.
pub struct Env {
    pub dir: bmr_tests::Artifacts,
    pub store: PathBuf,
    pub logs: PathBuf,
}

impl Env {
    pub fn new(test: &str) -> Env {
        let dir = Workspace::artifacts(&format!("restorer-{test}"));
        let store = dir.join("store");
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        appliance().arg("init").arg("--store").arg(&store).ok();
        Env { dir, store, logs }
    }

    /// `appliance ingest` of `images` (one per disk) as `host`; returns the snapshot id.
    pub fn ingest(&self, host: &str, images: &[&Path]) -> String {
        let out = appliance()
            .args(["ingest", "--json", "--host", host, "--store"])
            .arg(&self.store)
            .args(images)
            .timeout(Duration::from_secs(600))
            .ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("ingest --json printed no JSON ({e}): {}", out.describe()));
        v["snapshot"].as_str().expect("snapshot id").to_string()
    }

    /// `appliance serve` over the store (URL ends in `/store`).
    pub fn serve(&self) -> HttpServer {
        HttpServer::appliance(&Workspace::bin("appliance"), &self.store, &self.logs)
            .expect("starting appliance serve")
    }

    pub fn pubkey(&self) -> PathBuf {
        self.store.join("pubkey")
    }

    /// A new sparse file of `size` bytes in the test directory.
    pub fn file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }
}

pub fn appliance() -> Cmd {
    Cmd::new(Workspace::bin("appliance")).timeout(Duration::from_secs(300))
}

pub fn restorer() -> Cmd {
    Cmd::new(env!("CARGO_BIN_EXE_restorer")).timeout(Duration::from_secs(600))
}

/// `restorer restore --json ...`; returns the output (not checked) and the parsed JSON if any.
pub fn restore(
    from: &str,
    host: &str,
    targets: &[&Path],
    extra: &[&str],
) -> (Output, serde_json::Value) {
    let t: Vec<String> = targets.iter().map(|p| p.display().to_string()).collect();
    let out = restorer()
        .args([
            "restore", "--json", "--from", from, "--host", host, "--target",
        ])
        .arg(t.join(","))
        .args(extra)
        .run()
        .no_panic();
    let v = serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, v)
}

/// A loop device over a file, detached when dropped.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path, sector: u32) -> LoopDev {
        let out = Cmd::new("losetup")
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(file)
            .ok();
        LoopDev {
            path: PathBuf::from(out.stdout.trim()),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A mount, unmounted when dropped.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// Mounts `dev` read-only: the kernel then writes nothing to it (no journal commit, no
    /// superblock update, no lazy init), so any change to the device is someone else's.
    pub fn read_only(dev: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        Cmd::new("mount")
            .args(["-o", "ro,noload"])
            .arg(dev)
            .arg(dir)
            .ok();
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A partition as the target's table (read by `sfdisk`) has it, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct TargetPart {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
}

/// The partitions of `target` read by `sfdisk --json` (an independent reader of GPT and MBR).
pub fn target_table(target: &Path) -> Result<(String, Vec<TargetPart>), String> {
    let out = Cmd::new("sfdisk").arg("--json").arg(target).run();
    if !out.success() {
        return Err(out.all());
    }
    let v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
    let t = &v["partitiontable"];
    let sector = t["sectorsize"].as_u64().unwrap_or(512);
    let label = t["label"].as_str().unwrap_or("").to_string();
    let parts = t["partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let node = p["node"].as_str().unwrap_or("");
                    let digits: String = node
                        .chars()
                        .rev()
                        .take_while(|c| c.is_ascii_digit())
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    TargetPart {
                        number: digits.parse().unwrap_or(0),
                        offset: p["start"].as_u64().unwrap_or(0) * sector,
                        size: p["size"].as_u64().unwrap_or(0) * sector,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((label, parts))
}

/// Check every filesystem of `fx` on the restored `target` (file or device): partition where
/// the fixture has it, the checker clean (`e2fsck -fn`, `fsck.fat -n`, `ntfsfix -n`) and every
/// file identical. Returns the partitions found, for size checks.
pub fn check_restored(fx: &Fixture, target: &Path, scratch: &Path) -> Vec<TargetPart> {
    std::fs::create_dir_all(scratch).unwrap();
    let (_, parts) = target_table(target)
        .unwrap_or_else(|e| panic!("{}: no readable partition table: {e}", target.display()));
    for p in fx.partitions.iter().filter(|p| !p.extended) {
        let t = parts
            .iter()
            .find(|t| t.number == p.number)
            .unwrap_or_else(|| {
                panic!(
                    "partition {} missing on {}: {parts:?}",
                    p.number,
                    target.display()
                )
            });
        assert_eq!(t.offset, p.offset, "partition {} moved", p.number);
        assert!(t.size >= p.size, "partition {} shrank", p.number);
        let Some(kind) = p.fs else { continue };
        let img = scratch.join(format!("part{}.img", p.number));
        extract(target, t.offset, t.size, &img).unwrap();
        if kind == bmr_tests::FsKind::Ntfs && t.size > p.size {
            // ntfsresize schedules a chkdsk for Windows' next boot (the dirty flag), which
            // ntfs-3g's tools then refuse: clear it on this scratch copy only.
            Cmd::new("ntfsfix").arg("-d").arg(&img).ok();
        }
        oracle::fsck(kind, &img)
            .unwrap_or_else(|e| panic!("partition {} on {}: {e:#}", p.number, target.display()));
        let problems = oracle::check_files(kind, &img, &p.files, scratch).unwrap();
        assert!(
            problems.is_empty(),
            "partition {} on {}: {}",
            p.number,
            target.display(),
            problems.join("\n")
        );
        let _ = std::fs::remove_file(&img);
    }
    parts
}

/// A restored file is exact: every byte the fixture's filesystems use, every byte outside the
/// partitions, filesystems clean, files identical (the fixture oracle). Swap pages are whatever
/// the snapshot stored (that is ingest's business, checked by its own tests); the restore is
/// checked against the snapshot itself by [`wrong_slots`].
pub fn check_exact(fx: &Fixture, target: &Path, scratch: &Path) {
    let expect = oracle::Expect {
        deleted_absent: true,
        swap_zeroed: false,
    };
    oracle::compare_disk(fx, &fx.image, target, scratch, expect)
        .unwrap_or_else(|e| panic!("{} differs from {}: {e:#}", target.display(), fx.name));
}

/// Slots of `target` that do not hold what `index` says (unused slots are never wrong).
pub fn wrong_slots(index: &ChunkIndex, target: &Path) -> Vec<usize> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(target).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    for (i, slot) in index.slots() {
        let (off, len) = index.span(i);
        let buf = &mut buf[..len as usize];
        f.read_exact_at(buf, off).unwrap();
        let ok = match slot {
            Slot::Unused => true,
            Slot::Zeros => bmr_tests::util::is_zero(buf),
            Slot::Data(d) => Digest::of(buf) == d,
        };
        if !ok {
            out.push(i);
        }
    }
    out
}

/// The chunk index of disk `disk` of a snapshot in the test's store.
pub fn read_index(env: &Env, host: &str, id: &str, disk: u32) -> ChunkIndex {
    let p = env
        .store
        .join(format!("hosts/{host}/snapshots/{id}/disk{disk}.idx"));
    ChunkIndex::parse(&std::fs::read(&p).unwrap(), "test").unwrap()
}

/// Exact against the snapshot (every slot but the table's, which the restore rewrites) and
/// against the fixture (see [`check_exact`]).
pub fn check_snapshot_exact(
    env: &Env,
    fx: &Fixture,
    host: &str,
    id: &str,
    disk: u32,
    target: &Path,
) {
    let index = read_index(env, host, id, disk);
    let wrong = wrong_slots(&index, target);
    // Slot 0 and the last hold the GPT/MBR, rewritten by the restore for the target.
    let unexpected: Vec<usize> = wrong
        .into_iter()
        .filter(|&i| i != 0 && i != index.len() - 1)
        .collect();
    assert!(
        unexpected.is_empty(),
        "slots differ from the snapshot: {unexpected:?}"
    );
    check_exact(fx, target, &env.dir.join(format!("scratch-{disk}")));
}

/// SHA-256 of a whole file or device.
pub fn sha(p: &Path) -> String {
    bmr_tests::util::sha256_file(p).unwrap()
}

/// Whether the disk has a partition table `sfdisk` can read.
pub fn has_table(target: &Path) -> bool {
    target_table(target).is_ok()
}

/// Field `k` of disk `n` of a restore's JSON summary.
pub fn summary_u64(v: &serde_json::Value, n: usize, k: &str) -> u64 {
    v["disks"][n][k]
        .as_u64()
        .unwrap_or_else(|| panic!("no disks[{n}].{k} in {v}"))
}

/// A TCP proxy on 127.0.0.1 that forwards to `upstream` with the server-to-client direction
/// throttled, so a restore lasts long enough to be interrupted. Stops accepting when dropped.
pub struct Proxy {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16, bytes_per_sec: u64) -> Proxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = c else { continue };
                std::thread::spawn(move || {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        let _ = client.shutdown(Shutdown::Both);
                        return;
                    };
                    let (mut c_r, mut c_w) = (client.try_clone().unwrap(), client);
                    let (mut u_r, mut u_w) = (up.try_clone().unwrap(), up);
                    let t = std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = c_r.read(&mut buf) {
                            if n == 0 || u_w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = u_w.shutdown(Shutdown::Write);
                    });
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n) = u_r.read(&mut buf) {
                        if n == 0 || c_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_secs_f64(
                            n as f64 / bytes_per_sec as f64,
                        ));
                    }
                    let _ = c_w.shutdown(Shutdown::Both);
                    let _ = t.join();
                });
            }
        });
        Proxy { port, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `appliance serve` on a given port (to restart it where a client expects it).
pub fn serve_on(env: &Env, port: u16, name: &str) -> bmr_tests::util::Background {
    let mut cmd = Command::new(Workspace::bin("appliance"));
    cmd.arg("serve")
        .arg("--store")
        .arg(&env.store)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"));
    let bg = bmr_tests::util::Background::start(&mut cmd, &env.logs, name).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "appliance serve did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    bg
}
