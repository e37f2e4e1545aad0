//! End-to-end tests of the boot image and the sample servers, in QEMU (TCG).
//!
//! Each test keeps its serial logs and artifacts under `target/e2e/<test>/`, and prints its
//! figures (image sizes, time from power-on to the first chunk request, to `BOOT-OK`).
//! A test whose QEMU or firmware is missing says so and passes (scripts/setup installs them).

use bmr_tests::boot::{self, appliance::Appliance, Firmware as SampleFw, BOOT_OK};
use bmr_tests::qemu::{self, Bus, Disk, Firmware, Nic, Vm, VmSpec};
use bmr_tests::util::Workspace;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(900);

fn skip_without(fw: Firmware) -> bool {
    if qemu::available(fw) {
        return false;
    }
    eprintln!(
        "SKIPPED: qemu-system-x86_64 or firmware for {fw:?} missing (scripts/setup installs them)"
    );
    true
}

fn mib(p: &Path) -> f64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64
}

fn sparse_file(p: &Path, size: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
}

fn all_zero(p: &Path) -> bool {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return true;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return false;
        }
    }
}

fn appliance(dir: &Path, host: &str, source: &Path, boot: Option<&Path>, port: u16) -> Appliance {
    Appliance::start(dir, host, source, boot, port).unwrap()
}

/// Boots `disk` (a restored or sample server disk) and waits for BOOT-OK host=`host`; UEFI with
/// the NVRAM `vars` when given (the machine that restored it), else a fresh one.
fn boot_to_ok(
    dir: &Path,
    name: &str,
    fw: Firmware,
    disk: Disk,
    host: &str,
    vars: Option<PathBuf>,
) -> Duration {
    let mut spec = VmSpec::new(name, fw);
    spec.disks.push(disk);
    spec.vars = vars;
    let mut vm = Vm::start(spec, dir).unwrap();
    let t = vm
        .wait_for(&format!("{BOOT_OK}{host}"), BOOT_TIMEOUT)
        .unwrap();
    // The shell is there for tests to drive.
    vm.send_line("echo SHELL-$((6*7))").unwrap();
    vm.wait_for("SHELL-42", Duration::from_secs(60)).unwrap();
    t
}

#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn sample_server_boots_uefi() {
    if skip_without(Firmware::Uefi) {
        return;
    }
    let dir = Workspace::artifacts("sample_server_boots_uefi");
    let f = boot::sample_server("web1", SampleFw::Uefi).unwrap();
    let t = boot_to_ok(
        &dir,
        "uefi",
        Firmware::Uefi,
        Disk::new(&f.image, Bus::Virtio).readonly(),
        "web1",
        None,
    );
    println!(
        "sample server (UEFI, virtio): BOOT-OK after {:.1} s",
        t.as_secs_f64()
    );
}

#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn sample_server_boots_bios() {
    if skip_without(Firmware::Bios) {
        return;
    }
    let dir = Workspace::artifacts("sample_server_boots_bios");
    let f = boot::sample_server("db1", SampleFw::Bios).unwrap();
    let t = boot_to_ok(
        &dir,
        "bios",
        Firmware::Bios,
        Disk::new(&f.image, Bus::Ahci).readonly(),
        "db1",
        None,
    );
    println!(
        "sample server (BIOS, AHCI): BOOT-OK after {:.1} s",
        t.as_secs_f64()
    );
}

/// The fixed port the boot image's URL names (so the cached image fits every run); the relay
/// falls back to any port (and the image is rebuilt) if it is taken.
const E2E_PORT: u16 = 47831;

/// How a replacement server starts the restore image.
struct Flow {
    name: &'static str,
    fw: Firmware,
    /// Boot media attached beside the blank target (USB stick, CD).
    media: Option<(PathBuf, Bus)>,
    /// PXE: (TFTP root, boot file); an http:// boot file is fetched by the NIC's iPXE ROM.
    pxe: Option<(PathBuf, String)>,
    nic: &'static str,
    target_bus: Bus,
}

struct Figures {
    first_chunk: Option<Duration>,
    job_start: Duration,
    restored: Duration,
    boot_ok: Option<Duration>,
}

