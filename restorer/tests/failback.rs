//! `restorer failback` against `appliance serve` and a real failover VM (QEMU, TCG): a drifted
//! target and a blank one end exact; the appliance killed in the middle of a round and the
//! network cut during a transfer either finish exact or stop with a clear reason, and the VM's
//! data is intact either way.
//!
//! The VM boots nothing (its disk is test data); its disk is written through QEMU's block layer
//! (HMP `qemu-io`), which is exactly where a guest's writes land. The truth a target is compared
//! with is the VM's final qcow2 chain read by `qemu-img convert`.
//!
//! `appliance` must be built in the same target dir (`cargo build -p appliance`).

use bmr_tests::prng::Prng;
use bmr_tests::util::{free_port, Background, Workspace};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SLOT: u64 = 4 * MIB;

fn have_qemu() -> bool {
    ["qemu-system-x86_64", "qemu-img"]
        .iter()
        .all(|p| Command::new(p).arg("--version").output().is_ok())
}

fn appliance(args: &[&str]) -> Output {
    Command::new(Workspace::bin("appliance"))
        .args(args)
        .output()
        .expect("runs appliance")
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let out = appliance(args);
    assert!(
        out.status.success(),
        "appliance {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A store with one snapshot running as failover VM `vm`, served by `appliance serve` on a
/// fixed port (so it can be killed and started again at the same address).
struct Setup {
    /// Removed after the VM is stopped (by `Drop`, before the fields), kept if the test fails.
    dir: bmr_tests::Artifacts,
    store: PathBuf,
    vm: String,
    qmp: PathBuf,
    port: u16,
    server: Option<Background>,
    /// What the snapshot holds.
    image: Vec<u8>,
}

impl Setup {
    fn new(test: &str, size: u64, random: u64) -> Setup {
        let mut image = vec![0u8; size as usize];
        Prng::new(size ^ random).fill(&mut image[..random as usize]);
        Setup::with_image(test, image)
    }

    /// As [`Setup::new`], with the snapshot's disk given.
    fn with_image(test: &str, image: Vec<u8>) -> Setup {
        let dir = Workspace::artifacts(&format!("failback-{test}"));
        let store = dir.join("store");
        let s = store.to_str().unwrap().to_string();
        ok(&["init", "--store", &s]);
        let img = dir.join("source.raw");
        std::fs::write(&img, &image).unwrap();
        ok(&[
            "ingest",
            "--store",
            &s,
            "--host",
            "srv",
            "--raw",
            img.to_str().unwrap(),
        ]);
        let vm = format!("srv-{test}");
        let st: Value = serde_json::from_str(&ok(&[
            "failover", "start", "--store", &s, "--host", "srv", "--name", &vm, "--accel", "tcg",
            "--net", "none", "--memory", "64", "--cpus", "1", "--json",
        ]))
        .unwrap();
        let mut setup = Setup {
            dir,
            store,
            vm,
            qmp: PathBuf::from(st["qmp"].as_str().unwrap()),
            port: free_port(),
            server: None,
            image,
        };
        setup.start_server();
        setup
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/store", self.port)
    }

    fn start_server(&mut self) {
        let mut cmd = Command::new(Workspace::bin("appliance"));
        cmd.arg("serve")
            .arg("--store")
            .arg(&self.store)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port));
        let logs = self.dir.join("logs");
        let name = format!("serve-{}", Instant::now().elapsed().as_nanos());
        let proc = Background::start(&mut cmd, &logs, &name).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "serve not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some(proc);
    }

    fn kill_server(&mut self) {
        if let Some(mut p) = self.server.take() {
            p.signal(libc::SIGKILL);
            let _ = p.wait(Duration::from_secs(5));
        }
    }

    /// HMP `qemu-io` writes of `data` at `off` into the running VM's disk 0.
    fn vm_write(&self, off: u64, data: &[u8]) {
        self.try_vm_write(off, data).unwrap();
    }

    /// As `vm_write`, but an error (the VM stopped by a cutover meanwhile) is returned.
    fn try_vm_write(&self, off: u64, data: &[u8]) -> Result<(), String> {
        let f = self.dir.join(format!("pattern-{off}.bin"));
        std::fs::write(&f, data).unwrap();
        hmp(
            &self.qmp,
            &format!(
                "qemu-io disk0 \"write -s {} {off} {}\"",
                f.display(),
                data.len()
            ),
        )
    }

    fn state(&self) -> Value {
        let p = self
            .store
            .join(format!("private/failover/{}/state.json", self.vm));
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    /// The VM's disk as its qcow2 chain holds it now.
    fn vm_disk(&self) -> Vec<u8> {
        let st = self.state();
        let top = st["disks"][0]["overlays"]
            .as_array()
            .unwrap()
            .last()
            .unwrap();
        let vmdir = self.store.join(format!("private/failover/{}", self.vm));
        let out = self.dir.join("vm-now.raw");
        let _ = std::fs::remove_file(&out);
        let r = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(vmdir.join(top.as_str().unwrap()))
            .arg(&out)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read(out).unwrap()
    }

    fn failback(&self, target: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_restorer"));
        c.args([
            "failback",
            "--json",
            "--from",
            &self.url(),
            "--vm",
            &self.vm,
        ])
        .arg("--target")
        .arg(target)
        .arg("--pubkey")
        .arg(self.store.join("pubkey"))
        .args(["--stop-timeout", "1s"])
        .args(extra);
        c
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.kill_server();
        let s = self.store.to_str().unwrap().to_string();
        let _ = appliance(&[
            "failover", "stop", "--hard", "--store", &s, "--name", &self.vm,
        ]);
    }
}

fn hmp(qmp: &Path, command: &str) -> Result<(), String> {
    let s = UnixStream::connect(qmp).map_err(|e| format!("QMP socket: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    for msg in [
        serde_json::json!({"execute": "qmp_capabilities"}),
        serde_json::json!({"execute": "human-monitor-command",
                           "arguments": {"command-line": command}}),
    ] {
        writeln!(w, "{msg}").map_err(|e| e.to_string())?;
        loop {
            line.clear();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
            if v.get("error").is_some() {
                return Err(format!("QMP: {v}"));
            }
            if let Some(ret) = v.get("return") {
                if ret.as_str().unwrap_or("").contains("rror") {
                    return Err(format!("{command}: {ret}"));
                }
                break;
            }
        }
    }
    Ok(())
}

fn random(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    Prng::new(seed).fill(&mut v);
    v
}

fn run(mut c: Command) -> (Output, Value) {
    let out = c.output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, v)
}

#[track_caller]
fn assert_same(target: &Path, want: &[u8]) {
    let got = std::fs::read(target).unwrap();
    assert_eq!(got.len(), want.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("target differs from the VM's disk first at byte {i}");
    }
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn drifted_target_ends_exact_over_several_rounds() {
    if !have_qemu() {
        return eprintln!("QEMU missing: skipped");
    }
    let size = 64 * MIB;
    let fx = Setup::new("drifted", size, 40 * MIB);
    // The repaired server's disk: the snapshot with 1% of its 4 KiB blocks overwritten.
    let target = fx.dir.join("target.raw");
    let mut drifted = fx.image.clone();
    let mut rng = Prng::new(7);
    let blocks = size / 4096;
    for _ in 0..blocks / 100 {
        let b = rng.below(blocks) as usize * 4096;
        rng.fill(&mut drifted[b..b + 4096]);
    }
    std::fs::write(&target, &drifted).unwrap();
    // The VM worked: new data in a used and in an empty region.
    fx.vm_write(3 * MIB, &random(1, 6 * MIB));
    fx.vm_write(50 * MIB, &random(2, 2 * MIB));

    // While the restorer runs its rounds, the VM keeps writing.
    let (out, v) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for k in 0..4u64 {
                std::thread::sleep(Duration::from_millis(300));
                // Stops being possible at cutover; the truth is read from the disks after it.
                if fx
                    .try_vm_write(20 * MIB + k * SLOT, &random(10 + k, 100_000))
                    .is_err()
                {
                    break;
                }
            }
        });
        let r = run(fx.failback(&target, &["--threshold", "0", "--max-rounds", "3"]));
        writer.join().unwrap();
        r
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4, "3 rounds then the final one: {v}");
    assert_eq!(rounds[3]["final"], true);
    // Round 1 compared every slot: all 16 had drifted or changed.
    assert_eq!(rounds[0]["slots_hashed"], 16);
    assert!(v["cutover_window_seconds"].as_f64().unwrap() > 0.0);
    // Inside the window, what the final round wrote was read back.
    assert_eq!(
        rounds[3]["slots_read_back"], rounds[3]["slots_written"],
        "{v}"
    );
    // --verify written (the default): every slot was written (all had drifted); those the final
    // round did not change again are read back after cutover, the others inside the window.
    assert_eq!(
        v["verified_slots"].as_u64().unwrap() + rounds[3]["slots_considered"].as_u64().unwrap(),
        16,
        "{v}"
    );
    // The VM ignores the power button: during the forced stop's second, what the rounds wrote
    // was already read back.
    assert!(v["verified_while_stopping"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(fx.state()["phase"], "failed-back");
    assert_same(&target, &fx.vm_disk());
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn blank_target_gets_a_full_restore() {
    if !have_qemu() {
        return eprintln!("QEMU missing: skipped");
    }
    let size = 48 * MIB;
    let fx = Setup::new("blank", size, 24 * MIB);
    fx.vm_write(30 * MIB, &random(3, 3 * MIB));
    let target = fx.dir.join("blank.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size)
        .unwrap();
    let (out, v) = run(fx.failback(&target, &["--verify", "full"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Round 1 fetched everything; 64 MiB threshold: cutover right after it.
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{v}");
    // --verify full read back all 12 slots of the 48 MiB target.
    assert_eq!(v["verified_slots"], 12, "{v}");
    // Random data does not compress: 24 MiB of snapshot data plus the 3 MiB written, in slots.
    let fetched = v["total_bytes_fetched"].as_u64().unwrap();
    assert!(
        (27 * MIB..=33 * MIB).contains(&fetched),
        "fetched {fetched}"
    );
    assert_same(&target, &fx.vm_disk());

    // Run again on the failed-back VM after one block of the target was damaged: the final round
    // alone compares every slot, rewrites the damaged one and reads back only that one (the
    // comparison read the others).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    f.write_all_at(&random(9, 4096), 5 * MIB + 4096).unwrap();
    drop(f);
    let (out, v) = run(fx.failback(&target, &[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{v}");
    assert_eq!(rounds[0]["final"], true, "{v}");
    assert_eq!(rounds[0]["slots_hashed"], 12, "{v}");
    assert_eq!(rounds[0]["slots_written"], 1, "{v}");
    assert_eq!(rounds[0]["slots_read_back"], 1, "{v}");
    assert_same(&target, &fx.vm_disk());
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn appliance_killed_during_a_round() {
    if !have_qemu() {
        return eprintln!("QEMU missing: skipped");
    }
    let size = 128 * MIB;
    let mut fx = Setup::new("appliance-restart", size, 16 * MIB);
    let target = fx.dir.join("target.raw");
    std::fs::write(&target, &fx.image).unwrap();
    // Much new data, so that the first round takes a while to chunk.
    let new = random(4, 100 * MIB);
    fx.vm_write(20 * MIB, &new);
    let mut want = fx.image.clone();
    want[20 * MIB as usize..120 * MIB as usize].copy_from_slice(&new);
    let child = fx
        .failback(&target, &["--retry-for", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the freeze (a new overlay recorded, not yet covered by a round), then kill.
    let deadline = Instant::now() + Duration::from_secs(60);
    let caught;
    loop {
        let st = fx.state();
        let overlays = st["disks"][0]["overlays"].as_array().unwrap().len();
        if overlays > st["consumed"].as_u64().unwrap() as usize + 1 {
            caught = st["rounds"].as_array().unwrap().is_empty();
            break;
        }
        assert!(Instant::now() < deadline, "no round started");
        std::thread::sleep(Duration::from_millis(2));
    }
    fx.kill_server();
    let published = fx.store.join(format!("failover/{}/rounds", fx.vm));
    let n = std::fs::read_dir(&published)
        .map(|d| d.count())
        .unwrap_or(0);
    // (The round may just have been published between the look and the kill.)
    let caught = caught && n == 0;
    eprintln!("appliance killed mid-round: {caught}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fx.state()["phase"], "running", "the VM runs on");
    fx.start_server();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    if caught {
        // The round made after the restart covers the frozen overlay too.
        assert_eq!(v["rounds"][0]["round"], 1, "{v}");
    }
    let vm = fx.vm_disk();
    assert!(vm == want, "the VM's data is not intact");
    assert_same(&target, &vm);
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn network_cut_resumes_or_stops_with_a_reason() {
    if !have_qemu() {
        return eprintln!("QEMU missing: skipped");
    }
    let size = 96 * MIB;
    let mut fx = Setup::new("network-cut", size, 80 * MIB);
    let target = fx.dir.join("blank.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size)
        .unwrap();

    // A long cut: the restorer gives up after --retry-for and says why; the VM is untouched.
    fx.kill_server();
    let (out, _) = run(fx.failback(&target, &["--retry-for", "2s"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gave up after retrying"), "{err}");
    assert_eq!(fx.state()["phase"], "running");

    // A short cut in the middle of the transfer: it resumes and ends exact.
    fx.start_server();
    let new = random(5, MIB);
    fx.vm_write(5 * MIB, &new);
    let mut want = fx.image.clone();
    want[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&new);
    let child = fx
        .failback(&target, &["--jobs", "1", "--retry-for", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&target).unwrap().blocks() * 512 < 8 * MIB {
        assert!(Instant::now() < deadline, "no data arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    fx.kill_server();
    std::thread::sleep(Duration::from_secs(3));
    fx.start_server();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("reachable again"), "{err}");
    let vm = fx.vm_disk();
    assert!(vm == want, "the VM's data is not intact");
    assert_same(&target, &vm);
}

/// `sgdisk` on `disk`; returns its output (stdout and stderr).
fn sgdisk(args: &[&str], disk: &Path) -> (bool, String) {
    let out = Command::new("sgdisk")
        .args(args)
        .arg(disk)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn bigger_target_gets_a_valid_gpt() {
    if !have_qemu() {
        return eprintln!("QEMU missing: skipped");
    }
    // The VM's disk: a GPT with one partition of random data.
    let size = 32 * MIB;
    let dir = Workspace::artifacts("failback-gpt-source");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("gpt.raw");
    std::fs::File::create(&src).unwrap().set_len(size).unwrap();
    let (ok, text) = sgdisk(&["-n", "1:2048:+24M", "-t", "1:8300", "-c", "1:data"], &src);
    assert!(ok, "{text}");
    let mut image = std::fs::read(&src).unwrap();
    Prng::new(11).fill(&mut image[MIB as usize..13 * MIB as usize]);
    let fx = Setup::with_image("bigger-gpt", image);
    fx.vm_write(16 * MIB, &random(12, MIB));

    let target = fx.dir.join("bigger.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size + 64 * MIB)
        .unwrap();
    let (out, v) = run(fx.failback(&target, &["--verify", "full"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        v["tables"][0]
            .as_str()
            .is_some_and(|l| l.contains("GPT backup moved")),
        "{v}"
    );
    let (ok, text) = sgdisk(&["-v"], &target);
    assert!(
        ok && text.contains("No problems found"),
        "sgdisk -v on the failed-back target:\n{text}\n{v}"
    );
    let (_, text) = sgdisk(&["-i", "1"], &target);
    assert!(
        text.contains("First sector: 2048") && text.contains("Partition name: 'data'"),
        "{text}"
    );
    // Everything but the table is the VM's disk, byte for byte; past it the target is untouched.
    let vm = fx.vm_disk();
    let got = std::fs::read(&target).unwrap();
    let (start, end) = (MIB as usize, size as usize - MIB as usize);
    assert!(got[start..end] == vm[start..end], "the data differs");
    assert!(got[size as usize..got.len() - MIB as usize]
        .iter()
        .all(|&b| b == 0));
}
