//! The Windows half of the adaptation through the restorer (issue 9): a GPT disk holding a
//! Windows Server 2019-like volume (real NTFS made by mkntfs, hives populated with hivex) is
//! restored over HTTP onto an image file with `--drivers URL` (a gzip tarball of driver
//! packages on a plain static server), for a machine described by a sysfs-shaped tree
//! (`BMR_SYSFS`: a virtio-blk controller and a virtio-net NIC). The restored volume is read
//! back with independent tools (ntfscat, `hivexregedit --export`): the hives differ from the
//! source's by exactly the plan the report lists, the driver is in `System32\drivers`, the NIC
//! package is staged with the first-boot script, and the volume is clean (`ntfsfix -n`). A
//! second `restorer adapt` (from the folder) finds nothing to change; bad `--drivers` values
//! fail in one line with the disk untouched.

mod common;
#[path = "../../drivers-inject/tests/fixtures/mod.rs"]
mod winfix;

use bmr_tests::util::{extract, Cmd, HttpServer};
use common::*;
use drivers_inject::windows::inject::{HiveName, Plan};
use std::path::Path;
use std::time::Duration;

/// A PCI function as sysfs shows it: vendor, device, class, modalias.
type Pci = (&'static str, &'static str, &'static str, &'static str);

const VIRTIO_BLK: Pci = (
    "0x1af4",
    "0x1001",
    "0x010000",
    "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",
);
const VIRTIO_NET: Pci = (
    "0x1af4",
    "0x1000",
    "0x020000",
    "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
);