/// Deletes `\EFI\BOOT` from the ESP of `disk` (mtools, on the image file).
fn remove_efi_fallback(disk: &Path) {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .output()
        .unwrap();
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let start = t["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
        .and_then(|p| p["start"].as_u64())
        .expect("an ESP");
    let out = Command::new("mdeltree")
        .arg("-i")
        .arg(format!("{}@@{}", disk.display(), start * 512))
        .arg("::EFI/BOOT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mdeltree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn has_mbr_boot_code(disk: &Path) -> bool {
    use std::io::Read;
    let mut mbr = [0u8; 440];
    let mut f = std::fs::File::open(disk).unwrap();
    f.read_exact(&mut mbr).unwrap();
    mbr.iter().any(|&b| b != 0)
}

/// Boots the restore image as `flow` says onto a blank disk twice the source's size, waits for
/// the restore and the reboot, then boots the restored disk alone and waits for BOOT-OK.
fn restore_flow(dir: &Path, flow: &Flow, app: &Appliance, host: &str, source_size: u64) -> Figures {
    let target = dir.join(format!("{}-target.img", flow.name));
    sparse_file(&target, 2 * source_size);
    let mut spec = VmSpec::new(flow.name, flow.fw);
    spec.memory_mib = 1536;
    if let Some((m, bus)) = &flow.media {
        // A copy, so that "never written" can be checked and the cached image stays pristine.
        let copy = dir.join(format!("{}-media", flow.name));
        std::fs::copy(m, &copy).unwrap();
        spec.disks.push(Disk::new(&copy, *bus).boot(1));
    }
    spec.disks.push(Disk::new(&target, flow.target_bus));
    let mut nic = match &flow.pxe {
        Some((tftp, bootfile)) => Nic::pxe(flow.nic, tftp, bootfile),
        None => Nic::new(flow.nic),
    };
    // shim cannot fetch GRUB through iPXE's PXE emulation: UEFI TFTP boot uses OVMF's PXE client.
    nic.no_rom = flow.fw != Firmware::Bios
        && flow
            .pxe
            .as_ref()
            .is_some_and(|(_, f)| !f.starts_with("http"));
    spec.nics.push(nic);
    let mut vm = Vm::start(spec, dir).unwrap();
    let job_start = vm
        .wait_for("restorer: starting `restorer restore", BOOT_TIMEOUT)
        .unwrap();
    let (which, restored) = vm
        .wait_for_any(
            &["restorer: rebooting", "restorer: FAILED"],
            RESTORE_TIMEOUT,
        )
        .unwrap();
    assert_eq!(
        which,
        0,
        "{}: restore failed; serial log {}",
        flow.name,
        vm.log.display()
    );
    let first_chunk = app
        .watch
        .first_chunk()
        .map(|t| t.saturating_duration_since(vm.started));
    if flow.fw == Firmware::UefiSecureBoot {
        assert!(
            vm.output().contains("secureboot: Secure boot enabled"),
            "{}: Secure Boot was not enforced",
            flow.name
        );
    }
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    if let Some((m, _)) = &flow.media {
        let copy = dir.join(format!("{}-media", flow.name));
        assert_eq!(
            std::fs::read(m).unwrap(),
            std::fs::read(&copy).unwrap(),
            "{}: the boot medium was written",
            flow.name
        );
    }
    if flow.fw == Firmware::Bios {
        assert!(
            has_mbr_boot_code(&target),
            "{}: the restore lost the MBR boot code",
            flow.name
        );
    }
    // UEFI: the restorer wrote a boot entry for the restored system's own loader. Without the
    // removable-media fallback (as many installs are), the restored disk boots through it, on
    // the same machine's NVRAM.
    let vars = (flow.fw != Firmware::Bios).then(|| {
        assert!(
            vm.output().contains("UEFI boot entry Boot")
                && vm.output().contains("\\EFI\\debian\\shimx64.efi"),
            "{}: no UEFI boot entry written; serial log {}",
            flow.name,
            vm.log.display()
        );
        if flow.fw == Firmware::Uefi {
            remove_efi_fallback(&target);
        }
        dir.join(format!("{}.vars.fd", flow.name))
    });
    let uefi = vars.is_some();
    let restored_vm = format!("{}-restored", flow.name);
    let boot_ok = Some(boot_to_ok(
        dir,
        &restored_vm,
        flow.fw,
        Disk::new(&target, flow.target_bus),
        host,
        vars,
    ));
    if uefi {
        let log = std::fs::read(dir.join(format!("{restored_vm}.serial.log"))).unwrap();
        let want = "starting Boot";
        let entry = format!("\"{host} (restored)\" from HD(");
        assert!(
            String::from_utf8_lossy(&log)
                .lines()
                .any(|l| l.contains(want) && l.contains(&entry)),
            "{}: the firmware did not boot the restorer's entry",
            flow.name
        );
    }
    Figures {
        first_chunk,
        job_start,
        restored,
        boot_ok,
    }
}

/// Every boot path restores the sample server and the restored disk boots: PXE (UEFI and BIOS
/// through the NIC's iPXE over HTTP from `appliance serve --boot`; UEFI with Secure Boot through
/// shim + GRUB over TFTP),
/// the USB image (OVMF with Secure Boot enforced and Microsoft keys; SeaBIOS), the ISO (SeaBIOS
/// and OVMF). One appliance, one image, flows in sequence (2 cores). `BMR_E2E_FLOWS=a,b` picks.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn restore_boot_paths() {
    if skip_without(Firmware::UefiSecureBoot) {
        return;
    }
    let dir = Workspace::artifacts("restore_boot_paths");
    let host = "web1";
    let src = boot::sample_server(host, SampleFw::Hybrid).unwrap();
    // The image names the relay's port; build it first, then serve its directory.
    let url = format!("http://10.0.2.2:{E2E_PORT}/store");
    let image =
        boot::boot_image(Some(&url), &format!("restorer.host={host}"), "pxe,usb,iso").unwrap();
    let app = appliance(&dir, host, &src.image, Some(&image.dir), E2E_PORT);
    assert_eq!(
        app.watch.port, E2E_PORT,
        "port {E2E_PORT} is taken: the image's URL would be wrong"
    );
    println!(
        "boot image: kernel+initrd {:.1} MiB, usb.img {:.1} MiB, restore.iso {:.1} MiB; source disk {:.0} MiB",
        (image.summary["vmlinuz_bytes"].as_u64().unwrap_or(0) + image.summary["initrd"]["bytes"].as_u64().unwrap_or(0)) as f64
            / (1 << 20) as f64,
        mib(&image.usb()),
        mib(&image.iso()),
        mib(&src.image)
    );
    let flows = [
        Flow {
            // The NIC's iPXE (QEMU's option ROM) fetches boot.ipxe over HTTP: no TFTP at all.
            name: "pxe-uefi-ipxe",
            fw: Firmware::Uefi,
            media: None,
            pxe: Some((
                image.pxe(),
                format!("http://10.0.2.2:{E2E_PORT}/boot/pxe/boot.ipxe"),
            )),
            nic: "virtio-net-pci",
            target_bus: Bus::Nvme,
        },
        Flow {
            name: "pxe-uefi-grub",
            fw: Firmware::UefiSecureBoot,
            media: None,
            pxe: Some((image.pxe(), "bootx64.efi".into())),
            nic: "virtio-net-pci",
            target_bus: Bus::Nvme,
        },
        Flow {
            name: "pxe-bios-ipxe",
            fw: Firmware::Bios,
            media: None,
            pxe: Some((
                image.pxe(),
                format!("http://10.0.2.2:{E2E_PORT}/boot/pxe/boot.ipxe"),
            )),
            nic: "e1000",
            target_bus: Bus::Nvme,
        },
        Flow {
            // pxelinux.0 from TFTP (run by the NIC's PXE stack), then kernel and initrd by TFTP.
            name: "pxe-bios-pxelinux",
            fw: Firmware::Bios,
            media: None,
            pxe: Some((image.pxe(), "pxelinux.0".into())),
            nic: "e1000",
            target_bus: Bus::Ahci,
        },
        Flow {
            name: "usb-uefi-secureboot",
            fw: Firmware::UefiSecureBoot,
            media: Some((image.usb(), Bus::Usb)),
            pxe: None,
            nic: "e1000e",
            target_bus: Bus::Ahci,
        },
        Flow {
            name: "usb-bios",
            fw: Firmware::Bios,
            media: Some((image.usb(), Bus::Usb)),
            pxe: None,
            nic: "virtio-net-pci",
            target_bus: Bus::Ahci,
        },
        Flow {
            name: "iso-bios",
            fw: Firmware::Bios,
            media: Some((image.iso(), Bus::Cdrom)),
            pxe: None,
            nic: "virtio-net-pci",
            target_bus: Bus::Virtio,
        },
        Flow {
            name: "iso-uefi",
            fw: Firmware::Uefi,
            media: Some((image.iso(), Bus::Cdrom)),
            pxe: None,
            nic: "e1000",
            target_bus: Bus::Nvme,
        },
    ];
    let only = std::env::var("BMR_E2E_FLOWS").ok();
    let mut failed = Vec::new();
    for f in &flows {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|n| n == f.name))
        {
            continue;
        }
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            restore_flow(&dir, f, &app, host, src.size)
        }));
        match r {
            Ok(fig) => println!(
                "{:22} power-on -> job {:5.1} s, -> first chunk request {}, -> restored+reboot {:5.1} s; restored disk BOOT-OK after {} (flow {:.0} s)",
                f.name,
                fig.job_start.as_secs_f64(),
                fig.first_chunk.map_or("n/a".into(), |t| format!("{:5.1} s", t.as_secs_f64())),
                fig.restored.as_secs_f64(),
                fig.boot_ok.map_or("(not booted)".into(), |t| format!("{:4.1} s", t.as_secs_f64())),
                t0.elapsed().as_secs_f64()
            ),
            Err(_) => failed.push(f.name),
        }
        app.watch.reset();
    }
    assert!(
        failed.is_empty(),
        "flows failed: {failed:?} (logs in {})",
        dir.display()
    );
}

