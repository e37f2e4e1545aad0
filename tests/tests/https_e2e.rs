//! HTTPS end to end, in QEMU (TCG): the appliance serves the store over HTTPS (`appliance serve
//! --tls --tls-listen`) with a server certificate for 10.0.2.2 from a test CA, and the boot files
//! on a plain HTTP port that serves nothing else; the boot image carries the CA (`bootimg build
//! --ca`) and the restorer inside trusts only it.
//!
//! - `restore_over_https`: PXE (the NIC's iPXE fetches kernel and initrd from the plain port),
//!   restore over HTTPS; the restored disk holds the snapshot's bytes (the oracle's check) and
//!   boots.
//! - `wrong_ca_is_refused_before_any_write`: an image carrying another CA fails with a
//!   certificate error on the console, and the pre-filled target disk is unchanged.
//! - `failback_over_https`: a failover VM's changes come back onto the repaired server over
//!   HTTPS in rounds and a cutover (as failback_e2e.rs does over HTTP).
//!
//! The relays in front of the appliance count bytes (TLS included) and, under HTTPS, take the
//! requests from the appliance's request log. Artifacts and serial logs stay under
//! `target/e2e/<test>/`.

use bmr_tests::boot::appliance::{test_ca, Appliance, Options, TestCa};
use bmr_tests::boot::{self, Firmware as SampleFw, BOOT_OK};
use bmr_tests::oracle::{self, Expect};
use bmr_tests::qemu::{self, Bus, Disk, Firmware, Nic, Vm, VmSpec};
use bmr_tests::util::{sha256_file, Workspace};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(900);
/// Fixed ports that the boot images' URLs name, so that the cached images fit every run.
const RESTORE_PORT: u16 = 47851;
const FAILBACK_PORT: u16 = 47853;
const HOST: &str = "web1";
const VM_NAME: &str = "web1-fo-tls";

/// QEMU and SeaBIOS are needed: without them the test fails and says so (no silent skip).
fn require_qemu() {
    assert!(
        qemu::available(Firmware::Bios),
        "qemu-system-x86_64 or SeaBIOS missing (scripts/setup installs them)"
    );
}

/// The CA the HTTPS appliances use, stable across runs (so that boot images carrying it stay
/// cached).
fn the_ca() -> TestCa {
    test_ca("e2e").unwrap()
}

fn start(dir: &Path, src: &Path, boot: Option<&Path>, port: u16, ca: &TestCa) -> Appliance {
    let app = Appliance::start_with(
        dir,
        HOST,
        src,
        Options {
            boot,
            port,
            tls: Some(ca),
        },
    )
    .unwrap();
    if port != 0 {
        assert_eq!(
            app.watch.port, port,
            "port {port} is taken: the image's URL would be wrong"
        );
    }
    app
}

/// One plain HTTP/1.1 request to 127.0.0.1:`port`: the status line and the body.
fn plain_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 10.0.2.2\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// The plain port serves the boot files and refuses the store, naming the HTTPS address.
fn check_boot_only_port(app: &Appliance) {
    let w = app.boot_watch.as_ref().expect("a boot-only port under TLS");
    let (st, _) = plain_get(w.port, "/boot/pxe/boot.ipxe");
    assert!(st.contains(" 200"), "plain /boot/pxe/boot.ipxe: {st}");
    let (st, body) = plain_get(w.port, &format!("/store/hosts/{HOST}/latest"));
    assert!(
        st.contains(" 403") && body.contains("https://"),
        "the plain port should refuse the store with the HTTPS address: {st} {body}"
    );
    // Nothing speaks plain HTTP on the store's port.
    let (st, _) = plain_get(app.watch.port, "/store/");
    assert!(
        !st.starts_with("HTTP/1.1 2"),
        "the HTTPS port answered plain HTTP: {st}"
    );
    w.reset();
    app.watch.reset();
}

/// Connections to the store's port were made, and every one that sent anything opened with a
/// TLS handshake.
fn check_all_tls(app: &Appliance, what: &str) {
    let (t, o) = (app.watch.tls_connections(), app.watch.other_connections());
    assert!(t > 0, "{what}: no TLS connection to the HTTPS port");
    assert_eq!(
        o, 0,
        "{what}: {o} connections to the HTTPS port were not TLS"
    );
}

