//! Dissimilar hardware, Linux (issue 11): real Debian 12 servers (`bmr_tests::realsys`, built
//! with debootstrap and prepared on their source hardware: virtio-blk disk, virtio-net NIC)
//! restored through the PXE-booted boot image onto machines they have never seen, then booted
//! there: the marker must come up with the root on the new controller and the HTTP service
//! must answer on the static IP through the new NIC. The control restores the same snapshot with
//! `restorer.adapt=0` and asserts where that boot stops; the same-hardware restore must change
//! nothing. One of them has RHEL's default layout: XFS on LVM. Logs under `target/e2e/<test>/`.

use bmr_tests::boot::{self, appliance::Appliance};
use bmr_tests::qemu::{Bus, Disk, Firmware, Nic, Vm, VmSpec};
use bmr_tests::realsys::{self, RealServer, Up, Variant};
use bmr_tests::util::{free_port, Workspace};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RESTORE_TIMEOUT: Duration = Duration::from_secs(1200);
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// The replacement machine: its boot disk's bus and its NIC.
struct Hardware {
    disk: Bus,
    nic: &'static str,
    mac: String,
    slot: u8,
}

/// Another controller, another NIC model in another PCI slot with another MAC.
fn nvme_e1000e() -> Hardware {
    Hardware {
        disk: Bus::Nvme,
        nic: "e1000e",
        mac: "52:54:00:be:ef:01".into(),
        slot: 5,
    }
}

fn server(v: Variant) -> Option<RealServer> {
    if let Err(e) = realsys::available(v) {
        eprintln!("SKIPPED: {e:#}");
        return None;
    }
    Some(realsys::real_server(v).unwrap())
}

fn nic(hw: &Hardware, pxe: Option<(&Path, &str)>) -> Nic {
    let base = match pxe {
        Some((tftp, file)) => Nic::pxe(hw.nic, tftp, file),
        None => Nic::new(hw.nic),
    };
    Nic {
        mac: Some(hw.mac.clone()),
        addr: Some(hw.slot),
        ..base
    }
}

