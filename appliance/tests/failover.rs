//! `appliance failover` with a real QEMU (TCG): start a VM from a snapshot, write into its disk
//! through QEMU's own block layer (HMP `qemu-io`, so no guest OS is needed), publish rounds and
//! check every round index against the bytes the VM's disk really holds; crash and restart;
//! cutover; delete.
//!
//! `appliance` is built by `cargo test -p appliance`; QEMU and qemu-img come from scripts/setup.

mod common;

use common::http::{get, post_json, write_tokens, Server};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use snapshot::sign::PublicKey;
use snapshot::{ChunkIndex, Slot, CHUNK_SIZE};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn appliance(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(args)
        .output()
        .expect("runs appliance")
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let out = appliance(args);
    assert!(
        out.status.success(),
        "appliance {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn have_qemu() -> bool {
    ["qemu-system-x86_64", "qemu-img"]
        .iter()
        .all(|p| Command::new(p).arg("--version").output().is_ok())
}

/// Deletes the VM (and so stops QEMU) however the test ends.
struct VmGuard {
    store: String,
    name: String,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        let _ = appliance(&[
            "failover",
            "delete",
            "--force",
            "--store",
            &self.store,
            "--name",
            &self.name,
        ]);
    }
}

/// Human monitor commands over the VM's QMP socket.
fn hmp(qmp: &Path, commands: &[String]) {
    let s = UnixStream::connect(qmp).expect("QMP socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // the greeting
    let mut send = |msg: Value| {
        writeln!(w, "{msg}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                assert!(v.get("error").is_none(), "QMP: {v}");
                return v;
            }
        }
    };
    send(serde_json::json!({"execute": "qmp_capabilities"}));
    for c in commands {
        let v = send(serde_json::json!({
            "execute": "human-monitor-command", "arguments": {"command-line": c}}));
        let text = v["return"].as_str().unwrap_or("");
        assert!(!text.contains("rror"), "{c}: {text}");
    }
}

/// Write `pattern` over `[off, off + len)` of the VM's disk 0 and of our model of it.
fn write(qmp: &Path, model: &mut [u8], off: u64, len: u64, pattern: u8) {
    hmp(
        qmp,
        &[format!(
            "qemu-io disk0 \"write -P {pattern:#x} {off} {len}\""
        )],
    );
    model[off as usize..(off + len) as usize].fill(pattern);
}

