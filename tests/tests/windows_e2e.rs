//! Dissimilar hardware, Windows (issue 9), end to end in QEMU: a Windows Server 2019-like disk
//! (GPT, real NTFS made by mkntfs, SYSTEM and SOFTWARE hives with ControlSet001/002, `Select`
//! and a `DriverDatabase`) is PXE-restored by the boot image onto an NVMe disk of a machine with
//! a virtio-net NIC, with `restorer.drivers=` naming a driver tarball on the appliance. The
//! injection runs inside the boot image (ntfs-3g over FUSE, hivexsh). Read back on the host with
//! independent tools (ntfscat, `hivexregedit --export`): Windows' own stornvme is boot-start and
//! bound to the NVMe class ID, the NIC package is staged with the first-boot script, and the
//! hives differ from the source's by exactly the plan recorded on the volume (which the serial
//! log lists). No Windows boots here: docs/windows.md says what this proves and what it does not.

#[path = "../../drivers-inject/tests/fixtures/mod.rs"]
mod winfix;

use bmr_tests::boot::{self, appliance::Appliance};
use bmr_tests::qemu::{Bus, Disk, Firmware, Nic, Vm, VmSpec};
use bmr_tests::util::{extract, Workspace};
use drivers_inject::windows::hive::Data;
use drivers_inject::windows::inject::{HiveName, Plan};
use std::process::Command;
use std::time::{Duration, Instant};

const PORT: u16 = 47861;

#[test]
#[ignore = "system test (QEMU): scripts/test runs it"]
fn windows_restored_onto_nvme_gets_its_drivers_in_the_boot_image() {
    for tool in ["mkntfs", "ntfs-3g", "ntfscat", "hivexregedit", "sfdisk"] {
        winfix::require(tool);
    }
    let dir = Workspace::artifacts("windows_restored_onto_nvme");
    let source = winfix::windows_disk(&dir, 17763);
    let src_vol = dir.join("source-volume.img");
    extract(&source, winfix::WIN_PART.0, winfix::WIN_PART.1, &src_vol).unwrap();
    let before_sys = winfix::ntfs_hive_export(&src_vol, HiveName::System);
    let before_sw = winfix::ntfs_hive_export(&src_vol, HiveName::Software);

    let url = format!("http://10.0.2.2:{PORT}/store");
    let drivers = format!("http://10.0.2.2:{PORT}/boot/drivers/virtio-win.tar.gz");
    let image = boot::boot_image(
        Some(&url),
        &format!("restorer.host=win1 restorer.drivers={drivers} restorer.after=poweroff"),
        "pxe",
    )
    .unwrap();
    // The boot files the appliance serves: the boot image and the driver tarball beside it.
    let bootdir = dir.join("boot");
    let _ = std::fs::remove_dir_all(&bootdir);
    let cp = Command::new("cp")
        .arg("-r")
        .arg(&image.dir)
        .arg(&bootdir)
        .status()
        .unwrap();
    assert!(cp.success(), "copying {}", image.dir.display());
    let repo = winfix::make_repo(&dir.join("repo"));
    std::fs::create_dir_all(bootdir.join("drivers")).unwrap();
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(bootdir.join("drivers/virtio-win.tar.gz"))
        .arg("-C")
        .arg(&repo)
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());
    let app = Appliance::start(
        &dir.join("appliance"),
        "win1",
        &source,
        Some(&bootdir),
        PORT,
    )
    .unwrap();
    assert_eq!(
        app.watch.port, PORT,
        "port {PORT} is taken: the image's URL would be wrong"
    );

    let target = dir.join("nvme.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let mut spec = VmSpec::new("windows-restore", Firmware::Bios);
    spec.memory_mib = 1024;
    spec.disks.push(Disk::new(&target, Bus::Nvme));
    let bootfile = format!("http://10.0.2.2:{PORT}/boot/pxe/boot.ipxe");
    spec.nics
        .push(Nic::pxe("virtio-net-pci", &bootdir.join("pxe"), &bootfile));
    let t0 = Instant::now();
    let mut vm = Vm::start(spec, &dir).unwrap();
    let (which, _) = vm
        .wait_for_any(
            &["restorer: powering off", "restorer: FAILED"],
            Duration::from_secs(900),
        )
        .unwrap();
    let out = vm.output();
    assert_eq!(
        which,
        0,
        "the restore failed; serial log {}",
        vm.log.display()
    );
    let _ = vm.wait_exit(Duration::from_secs(120));
    println!(
        "PXE boot + restore + Windows injection {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    for l in out.lines().filter(|l| l.contains("windows: ")) {
        println!("    {}", l.trim());
    }
    for want in [
        "windows: Windows Server 2019",
        "Windows' own stornvme for PCI\\CC_010802",
        "netkvm",
        "set HKLM\\SYSTEM\\ControlSet001\\Services\\stornvme\\Start = 0x0",
    ] {
        assert!(
            out.contains(want),
            "the serial log lacks {want:?}: {}",
            vm.log.display()
        );
    }

    let (_, parts) = winfix_table(&target);
    let (off, size) = parts
        .into_iter()
        .find(|(o, _)| *o == winfix::WIN_PART.0)
        .expect("the Windows partition at its place");
    let vol = dir.join("restored-volume.img");
    extract(&target, off, size, &vol).unwrap();
    let record: Vec<Plan> =
        serde_json::from_slice(&winfix::ntfscat(&vol, "/Windows/bmr-drivers/record.json")).unwrap();
    assert_eq!(record.len(), 1, "one injection recorded");
    let plan = &record[0];
    let after_sys = winfix::ntfs_hive_export(&vol, HiveName::System);
    let after_sw = winfix::ntfs_hive_export(&vol, HiveName::Software);
    assert_eq!(
        winfix::actual(&before_sys, &after_sys),
        winfix::expected(plan, HiveName::System),
        "SYSTEM: the restored hive differs from the source's by exactly the recorded plan"
    );
    assert_eq!(
        winfix::actual(&before_sw, &after_sw),
        winfix::expected(plan, HiveName::Software),
        "SOFTWARE: the restored hive differs from the source's by exactly the recorded plan"
    );
    assert_eq!(
        after_sys.value("ControlSet001\\Services\\stornvme", "Start"),
        Some(&Data::Dword(0))
    );
    assert_eq!(
        winfix::ntfscat(&vol, "/Windows/bmr-drivers/netkvm/netkvm.sys"),
        b"MZ netkvm.sys"
    );
    let firstboot =
        String::from_utf8(winfix::ntfscat(&vol, "/Windows/bmr-drivers/firstboot.cmd")).unwrap();
    assert!(firstboot.contains("pnputil"), "{firstboot}");
    let log = std::fs::read_to_string(&app.log).unwrap_or_default();
    assert!(
        log.contains("GET /boot/drivers/virtio-win.tar.gz 200"),
        "the driver tarball was not fetched from the appliance: {}",
        app.log.display()
    );
}

/// The partitions of a disk image (start, size in bytes) by `sfdisk --json`.
fn winfix_table(disk: &std::path::Path) -> (String, Vec<(u64, u64)>) {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &v["partitiontable"];
    let parts = t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
            )
        })
        .collect();
    (t["label"].as_str().unwrap_or("").to_string(), parts)
}