/// PXE-boots the boot image (iPXE over HTTP from the appliance) on `hw` with a blank disk and
/// waits for the job to end; returns the target image and the restore's serial output.
fn restore(
    dir: &Path,
    name: &str,
    s: &RealServer,
    port: u16,
    extra: &str,
    hw: &Hardware,
) -> (PathBuf, String) {
    let url = format!("http://10.0.2.2:{port}/store");
    let image = boot::boot_image(
        Some(&url),
        &format!("restorer.host={} {extra}", s.host),
        "pxe",
    )
    .unwrap();
    let app = Appliance::start(&dir.join(name), &s.host, &s.image, Some(&image.dir), port).unwrap();
    assert_eq!(
        app.watch.port, port,
        "port {port} is taken: the image's URL would be wrong"
    );
    let target = dir.join(format!("{name}-target.img"));
    let f = std::fs::File::create(&target).unwrap();
    f.set_len(s.size + (1 << 30)).unwrap();
    let mut spec = VmSpec::new(name, s.variant.firmware());
    spec.memory_mib = 1536;
    spec.disks.push(Disk::new(&target, hw.disk));
    let bootfile = format!("http://10.0.2.2:{port}/boot/pxe/boot.ipxe");
    spec.nics.push(nic(hw, Some((&image.pxe(), &bootfile))));
    let t0 = Instant::now();
    let mut vm = Vm::start(spec, dir).unwrap();
    let (which, _) = vm
        .wait_for_any(
            &["restorer: rebooting", "restorer: FAILED"],
            RESTORE_TIMEOUT,
        )
        .unwrap();
    let out = vm.output();
    assert_eq!(
        which,
        0,
        "{name}: the restore failed; serial log {}",
        vm.log.display()
    );
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    println!(
        "{name}: PXE boot + restore + adaptation {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    (target, out)
}

enum Boot {
    Up(Up, String),
    Stopped(String),
}

/// Boots the restored disk on `hw` (with the NVRAM of the machine that restored it) and waits
/// for the marker or a known early stop; on the marker, fetches the HTTP page from the host.
fn boot_restored(dir: &Path, name: &str, s: &RealServer, target: &Path, hw: &Hardware) -> Boot {
    let port = free_port();
    let fw = s.variant.firmware();
    let mut spec = VmSpec::new(&format!("{name}-restored"), fw);
    spec.disks.push(Disk::new(target, hw.disk));
    if fw != Firmware::Bios {
        spec.vars = Some(dir.join(format!("{name}.vars.fd")));
    }
    let mut n = nic(hw, None);
    n.hostfwd = vec![(port, 80)];
    spec.nics.push(n);
    let mut vm = Vm::start(spec, dir).unwrap();
    let mut patterns = vec![s.marker.as_str()];
    patterns.extend(realsys::STOPPED);
    let (which, t) = vm.wait_for_any(&patterns, BOOT_TIMEOUT).unwrap();
    if which != 0 {
        // Let it print the rest of the reason.
        std::thread::sleep(Duration::from_secs(5));
        let out = vm.output();
        vm.kill();
        return Boot::Stopped(out);
    }
    std::thread::sleep(Duration::from_millis(500));
    let up = Up::parse(&vm.output()).expect("a marker line");
    println!(
        "{name}: restored system up after {:.0} s: {}",
        t.as_secs_f64(),
        up.line
    );
    let page =
        realsys::http_get(port, Duration::from_secs(60)).unwrap_or_else(|e| format!("ERROR {e:#}"));
    vm.kill();
    Boot::Up(up, page)
}

fn assert_up(b: Boot, s: &RealServer, root_prefix: &str, what: &str) {
    match b {
        Boot::Up(up, page) => {
            assert_eq!(up.host, s.host);
            assert!(
                up.root.starts_with(root_prefix),
                "{what}: root on {} (want {root_prefix}*)",
                up.root
            );
            assert!(up.has_static_ip(), "{what}: no static IP: {}", up.line);
            assert!(
                page.contains(&s.host),
                "{what}: the HTTP service did not answer: {page}"
            );
        }
        Boot::Stopped(out) => {
            let tail: Vec<&str> = out.lines().rev().take(15).collect();
            panic!("{what}: the restored system did not come up: {:?}", tail);
        }
    }
}

/// Restores `s` onto `hw` with adaptation and asserts the system comes up there, its root on
/// `root` and its HTTP service answering; `expect` are lines the adaptation must print.
fn migrate(
    dir: &Path,
    name: &str,
    s: &RealServer,
    port: u16,
    hw: &Hardware,
    root: &str,
    expect: &[&str],
) {
    let (target, out) = restore(dir, name, s, port, "", hw);
    for want in expect {
        assert!(
            out.contains(want),
            "{name}: adaptation output lacks {want:?}; serial log in {}",
            dir.display()
        );
    }
    for l in out.lines().filter(|l| l.contains("adapt: ")) {
        println!("    {}", l.trim());
    }
    assert_up(
        boot_restored(dir, name, s, target.as_path(), hw),
        s,
        root,
        name,
    );
}

/// Debian with initramfs-tools `MODULES=dep` (built on virtio) restored onto NVMe with an
/// e1000e NIC in another slot with another MAC: adapted, it comes up; the control, restored
/// with `restorer.adapt=0`, stops without its root device.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn debian_dep_initramfs_onto_nvme_and_e1000e() {
    let Some(s) = server(Variant::InitramfsTools) else {
        return;
    };
    let dir = Workspace::artifacts("debian_dep_initramfs_onto_nvme_and_e1000e");
    let hw = nvme_e1000e();
    migrate(
        &dir,
        "adapt",
        &s,
        47841,
        &hw,
        "/dev/nvme0n1",
        &["adapt: this machine:", "lacks nvme", "rebuilt", "pinned"],
    );

    let (target, out) = restore(&dir, "control", &s, 47842, "restorer.adapt=0", &hw);
    assert!(out.contains("adapt: skipped"), "the control was adapted");
    match boot_restored(&dir, "control", &s, &target, &hw) {
        Boot::Up(up, _) => panic!(
            "without adaptation the system came up ({}): the fixture proves nothing",
            up.line
        ),
        Boot::Stopped(out) => {
            let at = realsys::STOPPED.iter().find(|p| out.contains(*p)).unwrap();
            println!("control (restorer.adapt=0): stopped at {at:?}");
            assert!(
                out.contains("Gave up waiting for root") || out.contains("ALERT!"),
                "the control should stop without its root device"
            );
        }
    }
}

