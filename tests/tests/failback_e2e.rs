//! End to end, in QEMU (TCG): a sample server's snapshot runs as a failover VM (`BOOT-OK` on its
//! serial log); a marker file and tens of MB of new data are written inside it through its serial
//! shell; the "repaired server", a VM whose disk holds the original snapshot, boots our image by
//! PXE (iPXE over HTTP from `appliance serve --boot`) with `restorer.mode=failback
//! restorer.vm=...`, and the restorer inside brings the VM's changes onto its disk in rounds and
//! a cutover. Then that disk boots and shows the marker, equals the failover VM's final disk, and
//! the bytes the server received (counted on the wire by a relay) stay within 1.5x the changed
//! chunks plus the indexes and HTTP headers.
//! Artifacts and serial logs of a failed run stay under `target/e2e/failback_e2e/`.

use bmr_tests::boot::{self, appliance::Appliance, Firmware as SampleFw, BOOT_OK};
use bmr_tests::qemu::{self, Bus, Disk, Firmware, Nic, Vm, VmSpec};
use bmr_tests::util::Workspace;
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const FAILBACK_TIMEOUT: Duration = Duration::from_secs(900);
/// The port the boot image's URL names (a fixed one, so the cached image fits every run).
const PORT: u16 = 47833;
const VM: &str = "web1-fo";

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
#[ignore = "system test (QEMU): scripts/test runs it"]
fn failover_then_pxe_failback_boots_with_the_vms_data() {
    if !qemu::available(Firmware::Bios) {
        eprintln!("SKIPPED: qemu-system-x86_64 or SeaBIOS missing (scripts/setup installs them)");
        return;
    }
    let dir = Workspace::artifacts("failback_e2e");
    let appliance = boot::bin("appliance").unwrap();
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
    let url = format!("http://10.0.2.2:{PORT}/store");
    let image = boot::boot_image(
        Some(&url),
        &format!("restorer.mode=failback restorer.vm={VM} restorer.target=/dev/sda"),
        "pxe",
    )
    .unwrap();
    let app = Appliance::start(&dir, "web1", &fx.image, Some(&image.dir), PORT).unwrap();
    assert_eq!(
        app.watch.port, PORT,
        "port {PORT} is taken: the image's URL would be wrong"
    );
    let store = dir.join("store");
    let s = store.to_str().unwrap();

    // Failover: the snapshot boots as a VM.
    let st: Value = serde_json::from_str(&run(&[
        "failover", "start", "--store", s, "--host", "web1", "--name", VM, "--net", "none",
        "--memory", "512", "--cpus", "1", "--json",
    ]))
    .unwrap();
    struct Stop<'a>(&'a Path, &'a str);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0)
                .args([
                    "failover", "stop", "--hard", "--store", self.1, "--name", VM,
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
        store.join(format!("private/failover/{VM}/disk0.base.raw")),
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

    // The repaired server boots our image by PXE and fails back onto its disk unattended.
    let mut spec = VmSpec::new("server-pxe", Firmware::Bios);
    spec.memory_mib = 1536;
    spec.disks.push(Disk::new(&target, Bus::Ahci));
    spec.nics.push(Nic::pxe(
        "e1000",
        &image.pxe(),
        &format!("http://10.0.2.2:{PORT}/boot/pxe/boot.ipxe"),
    ));
    let mut server = Vm::start(spec, &dir).unwrap();
    let job = server
        .wait_for("restorer: starting `restorer failback", BOOT_TIMEOUT)
        .unwrap();
    // From here on the relay counts only the failback's traffic (kernel and initrd are in).
    app.watch.reset();
    let (which, took) = server
        .wait_for_any(
            &["restorer: rebooting", "restorer: FAILED"],
            FAILBACK_TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        which,
        0,
        "failback failed; serial log {}",
        server.log.display()
    );
    server.wait_exit(Duration::from_secs(120)).unwrap();
    let console = qemu::strip_ansi(&server.output());
    let done = console
        .lines()
        .find(|l| l.contains("failback done:"))
        .unwrap_or("(no summary line)")
        .trim()
        .to_string();
    eprintln!(
        "repaired server: job started {job:.0?} after power-on, failback took {took:.0?}: {done}"
    );
    assert!(done.contains("cutover window"), "{done}");
    // The boot image reported the job to the appliance under the VM's host.
    let log = std::fs::read_to_string(dir.join("appliance-serve.stderr")).unwrap_or_default();
    assert!(
        log.contains("appliance serve: progress web1: done"),
        "no progress report of the failback: {log}"
    );

    let status: Value = serde_json::from_str(&run(&[
        "failover", "status", "--store", s, "--name", VM, "--json",
    ]))
    .unwrap();
    assert_eq!(status["state"], "failed-back");
    // The cutover shut the VM down through ACPI (its OS unmounted and powered off).
    wait_in_file(
        &serial_log,
        "SHUTDOWN: ACPI power button",
        Duration::from_secs(1),
    );
    let rounds = status["rounds"].as_array().unwrap();
    let changed: u64 = rounds
        .iter()
        .map(|r| r["changed_stored_bytes"].as_u64().unwrap())
        .sum();
    let (wire, requests) = (app.watch.bytes_down(), app.watch.requests());
    // Overhead: per round its round.json, signature and 64-slot index; per request its headers.
    let overhead = rounds.len() as u64 * (64 * 32 + 64 + 4096) + requests * 1024;
    eprintln!(
        "failback: {} rounds, {wire} bytes on the wire in {requests} requests for {changed} bytes \
         of changed chunks",
        rounds.len()
    );
    assert!(
        wire as f64 <= 1.5 * changed as f64 + overhead as f64,
        "received {wire} > 1.5 x {changed} + {overhead}"
    );

    // The server's disk equals the failover VM's final disk...
    let st: Value = serde_json::from_slice(
        &std::fs::read(store.join(format!("private/failover/{VM}/state.json"))).unwrap(),
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
        .arg(store.join(format!("private/failover/{VM}/{}", top.as_str().unwrap())))
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