/// An unknown host on the kernel command line: one clear line on the serial console, a shell,
/// no reboot, and not a byte written to the disk.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn unknown_host_fails_cleanly() {
    if skip_without(Firmware::Bios) {
        return;
    }
    let dir = Workspace::artifacts("unknown_host_fails_cleanly");
    let src = boot::sample_server("web1", SampleFw::Hybrid).unwrap();
    let image = boot::boot_image(None, "", "pxe").unwrap();
    let app = appliance(&dir, "web1", &src.image, None, 0);
    let target = dir.join("target.img");
    sparse_file(&target, 512 << 20);
    let mut spec = VmSpec::new("unknown-host", Firmware::Bios);
    spec.disks.push(Disk::new(&target, Bus::Nvme));
    spec.nics.push(Nic::new("virtio-net-pci"));
    let pxe = image.pxe();
    spec.kernel = Some((
        pxe.join("vmlinuz"),
        pxe.join("initrd.img"),
        format!(
            "console=tty0 console=ttyS0,115200n8 restorer.url={} restorer.host=nosuch",
            app.url
        ),
    ));
    let mut vm = Vm::start(spec, &dir).unwrap();
    let t = vm.wait_for("restorer: FAILED: ", BOOT_TIMEOUT).unwrap();
    vm.wait_for("\n", Duration::from_secs(5)).ok();
    let out = vm.output();
    let line = out
        .lines()
        .find(|l| l.starts_with("restorer: FAILED: "))
        .unwrap()
        .to_string();
    println!("failure line after {:.1} s: {line}", t.as_secs_f64());
    assert!(
        line.contains("nosuch"),
        "the reason should name the host: {line}"
    );
    vm.send_line("echo SHELL-$((6*7))").unwrap();
    vm.wait_for("SHELL-42", Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        vm.wait_exit(Duration::from_millis(10)).is_err(),
        "the VM rebooted or stopped after a failure"
    );
    vm.kill();
    assert!(
        all_zero(&target),
        "something was written to the target disk"
    );
    assert!(app.watch.first_chunk().is_none());
    // The boot image told the appliance how its job ended.
    let log = std::fs::read_to_string(dir.join("appliance-serve.stderr")).unwrap_or_default();
    assert!(
        log.contains("progress nosuch: failed"),
        "no failure report reached the appliance: {log}"
    );
}