/// Debian built with dracut hostonly (which carries q35's AHCI and virtio-scsi drivers but not
/// NVMe's), systemd-networkd matching the source MAC and fstab by `/dev/vdaN`, restored onto NVMe
/// and an e1000e: dracut rebuilds its image in the chroot, fstab gets UUIDs, the MAC binding
/// follows the new NIC.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn dracut_hostonly_onto_nvme_and_e1000e() {
    let Some(s) = server(Variant::Dracut) else {
        return;
    };
    let dir = Workspace::artifacts("dracut_hostonly_onto_nvme_and_e1000e");
    let hw = nvme_e1000e();
    migrate(
        &dir,
        "dracut",
        &s,
        47844,
        &hw,
        "/dev/nvme0n1",
        &[
            "lacks nvme",
            "rebuilt with dracut",
            "/etc/fstab: /dev/vda",
            "MAC binding",
        ],
    );
}

/// RHEL's default layout (`/boot` XFS, root XFS and swap on LVs of VG `rhel`, fstab by
/// `/dev/mapper` names, dracut hostonly) restored onto a bigger NVMe disk with an e1000e: the PV,
/// the root LV and its XFS grow in the boot image, the adaptation activates the restored VG to
/// find the root on it, and dracut rebuilds the image in a chroot with the LV mounted.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn rhel_lvm_xfs_onto_nvme_and_e1000e() {
    let Some(s) = server(Variant::RhelLvm) else {
        return;
    };
    let dir = Workspace::artifacts("rhel_lvm_xfs_onto_nvme_and_e1000e");
    migrate(
        &dir,
        "rhel",
        &s,
        47846,
        &nvme_e1000e(),
        "/dev/mapper/rhel-root",
        &[
            "LV rhel/root takes its new extents (lvextend), its filesystem grown",
            "restored system: Debian GNU/Linux 12 (bookworm) on /dev/mapper/rhel-root (xfs)",
            "lacks nvme",
            "rebuilt with dracut",
            "MAC binding",
        ],
    );
}

/// BIOS Debian (GRUB i386-pc, initramfs-tools `MODULES=dep`, netplan matching the source MAC
/// with `set-name`) restored onto an AHCI disk and an e1000e.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn bios_netplan_onto_ahci_and_e1000e() {
    let Some(s) = server(Variant::BiosNetplan) else {
        return;
    };
    let dir = Workspace::artifacts("bios_netplan_onto_ahci_and_e1000e");
    let hw = Hardware {
        disk: Bus::Ahci,
        ..nvme_e1000e()
    };
    migrate(
        &dir,
        "bios",
        &s,
        47845,
        &hw,
        "/dev/sda",
        &[
            "lacks ahci",
            "/etc/netplan/01-realsys.yaml",
            "matches the new MAC",
        ],
    );
}

/// The same snapshot restored onto the source's own hardware: nothing to adapt, it comes up.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn debian_onto_the_same_hardware_changes_nothing() {
    let Some(s) = server(Variant::InitramfsTools) else {
        return;
    };
    let dir = Workspace::artifacts("debian_onto_the_same_hardware_changes_nothing");
    let hw = Hardware {
        disk: Bus::Virtio,
        nic: "virtio-net-pci",
        mac: s.source_mac.clone(),
        slot: realsys::SOURCE_NIC_SLOT,
    };
    let (target, out) = restore(&dir, "same", &s, 47843, "", &hw);
    assert!(
        out.contains("no adaptation needed"),
        "a restore onto the same hardware changed something; serial log in {}",
        dir.display()
    );
    assert_up(
        boot_restored(&dir, "same", &s, &target, &hw),
        &s,
        "/dev/vda",
        "same hardware",
    );
}
