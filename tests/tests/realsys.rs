//! The real Debian 12 servers (`bmr_tests::realsys`): each boots on its source hardware, reaches
//! its marker with the root on virtio-blk and serves its page on its static IP; and the control:
//! the initramfs-tools server moved as-is onto other hardware (NVMe, e1000e in another slot with
//! another MAC) does not come up, which is what makes it a test subject for the adaptation.
//!
//! The first run builds the images (debootstrap from the Debian mirror, root, minutes each) into
//! `/var/cache/bmr/realsys/`; later runs take them from there. Serial logs stay under
//! `target/e2e/<test>/`. Each test prints its figures.

use bmr_tests::qemu::{Bus, Disk, Firmware, Nic, Vm, VmSpec};
use bmr_tests::realsys::{self, Up, Variant, MARKER_PREFIX, STOPPED};
use bmr_tests::util::{free_port, Workspace};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

fn skip(v: Variant) -> bool {
    match realsys::available(v) {
        Ok(()) => false,
        Err(e) => {
            eprintln!("SKIPPED: {e:#}");
            true
        }
    }
}

/// The server of `v` on its own source hardware (throwaway overlay).
fn boots_on_source(v: Variant) {
    if skip(v) {
        return;
    }
    let t = Instant::now();
    let s = realsys::real_server(v).unwrap();
    let ready = t.elapsed();
    let dir = Workspace::artifacts(&format!("realsys_{}_source", v.tag()));
    let spec = realsys::source_vm(&s, "source");
    let port = spec.nics[0].hostfwd[0].0;
    let mut vm = Vm::start(spec, &dir).unwrap();
    let up = realsys::wait_up(&mut vm, BOOT_TIMEOUT).unwrap();
    let at = vm.started.elapsed();
    assert_eq!(up.host, s.host, "{}", up.line);
    assert!(
        up.root.starts_with(v.source_root()),
        "root not on {}: {}",
        v.source_root(),
        up.line
    );
    assert!(
        up.has_static_ip(),
        "no {} on the source NIC: {}",
        s.ip,
        up.line
    );
    assert!(
        up.nics
            .contains(&format!("{}={}", s.source_nic, s.source_mac)),
        "{}",
        up.line
    );
    let h = Instant::now();
    let page = realsys::http_get(port, Duration::from_secs(120)).unwrap();
    assert!(page.contains(&s.host), "page: {page}");
    println!(
        "{} ({v:?}, kernel {}): image {} ({} MiB, ready after {:.1} s); on its source hardware: \
         marker at {:.1} s, page from the host {:.1} s later; {}",
        s.host,
        s.kernel,
        s.image.display(),
        s.size >> 20,
        ready.as_secs_f64(),
        at.as_secs_f64(),
        h.elapsed().as_secs_f64(),
        up.line
    );
    println!(
        "  build figures (TCG): build.sh {:.0} s (debootstrap {:.0} s), prepare boot {:.0} s, \
         proof boot marker {:.0} s; initramfs: {}",
        s.timings.build,
        s.timings.debootstrap,
        s.timings.prepare_boot,
        s.timings.proof_marker,
        s.initrds.join(", ")
    );
}

#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn initramfs_tools_server_boots_on_its_source_hardware() {
    boots_on_source(Variant::InitramfsTools);
}

#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn dracut_server_boots_on_its_source_hardware() {
    boots_on_source(Variant::Dracut);
}

#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn bios_netplan_server_boots_on_its_source_hardware() {
    boots_on_source(Variant::BiosNetplan);
}

/// RHEL's default layout: `/boot` XFS, root XFS and swap on LVM, dracut hostonly.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn rhel_lvm_xfs_server_boots_on_its_source_hardware() {
    boots_on_source(Variant::RhelLvm);
}

/// The control: the same disk on an NVMe controller with an e1000e NIC (another slot, another
/// MAC), no adaptation. MODULES=dep left nvme out of the initramfs: it must stop there.
#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn initramfs_tools_server_does_not_come_up_on_other_hardware_unadapted() {
    let v = Variant::InitramfsTools;
    if skip(v) {
        return;
    }
    let s = realsys::real_server(v).unwrap();
    let dir = Workspace::artifacts("realsys_itools_unadapted_nvme");
    let mut spec = VmSpec::new("nvme-e1000e", Firmware::Uefi);
    spec.disks
        .push(Disk::new(&s.image, Bus::Nvme).readonly().boot(1));
    spec.nics.push(Nic {
        mac: Some("52:54:00:c0:ff:ee".into()),
        addr: Some(6),
        hostfwd: vec![(free_port(), 80)],
        ..Nic::new("e1000e")
    });
    let mut vm = Vm::start(spec, &dir).unwrap();
    let mut patterns = vec![MARKER_PREFIX];
    patterns.extend_from_slice(STOPPED);
    let (i, at) = vm.wait_for_any(&patterns, BOOT_TIMEOUT).unwrap();
    // let the initramfs finish its message
    std::thread::sleep(Duration::from_secs(5));
    let out = vm.output();
    assert_ne!(
        i,
        0,
        "the unadapted server came up on NVMe: {:?}",
        Up::parse(&out)
    );
    let stop = out
        .lines()
        .filter(|l| STOPPED.iter().any(|p| l.contains(p)))
        .map(str::trim)
        .collect::<Vec<_>>();
    assert!(
        out.contains("Gave up waiting for root") || out.contains("ALERT!"),
        "expected the initramfs to give up on the root: {stop:?}"
    );
    // why: the host-only initramfs has no NVMe driver (its shell answers on the console)
    vm.send_line("echo NVME-KO-$(find /lib/modules -name 'nvme*.ko*' | wc -l)")
        .unwrap();
    let (n, _) = vm
        .wait_for_any(
            &["NVME-KO-0", "NVME-KO-1", "NVME-KO-2", "NVME-KO-3"],
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(n, 0, "the initramfs has NVMe modules");
    println!(
        "{} unadapted on NVMe + e1000e: stopped after {:.1} s at {:?}: {}",
        s.host,
        at.as_secs_f64(),
        patterns[i],
        stop.join(" | ")
    );
}
