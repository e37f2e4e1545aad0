//! End to end, in QEMU (TCG): a sample server's snapshot runs as a failover VM (`BOOT-OK` on its
//! serial log); a marker file and tens of MB of new data are written inside it through its serial
//! shell; `restorer failback` brings the changes onto a "repaired server" disk that holds the
//! original snapshot; after cutover that disk boots and shows the marker, equals the failover
//! VM's final disk, and the bytes fetched stay within 1.5x the changed chunks plus the indexes.
//!
//! Not covered here yet: running the restorer inside the boot image booted by PXE (the boot
//! image's `restorer.mode=failback` lands with `restorer init`); the restorer runs on the host.
//! Artifacts and serial logs of a failed run stay under `target/e2e/failback_e2e/`.

use bmr_tests::boot::{self, Firmware as SampleFw, BOOT_OK};
use bmr_tests::qemu::{self, Bus, Disk, Firmware, Vm, VmSpec};
use bmr_tests::util::{free_port, Background, Workspace};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);

fn wait_in_file(path: &Path, pattern: &str, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read(path).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(pattern) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "{pattern:?} not in {} after {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn failover_then_failback_boots_with_the_vms_data() {
    if !qemu::available(Firmware::Bios) {
        eprintln!("SKIPPED: qemu-system-x86_64 or SeaBIOS missing (scripts/setup installs them)");
        return;
    }
    let dir = Workspace::artifacts("failback_e2e");
    let appliance = boot::bin("appliance").unwrap();
    let restorer = boot::bin("restorer").unwrap();
    let run = |args: &[&str]| -> String {
        let out = Command::new(&appliance).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "appliance {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let fx = boot::sample_server("web1", SampleFw::Bios).unwrap();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    run(&["init", "--store", s]);
    run(&[
        "ingest",
        "--store",
        s,
        "--host",
        "web1",
        fx.image.to_str().unwrap(),
    ]);
    let port = free_port();
    let mut cmd = Command::new(&appliance);
    cmd.args(["serve", "--store", s, "--listen"])
        .arg(format!("127.0.0.1:{port}"));
    let _serve = Background::start(&mut cmd, &dir, "appliance-serve").unwrap();

    // Failover: the snapshot boots as a VM.
    let vm = "web1-fo";
    let st: Value = serde_json::from_str(&run(&[
        "failover", "start", "--store", s, "--host", "web1", "--name", vm, "--net", "none",
        "--memory", "512", "--cpus", "1", "--json",
    ]))
    .unwrap();
    struct Stop<'a>(&'a Path, &'a str);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0)
                .args([
                    "failover", "stop", "--hard", "--store", self.1, "--name", "web1-fo",
                ])
                .output();
        }
    }
    let _stop = Stop(&appliance, s);
    let serial_log = Path::new(st["serial_log"].as_str().unwrap()).to_owned();
    let booted = wait_in_file(&serial_log, BOOT_OK, BOOT_TIMEOUT);
    eprintln!(
        "failover VM: BOOT-OK after {booted:.0?} ({})",
        st["config"]["accel"]
    );

    // The repaired server's disk holds the original snapshot: as a restore leaves it.
    let target = dir.join("server.raw");
    std::fs::copy(
        store.join(format!("private/failover/{vm}/disk0.base.raw")),
        &target,
    )
    .unwrap();

    // Work inside the VM: a marker and ~23 MiB of new, incompressible data. Not from
    // /dev/urandom: under TCG the guest waits minutes for its random pool to initialise. Two
    // copies of the (compressed) kernel image, at new disk offsets, make new chunks.
    let mut serial = UnixStream::connect(st["serial_socket"].as_str().unwrap()).unwrap();
    // Drain what the console sends us: an unread socket fills, QEMU's UART stays busy and the
    // guest's console waits on it character by character (the "minutes under TCG").
    let mut drain = serial.try_clone().unwrap();
    std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
    writeln!(
        serial,
        "mount -o remount,rw /mnt && echo FAILBACK-MARKER-7 > /mnt/marker && \
         cat /mnt/boot/vmlinuz /mnt/boot/vmlinuz > /mnt/data && sync && \
         mount -o remount,ro /mnt && echo WROTE-$((40+2))"
    )
    .unwrap();
    wait_in_file(&serial_log, "WROTE-42", Duration::from_secs(900));

    // Failback onto the server's disk.
    let out = Command::new(&restorer)
        .args(["failback", "--json", "--from"])
        .arg(format!("http://127.0.0.1:{port}/store"))
        .args(["--vm", vm, "--target"])
        .arg(&target)
        .arg("--pubkey")
        .arg(store.join("pubkey"))
        .args(["--stop-timeout", "30s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "failback: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    std::fs::write(dir.join("failback.json"), &out.stdout).unwrap();
    let status: Value = serde_json::from_str(&run(&[
        "failover", "status", "--store", s, "--name", vm, "--json",
    ]))
    .unwrap();
    assert_eq!(status["state"], "failed-back");
    let changed: u64 = status["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["changed_stored_bytes"].as_u64().unwrap())
        .sum();
    let fetched = report["total_bytes_fetched"].as_u64().unwrap();
    let rounds = report["rounds"].as_array().unwrap().len() as u64;
    // Index overhead: round.json, signature and a 64-slot index per round.
    let overhead = rounds * (64 * 32 + 64 + 4096);
    eprintln!(
        "failback: {rounds} rounds, {fetched} bytes fetched for {changed} bytes of changed \
         chunks, cutover window {:.2}s",
        report["cutover_window_seconds"].as_f64().unwrap()
    );
    assert!(
        fetched as f64 <= 1.5 * changed as f64 + overhead as f64,
        "fetched {fetched} > 1.5 x {changed} + {overhead}"
    );

    // The server's disk equals the failover VM's final disk...
    let st: Value = serde_json::from_slice(
        &std::fs::read(store.join(format!("private/failover/{vm}/state.json"))).unwrap(),
    )
    .unwrap();
    let top = st["disks"][0]["overlays"]
        .as_array()
        .unwrap()
        .last()
        .unwrap();
    let final_raw = dir.join("vm-final.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(store.join(format!("private/failover/{vm}/{}", top.as_str().unwrap())))
        .arg(&final_raw)
        .output()
        .unwrap();
    assert!(conv.status.success());
    assert!(
        std::fs::read(&final_raw).unwrap() == std::fs::read(&target).unwrap(),
        "the server's disk differs from the VM's final disk"
    );

    // ...and boots, showing the marker.
    let mut spec = VmSpec::new("server", Firmware::Bios);
    spec.memory_mib = 512;
    spec.disks.push(Disk::new(&target, Bus::Ahci).boot(1));
    let mut server = Vm::start(spec, &dir.join("server-vm")).unwrap();
    let t = server.wait_for(BOOT_OK, BOOT_TIMEOUT).unwrap();
    eprintln!("failed-back server: BOOT-OK after {t:.0?}");
    server.send_line("cat /mnt/marker").unwrap();
    server
        .wait_for("FAILBACK-MARKER-7", Duration::from_secs(60))
        .unwrap();
    server.kill();
}