/// The media pass their own tools' checks: the USB image's GPT (`sgdisk -v`) and FAT
/// (`fsck.fat -n`), the ISO's El Torito catalogue (BIOS and UEFI entries), and the size budget.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn boot_media_are_clean() {
    let tools = ["sgdisk", "fsck.fat", "xorriso"];
    if tools
        .iter()
        .any(|t| Command::new(t).arg("--version").output().is_err())
    {
        eprintln!("SKIPPED: {tools:?} missing (scripts/setup installs them)");
        return;
    }
    let dir = Workspace::artifacts("boot_media_are_clean");
    let image = boot::boot_image(
        Some("http://10.0.2.2:47831/store"),
        "restorer.host=web1",
        "pxe,usb,iso",
    )
    .unwrap();
    let boot_bytes = image.summary["vmlinuz_bytes"].as_u64().unwrap()
        + image.summary["initrd"]["bytes"].as_u64().unwrap();
    println!(
        "kernel + initrd: {:.1} MiB",
        boot_bytes as f64 / (1 << 20) as f64
    );
    assert!(boot_bytes < 80 << 20);

    let out = Command::new("sgdisk")
        .arg("-v")
        .arg(image.usb())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No problems found"),
        "sgdisk -v: {text}"
    );
    // The ESP: partition 1 from 1 MiB to 1 MiB before the end.
    let size = std::fs::metadata(image.usb()).unwrap().len();
    let esp = dir.join("esp.img");
    bmr_tests::util::extract(&image.usb(), 1 << 20, size - (2 << 20), &esp).unwrap();
    let out = Command::new("fsck.fat")
        .arg("-n")
        .arg(&esp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck.fat -n: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new("xorriso")
        .args(["-indev"])
        .arg(image.iso())
        .args(["-report_el_torito", "plain"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BIOS") && text.contains("UEFI"),
        "El Torito entries: {text}"
    );
    for f in [
        "vmlinuz",
        "initrd.img",
        "boot.ipxe",
        "pxelinux.0",
        "ldlinux.c32",
        "pxelinux.cfg/default",
        "bootx64.efi",
        "grubx64.efi",
        "grub/grub.cfg",
    ] {
        assert!(image.pxe().join(f).exists(), "pxe/{f} missing");
    }
}