fn sparse_file(p: &Path, size: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
}

/// Boots `disk` alone (BIOS) and waits for BOOT-OK host=HOST and its shell.
fn boot_to_ok(dir: &Path, name: &str, disk: Disk) -> Duration {
    let mut spec = VmSpec::new(name, Firmware::Bios);
    spec.memory_mib = 512;
    spec.disks.push(disk);
    let mut vm = Vm::start(spec, dir).unwrap();
    let t = vm
        .wait_for(&format!("{BOOT_OK}{HOST}"), BOOT_TIMEOUT)
        .unwrap();
    vm.send_line("echo SHELL-$((6*7))").unwrap();
    vm.wait_for("SHELL-42", Duration::from_secs(60)).unwrap();
    vm.kill();
    t
}

fn console_line(vm: &Vm, prefix: &str) -> String {
    qemu::strip_ansi(&vm.output())
        .lines()
        .find(|l| l.contains(prefix))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A BIOS server PXE-boots the image (iPXE fetches boot.ipxe, kernel and initrd over plain HTTP
/// from the boot-only port) and restores over HTTPS; the restored disk (same size,
/// `restorer.adapt=0`) has the source's tables and every used byte, its filesystems are clean
/// and hold every file (`oracle::compare_disk`), and it boots.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn restore_over_https() {
    require_qemu();
    let t_all = Instant::now();
    let dir = Workspace::artifacts("https_restore");
    let src = boot::sample_server(HOST, SampleFw::Bios).unwrap();
    let ca = the_ca();
    let url = format!("https://10.0.2.2:{RESTORE_PORT}/store");
    let image = boot::boot_image_with_ca(
        Some(&url),
        &format!("restorer.host={HOST} restorer.adapt=0"),
        "pxe",
        Some(&ca.pem),
    )
    .unwrap();
    let app = start(&dir, &src.image, Some(&image.dir), RESTORE_PORT, &ca);
    check_boot_only_port(&app);

    let target = dir.join("target.img");
    sparse_file(&target, src.size);
    let mut spec = VmSpec::new("pxe-https", Firmware::Bios);
    spec.memory_mib = 1536;
    spec.disks.push(Disk::new(&target, Bus::Ahci));
    let bootfile = format!("{}/pxe/boot.ipxe", app.boot_url);
    spec.nics.push(Nic::pxe("e1000", &image.pxe(), &bootfile));
    let mut vm = Vm::start(spec, &dir).unwrap();
    let job = vm
        .wait_for("restorer: starting `restorer restore", BOOT_TIMEOUT)
        .unwrap();
    let (which, took) = vm
        .wait_for_any(
            &["restorer: rebooting", "restorer: FAILED"],
            RESTORE_TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        which,
        0,
        "the restore over HTTPS failed: {}; serial log {}",
        console_line(&vm, "restorer: FAILED"),
        vm.log.display()
    );
    let started = console_line(&vm, "restorer: starting `restorer restore");
    assert!(
        started.contains(&format!("--from {url}"))
            && started.contains("--ca /etc/bmr/appliance-ca.pem"),
        "the job should read {url} trusting the image's CA: {started}"
    );
    let first_chunk = app
        .watch
        .first_chunk()
        .map(|t| t.saturating_duration_since(vm.started));
    vm.wait_exit(Duration::from_secs(120)).unwrap();

    // Kernel and initrd came over the plain port; the store only over TLS.
    let boot_bytes = image.summary["vmlinuz_bytes"].as_u64().unwrap()
        + image.summary["initrd"]["bytes"].as_u64().unwrap();
    let plain = app.boot_watch.as_ref().unwrap().bytes_down();
    assert!(
        plain >= boot_bytes,
        "the plain port sent {plain} bytes, less than kernel + initrd ({boot_bytes})"
    );
    check_all_tls(&app, "restore");
    let log = std::fs::read_to_string(&app.log).unwrap();
    assert!(
        app.watch.requests() > 0 && first_chunk.is_some(),
        "no store requests through the HTTPS relay seen in {}",
        app.log.display()
    );
    assert!(
        log.contains(&format!("progress {HOST}: done")),
        "no progress report reached the appliance over HTTPS: {}",
        app.log.display()
    );

    // Tables, gaps and every used byte as in the source, filesystems clean, every file's
    // SHA-256 (the source's free space holds garbage that is not stored).
    oracle::compare_disk(
        &src,
        &src.image,
        &target,
        &dir.join("oracle"),
        Expect::default(),
    )
    .unwrap_or_else(|e| panic!("the restored disk differs from the snapshot: {e:#}"));
    let ok = boot_to_ok(&dir, "restored", Disk::new(&target, Bus::Ahci));
    println!(
        "restore over HTTPS: job {:.1} s after power-on, first chunk {}, restored+reboot {:.1} s; \
         {} bytes over HTTPS in {} requests ({} TLS connections), {} bytes of boot files over \
         plain HTTP; restored disk = snapshot, BOOT-OK after {:.1} s (test {:.0} s)",
        job.as_secs_f64(),
        first_chunk.map_or("n/a".into(), |t| format!("{:.1} s", t.as_secs_f64())),
        took.as_secs_f64(),
        app.watch.bytes_down(),
        app.watch.requests(),
        app.watch.tls_connections(),
        plain,
        ok.as_secs_f64(),
        t_all.elapsed().as_secs_f64()
    );
}

/// Fills `p` (`size` bytes) with a pattern: every 512-byte sector says its number.
fn pattern_file(p: &Path, size: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    let mut sector = [0xA5u8; 512];
    for n in 0..size / 512 {
        let tag = format!("BMR-PATTERN sector {n:012}\n");
        sector[..tag.len()].copy_from_slice(tag.as_bytes());
        f.write_all(&sector).unwrap();
    }
    f.flush().unwrap();
}

/// A boot image that carries another CA than the one that signed the appliance's certificate:
/// the restore fails with a certificate error on the console, stays in its shell, and the
/// target disk (pre-filled with a pattern) is byte for byte unchanged; no store request was
/// ever served.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn wrong_ca_is_refused_before_any_write() {
    require_qemu();
    let t_all = Instant::now();
    let dir = Workspace::artifacts("https_wrong_ca");
    let src = boot::sample_server(HOST, SampleFw::Bios).unwrap();
    let (ca, other) = (the_ca(), test_ca("other").unwrap());
    assert_ne!(
        std::fs::read(&ca.pem).unwrap(),
        std::fs::read(&other.pem).unwrap(),
        "the two test CAs are the same"
    );
    let image = boot::boot_image_with_ca(None, "", "pxe", Some(&other.pem)).unwrap();
    let app = start(&dir, &src.image, None, 0, &ca);

    let target = dir.join("target.img");
    pattern_file(&target, src.size);
    let before = sha256_file(&target).unwrap();
    let mut spec = VmSpec::new("wrong-ca", Firmware::Bios);
    spec.memory_mib = 1536;
    spec.disks.push(Disk::new(&target, Bus::Ahci));
    spec.nics.push(Nic::new("virtio-net-pci"));
    let pxe = image.pxe();
    spec.kernel = Some((
        pxe.join("vmlinuz"),
        pxe.join("initrd.img"),
        format!(
            "console=tty0 console=ttyS0,115200n8 restorer.url={} restorer.host={HOST}",
            app.url
        ),
    ));
    let mut vm = Vm::start(spec, &dir).unwrap();
    let (which, t) = vm
        .wait_for_any(&["restorer: FAILED: ", "restorer: rebooting"], BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(
        which,
        0,
        "the restore with the wrong CA did not fail; serial log {}",
        vm.log.display()
    );
    vm.wait_for("\n", Duration::from_secs(5)).ok();
    let line = console_line(&vm, "restorer: FAILED: ");
    println!("failure line after {:.1} s: {line}", t.as_secs_f64());
    let lower = line.to_lowercase();
    assert!(
        lower.contains("tls") && lower.contains("certificate"),
        "the failure should be a certificate error: {line}"
    );
    // It stays in its shell, no reboot, no retry loop writing anything.
    vm.send_line("echo SHELL-$((6*7))").unwrap();
    vm.wait_for("SHELL-42", Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        vm.wait_exit(Duration::from_millis(10)).is_err(),
        "the VM rebooted or stopped after the failure"
    );
    vm.kill();

    let after = sha256_file(&target).unwrap();
    assert_eq!(before, after, "the target disk was written");
    check_all_tls(&app, "wrong CA");
    let c = app.watch.tls_connections();
    std::thread::sleep(Duration::from_millis(200));
    let log = std::fs::read_to_string(&app.log).unwrap();
    assert!(
        app.watch.requests() == 0 && app.watch.first_chunk().is_none(),
        "the appliance served requests to an image that does not trust it: {}",
        app.log.display()
    );
    assert!(
        !log.contains(" GET /store/"),
        "the appliance served store files: {}",
        app.log.display()
    );
    // The client ended every handshake itself, for the certificate.
    assert!(
        log.contains("TLS handshake failed: received fatal alert: UnknownCA"),
        "the appliance logged no handshake refused for its CA: {}",
        app.log.display()
    );
    println!(
        "wrong CA: refused over {c} TLS connections, target unchanged (sha256 {}), test {:.0} s",
        &after[..16],
        t_all.elapsed().as_secs_f64()
    );
}

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

/// failback_e2e.rs over HTTPS: a failover VM of the sample server gets a marker and new data;
/// the repaired server (its disk the original snapshot) PXE-boots the image carrying the CA
/// (boot files over the plain port) with `restorer.mode=failback`, and brings the VM's changes
/// over HTTPS in rounds and a cutover; its disk then equals the VM's final disk and boots with
/// the marker, and the bytes on the wire (TLS included) stay within 1.5x the changed chunks
/// plus indexes, headers and handshakes.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn failback_over_https() {
    require_qemu();
    let t_all = Instant::now();
    let dir = Workspace::artifacts("https_failback");
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
    let fx = boot::sample_server(HOST, SampleFw::Bios).unwrap();
    let ca = the_ca();
    let url = format!("https://10.0.2.2:{FAILBACK_PORT}/store");
    let image = boot::boot_image_with_ca(
        Some(&url),
        &format!("restorer.mode=failback restorer.vm={VM_NAME} restorer.target=/dev/sda"),
        "pxe",
        Some(&ca.pem),
    )
    .unwrap();
    let app = start(&dir, &fx.image, Some(&image.dir), FAILBACK_PORT, &ca);
    let store = app.store.clone();
    let s = store.to_str().unwrap();

    let st: Value = serde_json::from_str(&run(&[
        "failover", "start", "--store", s, "--host", HOST, "--name", VM_NAME, "--net", "none",
        "--memory", "512", "--cpus", "1", "--json",
    ]))
    .unwrap();
    struct Stop<'a>(&'a Path, &'a str);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0)
                .args([
                    "failover", "stop", "--hard", "--store", self.1, "--name", VM_NAME,
                ])
                .output();
        }
    }
    let _stop = Stop(&appliance, s);
    let serial_log = Path::new(st["serial_log"].as_str().unwrap()).to_owned();
    let booted = wait_in_file(&serial_log, BOOT_OK, BOOT_TIMEOUT);
    eprintln!("failover VM: BOOT-OK after {booted:.0?}");

    let target = dir.join("server.raw");
    std::fs::copy(
        store.join(format!("private/failover/{VM_NAME}/disk0.base.raw")),
        &target,
    )
    .unwrap();

    // A marker and one copy of the (compressed, so incompressible) kernel as new data.
    let mut serial = UnixStream::connect(st["serial_socket"].as_str().unwrap()).unwrap();
    let mut drain = serial.try_clone().unwrap();
    std::thread::spawn(move || std::io::copy(&mut drain, &mut std::io::sink()));
    writeln!(
        serial,
        "mount -o remount,rw /mnt && echo FAILBACK-TLS-MARKER-9 > /mnt/marker && \
         cat /mnt/boot/vmlinuz > /mnt/data && sync && \
         mount -o remount,ro /mnt && echo WROTE-$((40+2))"
    )
    .unwrap();
    wait_in_file(&serial_log, "WROTE-42", Duration::from_secs(900));

    let mut spec = VmSpec::new("server-pxe", Firmware::Bios);
    spec.memory_mib = 1536;
    spec.disks.push(Disk::new(&target, Bus::Ahci));
    let bootfile = format!("{}/pxe/boot.ipxe", app.boot_url);
    spec.nics.push(Nic::pxe("e1000", &image.pxe(), &bootfile));
    let mut server = Vm::start(spec, &dir).unwrap();
    let job = server
        .wait_for("restorer: starting `restorer failback", BOOT_TIMEOUT)
        .unwrap();
    let (which, took) = server
        .wait_for_any(
            &["restorer: rebooting", "restorer: FAILED"],
            RESTORE_TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        which,
        0,
        "the failback over HTTPS failed: {}; serial log {}",
        console_line(&server, "restorer: FAILED"),
        server.log.display()
    );
    server.wait_exit(Duration::from_secs(120)).unwrap();
    let started = console_line(&server, "restorer: starting `restorer failback");
    assert!(
        started.contains(&format!("--from {url}"))
            && started.contains("--ca /etc/bmr/appliance-ca.pem"),
        "the failback should read {url} trusting the image's CA: {started}"
    );
    let done = console_line(&server, "failback done:");
    assert!(
        done.contains("cutover window"),
        "no failback summary: {done}"
    );
    check_all_tls(&app, "failback");
    let log = std::fs::read_to_string(&app.log).unwrap_or_default();
    assert!(
        log.contains(&format!("appliance serve: progress {HOST}: done")),
        "no progress report of the failback over HTTPS: {}",
        app.log.display()
    );

    let status: Value = serde_json::from_str(&run(&[
        "failover", "status", "--store", s, "--name", VM_NAME, "--json",
    ]))
    .unwrap();
    assert_eq!(status["state"], "failed-back");
    let rounds = status["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "no failback round");
    let changed: u64 = rounds
        .iter()
        .map(|r| r["changed_stored_bytes"].as_u64().unwrap())
        .sum();
    // The relay counted everything since the appliance started: boot.ipxe, kernel and initrd
    // came over the plain port, so the HTTPS relay holds the failback's traffic alone.
    let (wire, requests, conns) = (
        app.watch.bytes_down(),
        app.watch.requests(),
        app.watch.connections(),
    );
    // Per round its round.json, signature and index; per request its headers; per connection a
    // TLS handshake (the certificate and key exchange).
    let overhead = rounds.len() as u64 * (64 * 32 + 64 + 4096) + requests * 1024 + conns * 8192;
    assert!(
        wire as f64 <= 1.5 * changed as f64 + overhead as f64,
        "received {wire} > 1.5 x {changed} + {overhead}"
    );

    let state: Value = serde_json::from_slice(
        &std::fs::read(store.join(format!("private/failover/{VM_NAME}/state.json"))).unwrap(),
    )
    .unwrap();
    let top = state["disks"][0]["overlays"]
        .as_array()
        .unwrap()
        .last()
        .unwrap();
    let final_raw = dir.join("vm-final.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(store.join(format!(
            "private/failover/{VM_NAME}/{}",
            top.as_str().unwrap()
        )))
        .arg(&final_raw)
        .output()
        .unwrap();
    assert!(conv.status.success(), "qemu-img convert failed");
    assert_eq!(
        sha256_file(&final_raw).unwrap(),
        sha256_file(&target).unwrap(),
        "the server's disk differs from the VM's final disk"
    );

    let mut spec = VmSpec::new("server", Firmware::Bios);
    spec.memory_mib = 512;
    spec.disks.push(Disk::new(&target, Bus::Ahci).boot(1));
    let mut vm = Vm::start(spec, &dir.join("server-vm")).unwrap();
    vm.wait_for(BOOT_OK, BOOT_TIMEOUT).unwrap();
    vm.send_line("cat /mnt/marker").unwrap();
    vm.wait_for("FAILBACK-TLS-MARKER-9", Duration::from_secs(60))
        .unwrap();
    vm.kill();
    println!(
        "failback over HTTPS: job {:.0} s after power-on, failback {:.0} s ({} rounds): {done}; \
         {wire} bytes over HTTPS in {requests} requests, {conns} TLS connections, for {changed} \
         bytes of changed chunks; test {:.0} s",
        job.as_secs_f64(),
        took.as_secs_f64(),
        rounds.len(),
        t_all.elapsed().as_secs_f64()
    );
}