/// A sysfs-shaped tree with the PCI functions `devs` (vendor, device, class, modalias).
fn fake_sysfs(root: &Path, devs: &[(&str, Pci)]) {
    for (addr, (vendor, device, class, modalias)) in devs {
        let d = root.join("bus/pci/devices").join(addr);
        std::fs::create_dir_all(&d).unwrap();
        for (f, v) in [
            ("vendor", *vendor),
            ("device", *device),
            ("class", *class),
            ("modalias", *modalias),
            ("revision", "0x00"),
        ] {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
    }
}

/// The restored Windows volume, copied out of the target image.
fn restored_volume(target: &Path, out: &Path) {
    let (_, parts) = target_table(target).unwrap();
    let p = parts
        .iter()
        .find(|p| p.offset == winfix::WIN_PART.0)
        .unwrap_or_else(|| panic!("no partition at {} in {parts:?}", winfix::WIN_PART.0));
    extract(target, p.offset, p.size, out).unwrap();
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn restore_injects_the_chosen_drivers_offline_and_reports_every_write() {
    for tool in ["ntfs-3g", "ntfscat", "ntfsfix", "hivexsh", "hivexregedit"] {
        winfix::require(tool);
    }
    let env = Env::new("windows");
    let disk = winfix::windows_disk(&env.dir, 17763);
    let src = env.dir.join("source-volume.img");
    extract(&disk, winfix::WIN_PART.0, winfix::WIN_PART.1, &src).unwrap();
    let before_sys = winfix::ntfs_hive_export(&src, HiveName::System);
    let before_sw = winfix::ntfs_hive_export(&src, HiveName::Software);
    env.ingest("win1", &[&disk]);
    let srv = env.serve();

    let repo = winfix::make_repo(&env.dir.join("repo"));
    let www = env.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    Cmd::new("tar")
        .arg("-czf")
        .arg(www.join("drivers.tar.gz"))
        .arg("-C")
        .arg(&repo)
        .arg(".")
        .ok();
    let files = HttpServer::python(&www, &env.logs).unwrap();
    let sys = env.dir.join("sys");
    fake_sysfs(
        &sys,
        &[("0000:00:04.0", VIRTIO_BLK), ("0000:00:05.0", VIRTIO_NET)],
    );
    let size = std::fs::metadata(&disk).unwrap().len();
    let target = env.file("target.img", size + 32 * MIB);

    let drivers_url = format!("{}/drivers.tar.gz", files.url);
    let out = restorer()
        .env("BMR_SYSFS", &sys)
        .args(["restore", "--json", "--from", &srv.url, "--host", "win1"])
        .arg("--target")
        .arg(&target)
        .args(["--drivers", &drivers_url])
        .timeout(Duration::from_secs(600))
        .run()
        .no_panic();
    assert!(out.success(), "{}", out.describe());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let win = &v["adapt"]["windows"];
    assert_eq!(win.as_array().map(Vec::len), Some(1), "{v:#}");
    let plan: Plan = serde_json::from_value(win[0]["plan"].clone()).unwrap();
    assert!(plan.windows.contains("17763"), "{}", plan.windows);
    assert_eq!(win[0]["missing"], serde_json::json!([]), "{win:#}");
    let drivers = win[0]["drivers"].to_string();
    assert!(drivers.contains("viostor"), "{drivers}");
    assert!(drivers.contains("netkvm"), "{drivers}");

    let vol = env.dir.join("restored-volume.img");
    restored_volume(&target, &vol);
    let fix = Cmd::new("ntfsfix").arg("-n").arg(&vol).run();
    assert!(fix.success(), "ntfsfix -n: {}", fix.describe());
    let after_sys = winfix::ntfs_hive_export(&vol, HiveName::System);
    let after_sw = winfix::ntfs_hive_export(&vol, HiveName::Software);
    assert_eq!(
        winfix::actual(&before_sys, &after_sys),
        winfix::expected(&plan, HiveName::System),
        "SYSTEM: the restored hive differs from the source's by exactly the plan"
    );
    assert_eq!(
        winfix::actual(&before_sw, &after_sw),
        winfix::expected(&plan, HiveName::Software),
        "SOFTWARE: the restored hive differs from the source's by exactly the plan"
    );
    assert_eq!(
        after_sys.value("ControlSet001\\Services\\viostor", "Start"),
        Some(&drivers_inject::windows::hive::Data::Dword(0))
    );
    assert_eq!(
        winfix::ntfscat(&vol, "/Windows/System32/drivers/viostor.sys"),
        b"MZ viostor.sys for 2k19"
    );
    assert_eq!(
        winfix::ntfscat(&vol, "/Windows/bmr-drivers/netkvm/netkvm.sys"),
        b"MZ netkvm.sys",
        "the NIC package is staged whole"
    );
    let firstboot =
        String::from_utf8(winfix::ntfscat(&vol, "/Windows/bmr-drivers/firstboot.cmd")).unwrap();
    assert!(firstboot.contains("pnputil"), "{firstboot}");
    let record: Vec<Plan> =
        serde_json::from_slice(&winfix::ntfscat(&vol, "/Windows/bmr-drivers/record.json")).unwrap();
    assert_eq!(
        record,
        std::slice::from_ref(&plan),
        "the record on the volume is the report's plan"
    );

    // Again, from the folder: nothing left to do, and nothing written.
    let before = sha(&target);
    let out = restorer()
        .env("BMR_SYSFS", &sys)
        .args(["adapt", "--target"])
        .arg(&target)
        .arg("--drivers")
        .arg(&repo)
        .run()
        .no_panic();
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.contains("windows: nothing to change"),
        "{}",
        out.stdout
    );
    assert_eq!(sha(&target), before);

    // Bad --drivers: one line naming it, non-zero, the disk as it was.
    let empty = env.dir.join("no-drivers");
    std::fs::create_dir_all(&empty).unwrap();
    let missing = env.dir.join("missing.tar");
    for (spec, says) in [
        (empty.display().to_string(), "no driver package"),
        (missing.display().to_string(), "missing.tar"),
        (format!("{}/nothing.tar", files.url), "404"),
    ] {
        let out = restorer()
            .env("BMR_SYSFS", &sys)
            .args(["adapt", "--target"])
            .arg(&target)
            .args(["--drivers", &spec])
            .run()
            .no_panic();
        assert!(!out.success(), "{spec}: {}", out.describe());
        let err = out.stderr.trim();
        assert!(err.contains(says), "{spec}: {err}");
        assert_eq!(sha(&target), before, "{spec}");
    }
    // The dry run names what it would write and writes nothing.
    let out = restorer()
        .env("BMR_SYSFS", &sys)
        .args(["adapt", "--dry-run", "--target"])
        .arg(&disk)
        .arg("--drivers")
        .arg(&repo)
        .run()
        .no_panic();
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout
            .contains("would set HKLM\\SYSTEM\\ControlSet001\\Services\\viostor\\Start = 0x0"),
        "{}",
        out.stdout
    );
    let again = env.dir.join("source-again.img");
    extract(&disk, winfix::WIN_PART.0, winfix::WIN_PART.1, &again).unwrap();
    assert_eq!(sha(&again), sha(&src), "the dry run wrote to the disk");
}