fn state(store: &Path, vm: &str) -> Value {
    let p = store.join(format!("private/failover/{vm}/state.json"));
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Read round `n` and check signature and index hash like a restorer does.
fn round(store: &Path, vm: &str, n: u32) -> (Value, ChunkIndex) {
    let dir = store.join(format!("failover/{vm}/rounds/{n}"));
    let json = std::fs::read(dir.join("round.json")).unwrap();
    let sig = std::fs::read(dir.join("round.sig")).unwrap();
    let key = PublicKey::load(&store.join("pubkey")).unwrap();
    key.verify(&json, &sig, "round.json").unwrap();
    let v: Value = serde_json::from_slice(&json).unwrap();
    let idx_bytes = std::fs::read(dir.join("disk0.idx")).unwrap();
    assert_eq!(
        v["disks"][0]["index_sha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&idx_bytes))
    );
    (v, ChunkIndex::parse(&idx_bytes, "disk0.idx").unwrap())
}

/// Every slot of `idx` describes `model`, and every data chunk is in the store.
fn assert_index_is(idx: &ChunkIndex, model: &[u8], store: &Path) {
    assert_eq!(idx.disk_size, model.len() as u64);
    for (i, slot) in idx.slots() {
        let (off, len) = idx.span(i);
        let bytes = &model[off as usize..(off + len) as usize];
        match slot {
            Slot::Zeros => assert!(bytes.iter().all(|&b| b == 0), "slot {i} is not zeros"),
            Slot::Data(d) => {
                assert_eq!(d, snapshot::Digest::of(bytes), "slot {i}");
                assert!(store.join(d.chunk_path()).exists(), "chunk of slot {i}");
            }
            Slot::Unused => panic!("slot {i} unused in a --raw snapshot"),
        }
    }
}

fn changed(v: &Value) -> Vec<(u64, u64)> {
    serde_json::from_value(v["disks"][0]["changed"].clone()).unwrap()
}

/// Under `appliance serve` with tokens, a VM and its rounds belong to the VM's host: a token
/// for another host neither sees nor drives it; a read token cannot make rounds.
fn tokens_are_scoped_to_the_vms_host(store: &Path, vm: &str) {
    let (web1, web2, up_web2) = (
        "read-web1-0123456789abcdef",
        "read-web2-0123456789abcdef",
        "upload-web2-0123456789abcdef",
    );
    write_tokens(
        store,
        serde_json::json!({ "tokens": [
            { "token": web1, "access": "read", "hosts": ["web1"] },
            { "token": web2, "access": "read", "hosts": ["web2"] },
            { "token": up_web2, "access": "upload", "hosts": ["web2"] },
        ]}),
    );
    let srv = Server::start(store, &[]);
    let files = [
        format!("/store/failover/{vm}/latest"),
        format!("/store/failover/{vm}/rounds/1/round.json"),
        format!("/api/v1/failover/{vm}"),
        format!("/api/v1/failover/{vm}/rounds"),
    ];
    for f in &files {
        assert_eq!(get(&srv.url(f), Some(web1)).status, 200, "{f}");
        let r = get(&srv.url(f), Some(web2));
        assert_eq!(r.status, 403, "{f}: {}", r.text());
    }
    let list = |t| get(&srv.url("/api/v1/failover"), Some(t)).json();
    assert_eq!(list(web1).as_array().unwrap().len(), 1);
    assert_eq!(list(web2).as_array().unwrap().len(), 0);
    let rounds = srv.url(&format!("/api/v1/failover/{vm}/rounds"));
    let stop = srv.url(&format!("/api/v1/failover/{vm}/stop"));
    for (url, token) in [(&rounds, web1), (&rounds, up_web2), (&stop, up_web2)] {
        let r = post_json(url, Some(token), serde_json::json!({}));
        assert_eq!(r.status, 403, "{url}: {}", r.text());
    }
    std::fs::remove_file(store.join("private/tokens.json")).unwrap();
}

#[test]
fn failover_vm_rounds_crash_cutover_delete() {
    if !have_qemu() {
        eprintln!("QEMU missing (scripts/setup installs it): skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    ok(&["init", "--store", s]);
    // 40 MiB: random data, a zero slot, a repeated pattern.
    let size = 40 * MIB;
    let mut model = vec![0u8; size as usize];
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in model[..(24 * MIB) as usize].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    model[(32 * MIB) as usize..].fill(0xee);
    let img: PathBuf = dir.path().join("disk.raw");
    std::fs::write(&img, &model).unwrap();
    ok(&[
        "ingest",
        "--store",
        s,
        "--host",
        "web1",
        "--raw",
        img.to_str().unwrap(),
    ]);

    let vm = "web1-fo";
    let _guard = VmGuard {
        store: s.into(),
        name: vm.into(),
    };
    let started = ok(&[
        "failover", "start", "--store", s, "--host", "web1", "--name", vm, "--accel", "tcg",
        "--net", "none", "--memory", "64", "--cpus", "1", "--json",
    ]);
    let st: Value = serde_json::from_str(&started).unwrap();
    assert_eq!(st["phase"], "running");
    assert_eq!(st["config"]["accel"], "tcg");
    let qmp = PathBuf::from(st["qmp"].as_str().unwrap());
    let status: Value = serde_json::from_str(&ok(&[
        "failover", "status", "--store", s, "--name", vm, "--json",
    ]))
    .unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["changed_bytes"], 0);

    // Round 1: writes in slots 0 and 5 (across the slot boundary into 6), zeros over slot 3.
    write(&qmp, &mut model, 4096, 8192, 0x11);
    write(&qmp, &mut model, 6 * CHUNK_SIZE - 1000, 3000, 0x22);
    write(&qmp, &mut model, 3 * CHUNK_SIZE, CHUNK_SIZE, 0);
    let status: Value = serde_json::from_str(&ok(&[
        "failover", "status", "--store", s, "--name", vm, "--json",
    ]))
    .unwrap();
    assert!(
        status["changed_bytes"].as_u64().unwrap() >= CHUNK_SIZE,
        "{status}"
    );
    assert_eq!(status["changed_slots"], 4, "{status}");
    let r1: Value = serde_json::from_str(&ok(&[
        "failover", "round", "--store", s, "--name", vm, "--json",
    ]))
    .unwrap();
    assert_eq!(
        (r1["round"].as_u64(), r1["final"].as_bool()),
        (Some(1), Some(false))
    );
    let (v1, idx1) = round(&store, vm, 1);
    assert_eq!(changed(&v1), vec![(0, 1), (3, 1), (5, 2)]);
    assert_eq!(idx1.slot(3), Slot::Zeros);
    assert_index_is(&idx1, &model, &store);
    tokens_are_scoped_to_the_vms_host(&store, vm);
    assert_eq!(
        std::fs::read_to_string(store.join(format!("failover/{vm}/latest"))).unwrap(),
        "1\n"
    );

    // Round 2: only what changed since round 1.
    write(&qmp, &mut model, 9 * CHUNK_SIZE + 5, 100, 0x33);
    ok(&["failover", "round", "--store", s, "--name", vm]);
    let (v2, idx2) = round(&store, vm, 2);
    assert_eq!(changed(&v2), vec![(9, 1)]);
    assert_index_is(&idx2, &model, &store);

    // A crash: QEMU killed. Reported as crashed, disks kept, restart continues on them.
    let pid = state(&store, vm)["pid"].as_u64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    let status: Value = serde_json::from_str(&ok(&[
        "failover", "status", "--store", s, "--name", vm, "--json",
    ]))
    .unwrap();
    assert_eq!(status["state"], "crashed");
    assert!(ok(&["failover", "list", "--store", s]).contains("crashed"));
    ok(&["failover", "start", "--store", s, "--name", vm]);
    write(&qmp, &mut model, 2 * CHUNK_SIZE, 65536, 0x44);

    // Cutover: the VM stops (no OS answers ACPI here: forced after the timeout).
    let r3: Value = serde_json::from_str(&ok(&[
        "failover",
        "round",
        "--store",
        s,
        "--name",
        vm,
        "--final",
        "--timeout",
        "2s",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        (r3["round"].as_u64(), r3["final"].as_bool()),
        (Some(3), Some(true))
    );
    assert_eq!(r3["vm_stop"], "forced");
    let (v3, idx3) = round(&store, vm, 3);
    assert_eq!(v3["final"], true);
    assert_eq!(changed(&v3), vec![(2, 1)]);
    assert_index_is(&idx3, &model, &store);
    let status: Value = serde_json::from_str(&ok(&[
        "failover", "status", "--store", s, "--name", vm, "--json",
    ]))
    .unwrap();
    assert_eq!(status["state"], "failed-back");
    // Cutover again (a client retrying): the same final round; a normal round is refused.
    let again: Value = serde_json::from_str(&ok(&[
        "failover", "round", "--store", s, "--name", vm, "--final", "--json",
    ]))
    .unwrap();
    assert_eq!(again["round"], 3);
    let refused = appliance(&["failover", "round", "--store", s, "--name", vm]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("failed back"));

    // The VM's disks are still there (rollback possible) until delete.
    let vm_dir = store.join(format!("private/failover/{vm}"));
    assert!(vm_dir.join("disk0.base.raw").exists());
    ok(&["failover", "delete", "--store", s, "--name", vm]);
    assert!(!vm_dir.exists());
    assert!(!store.join(format!("failover/{vm}")).exists());
    assert!(ok(&["failover", "list", "--store", s]).contains("no failover VMs"));
}

#[test]
fn start_refuses_unknown_host_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    ok(&["init", "--store", s]);
    let out = appliance(&[
        "failover", "start", "--store", s, "--host", "nope", "--name", "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot"));
    assert!(!store.join("private/failover/x").exists());
    let out = appliance(&[
        "failover", "start", "--store", s, "--host", "h", "--name", "../x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid vm name"));
    let out = appliance(&["failover", "status", "--store", s, "--name", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no failover VM named"));
}
