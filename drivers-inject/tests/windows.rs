//! The offline Windows edits against hives built here with hivex and checked after every
//! write by an independent reader (`hivexregedit --export` of the whole hive, diffed against
//! the export before and compared with the plan), on plain directories and on one real NTFS
//! volume (mkntfs, ntfs-3g, ntfscat).

mod fixtures;

use drivers_inject::windows::hive::{Data, Snapshot};
use drivers_inject::windows::hwid::PciIds;
use drivers_inject::windows::inject::{self, Device, HiveName, Options, Plan};
use drivers_inject::windows::offline::WindowsVolume;
use drivers_inject::windows::repo::{Repo, WindowsTarget};
use fixtures::*;
use std::path::Path;

const VIRTIO_BLK: &str = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00";
const VIRTIO_NET: &str = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00";
const NVME: &str = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02";
const AHCI: &str = "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01";
const RAID_9400: &str = "pci:v00001000d000000AFsv00001000sd00004000bc01sc04i00";

struct World {
    _t: tempfile::TempDir,
    root: std::path::PathBuf,
    repo: Repo,
}

fn world(system: &SystemHive, build: u32) -> World {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("vol");
    make_volume(&root, system, build);
    let repo = Repo::scan(&make_repo(&t.path().join("repo"))).unwrap();
    World { _t: t, root, repo }
}

fn pci(modalias: &str, rev: u8) -> PciIds {
    PciIds::from_modalias(modalias, rev).unwrap()
}

/// The best package of the repository for a device, as the restorer will choose it.
fn package<'r>(
    repo: &'r Repo,
    os: &WindowsTarget,
    modalias: &str,
    rev: u8,
    boot: bool,
) -> Device<'r> {
    let c = repo.candidates(&pci(modalias, rev), os);
    assert!(!c.is_empty(), "no package for {modalias}");
    Device::from_candidate(&c[0], repo, boot).unwrap()
}

fn hive_path(root: &Path, h: HiveName) -> std::path::PathBuf {
    root.join("Windows/System32/config").join(h.file())
}

/// Runs the injection and checks both hives with full exports: the expected changes are
/// there and nothing else changed. Returns the plan and the exports after.
fn inject_checked(root: &Path, devices: &[Device]) -> (Plan, Snapshot, Snapshot) {
    let before_sys = export(&hive_path(root, HiveName::System));
    let before_sw = export(&hive_path(root, HiveName::Software));
    let vol = WindowsVolume::open(root, false).unwrap();
    let plan = inject::inject(&vol, devices, &Options::default()).unwrap();
    let after_sys = export(&hive_path(root, HiveName::System));
    let after_sw = export(&hive_path(root, HiveName::Software));
    // The library reads hives with its own regf reader: it agrees with hivex's on every key
    // and every byte of every value, before and after hivexsh's writes.
    let reread = WindowsVolume::open(root, false).unwrap();
    assert_eq!(
        reread.system.export_all().unwrap(),
        after_sys,
        "own reader, SYSTEM"
    );
    assert_eq!(
        reread.software.export_all().unwrap(),
        after_sw,
        "own reader, SOFTWARE"
    );
    assert_eq!(
        actual(&before_sys, &after_sys),
        expected(&plan, HiveName::System),
        "SYSTEM: the export's changes are exactly the plan's"
    );
    assert_eq!(
        actual(&before_sw, &after_sw),
        expected(&plan, HiveName::Software),
        "SOFTWARE: the export's changes are exactly the plan's"
    );
    (plan, after_sys, after_sw)
}

fn sz(s: &str) -> Option<&'static Data> {
    Some(Box::leak(Box::new(Data::Sz(s.into()))))
}

fn dword(v: u32) -> Option<&'static Data> {
    Some(Box::leak(Box::new(Data::Dword(v))))
}

#[test]
fn virtio_blk_on_server_2019_is_installed_boot_start_and_bound() {
    let w = world(&SystemHive::default(), 17763);
    let vol = WindowsVolume::open(&w.root, false).unwrap();
    assert_eq!(vol.target, WindowsTarget::server_2019());
    assert_eq!(vol.product_name, "Windows Server 2019 Standard");
    assert!(vol.driver_database);
    let dev = package(&w.repo, &vol.target, VIRTIO_BLK, 0, true);
    let (plan, sys, sw) = inject_checked(&w.root, &[dev]);

    // The 2k19 folder's driver, in System32\drivers and staged whole.
    let sys_file = std::fs::read(w.root.join("Windows/System32/drivers/viostor.sys")).unwrap();
    assert_eq!(sys_file, b"MZ viostor.sys for 2k19");
    for f in ["viostor.inf", "viostor.sys", "viostor.cat"] {
        assert!(
            w.root.join("Windows/bmr-drivers/viostor").join(f).is_file(),
            "{f}"
        );
    }
    let svc = "ControlSet001\\Services\\viostor";
    assert_eq!(sys.value(svc, "Start"), dword(0));
    assert_eq!(sys.value(svc, "Type"), dword(1));
    assert_eq!(sys.value(svc, "ErrorControl"), dword(1));
    assert_eq!(sys.value(svc, "Group"), sz("SCSI miniport"));
    assert_eq!(
        sys.value(svc, "ImagePath"),
        Some(&Data::ExpandSz("System32\\drivers\\viostor.sys".into()))
    );
    assert_eq!(
        sys.value(&format!("{svc}\\Parameters\\PnpInterface"), "5"),
        dword(1)
    );
    assert_eq!(
        sys.value(&format!("{svc}\\Parameters"), "BusType"),
        dword(1)
    );
    // The DriverDatabase binding.
    let id = "PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00";
    assert_eq!(
        sys.value(&format!("DriverDatabase\\DeviceIds\\{id}"), "viostor.inf"),
        Some(&Data::Binary(vec![1, 0xff, 0, 0]))
    );
    let inf = sys
        .key("DriverDatabase\\DriverInfFiles\\viostor.inf")
        .unwrap();
    let Some(Data::Sz(pkg)) = inf.get("Active") else {
        panic!("no Active package: {inf:?}");
    };
    assert!(
        pkg.starts_with("viostor.inf_amd64_") && pkg.len() == 34,
        "{pkg}"
    );
    assert_eq!(inf.get(""), Some(&Data::MultiSz(vec![pkg.clone()])));
    assert_eq!(
        inf.get("Configurations"),
        Some(&Data::MultiSz(vec!["rhelscsi_inst".into()]))
    );
    let pk = format!("DriverDatabase\\DriverPackages\\{pkg}");
    assert_eq!(sys.value(&pk, ""), sz("viostor.inf"));
    assert_eq!(sys.value(&pk, "Provider"), sz("Red Hat, Inc."));
    let conf = format!("{pk}\\Configurations\\rhelscsi_inst");
    assert_eq!(sys.value(&conf, "Service"), sz("viostor"));
    assert_eq!(sys.value(&conf, "ConfigFlags"), dword(0));
    let desc = format!("{pk}\\Descriptors\\{id}");
    assert_eq!(sys.value(&desc, "Configuration"), sz("rhelscsi_inst"));
    assert_eq!(
        sys.value(&desc, "Description"),
        sz("Red Hat VirtIO SCSI controller")
    );
    // No CriticalDeviceDatabase on Windows 8+; the other control set is untouched (diff).
    assert!(sys
        .key("ControlSet001\\Control\\CriticalDeviceDatabase")
        .is_none());
    // First boot: DevicePath, RunOnce, AutoReboot off while pending, the script.
    assert_eq!(
        sw.value("Microsoft\\Windows\\CurrentVersion", "DevicePath"),
        Some(&Data::ExpandSz(
            "%SystemRoot%\\inf;%SystemRoot%\\bmr-drivers".into()
        ))
    );
    assert_eq!(
        sw.value("Microsoft\\Windows\\CurrentVersion\\RunOnce", "bmr-drivers"),
        sz("cmd.exe /c \"%SystemRoot%\\bmr-drivers\\firstboot.cmd\"")
    );
    assert_eq!(
        sys.value("ControlSet001\\Control\\CrashControl", "AutoReboot"),
        dword(0)
    );
    let script = std::fs::read_to_string(w.root.join("Windows/bmr-drivers/firstboot.cmd")).unwrap();
    assert!(script.contains("pnputil /add-driver \"%BMR%\\viostor\\viostor.inf\" /install"));
    assert!(
        script.contains("/v AutoReboot /t REG_DWORD /d 1 /f"),
        "old value restored"
    );
    assert!(script.contains("firstboot.log"));
    assert!(!script.contains("netsh"), "no static IPv4 to carry");
    // The record is the plan, and names every original.
    let record: Vec<Plan> = serde_json::from_slice(
        &std::fs::read(w.root.join("Windows/bmr-drivers/record.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record, std::slice::from_ref(&plan));
    let auto = plan
        .registry
        .iter()
        .find(|r| r.name == "AutoReboot")
        .unwrap();
    assert_eq!(auto.original, Some(Data::Dword(1)));
    assert!(w
        .root
        .join("Windows/bmr-drivers/originals/SYSTEM")
        .is_file());
}

#[test]
fn nvme_in_box_only_becomes_boot_start() {
    let w = world(&SystemHive::default(), 17763);
    let dev = Device::in_box(&pci(NVME, 2)).unwrap();
    assert_eq!(dev.hardware_id, "PCI\\CC_010802");
    let drivers_before = tree(&w.root.join("Windows/System32"));
    let (plan, sys, _) = inject_checked(&w.root, &[dev]);
    // The binding is Windows' own (DeviceIds\PCI\CC_010802 -> stornvme.inf): only Start.
    assert_eq!(plan.registry.len(), 1, "{:#?}", plan.registry);
    assert!(plan.keys_created.is_empty());
    assert_eq!(
        sys.value("ControlSet001\\Services\\stornvme", "Start"),
        dword(0)
    );
    assert_eq!(plan.registry[0].original, Some(Data::Dword(3)));
    assert!(plan.files.is_empty() && plan.staged.is_empty());
    let after: Vec<_> = tree(&w.root.join("Windows/System32"))
        .into_iter()
        .filter(|(p, _)| !p.starts_with("config"))
        .collect();
    let before: Vec<_> = drivers_before
        .into_iter()
        .filter(|(p, _)| !p.starts_with("config"))
        .collect();
    assert_eq!(before, after, "no file written outside the hives");
    assert!(!w.root.join("Windows/bmr-drivers/firstboot.cmd").exists());
}

#[test]
fn ahci_in_box_is_bound_in_the_current_control_set() {
    // Select\Current = 2: every write goes to ControlSet002, ControlSet001 stays (the diff
    // against the full export proves it).
    let sys = SystemHive {
        current: Some(2),
        ahci_bound: false,
        ..Default::default()
    };
    let w = world(&sys, 17763);
    let vol = WindowsVolume::open(&w.root, false).unwrap();
    assert_eq!(vol.control_set, 2);
    let dev = Device::in_box(&pci(AHCI, 0)).unwrap();
    let (plan, sys, _) = inject_checked(&w.root, &[dev]);
    assert_eq!(plan.control_set, "ControlSet002");
    assert_eq!(
        sys.value("ControlSet002\\Services\\storahci", "Start"),
        dword(0)
    );
    assert_eq!(
        sys.value("ControlSet001\\Services\\storahci", "Start"),
        dword(3)
    );
    assert_eq!(
        sys.value("DriverDatabase\\DeviceIds\\PCI\\CC_010601", "mshdc.inf"),
        Some(&Data::Binary(vec![1, 0xff, 0, 0]))
    );
    assert!(plan
        .registry
        .iter()
        .all(|r| !r.key.contains("ControlSet001")));
}

#[test]
fn viostor_on_server_2008_r2_uses_the_critical_device_database() {
    let sys = SystemHive {
        driver_database: false,
        ..Default::default()
    };
    let w = world(&sys, 7601);
    let vol = WindowsVolume::open(&w.root, false).unwrap();
    assert_eq!(
        (vol.target.major, vol.target.minor, vol.target.build),
        (6, 1, 7601)
    );
    assert!(!vol.driver_database);
    let dev = package(&w.repo, &vol.target, VIRTIO_BLK, 0, true);
    let (plan, sys, _) = inject_checked(&w.root, &[dev]);
    assert_eq!(
        std::fs::read(w.root.join("Windows/System32/drivers/viostor.sys")).unwrap(),
        b"MZ viostor.sys for 2k8R2"
    );
    let cdd = "ControlSet001\\Control\\CriticalDeviceDatabase\\pci#ven_1af4&dev_1001&subsys_00021af4&rev_00";
    assert_eq!(sys.value(cdd, "Service"), sz("viostor"));
    assert_eq!(
        sys.value(cdd, "ClassGUID"),
        sz("{4D36E97B-E325-11CE-BFC1-08002BE10318}")
    );
    assert!(sys.key("DriverDatabase").is_none());
    assert_eq!(
        sys.value("ControlSet001\\Services\\viostor", "Start"),
        dword(0)
    );
    let script = match &plan
        .files
        .iter()
        .find(|f| f.path.ends_with("firstboot.cmd"))
        .unwrap()
        .source
    {
        inject::Source::Text(t) => t.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        script.contains("pnputil -i -a \"%BMR%\\viostor\\viostor.inf\""),
        "{script}"
    );
}

#[test]
fn vendor_raid_with_include_and_needs() {
    let w = world(&SystemHive::default(), 17763);
    let os = WindowsTarget::server_2019();
    let dev = package(&w.repo, &os, RAID_9400, 1, true);
    assert_eq!(dev.hardware_id, "PCI\\VEN_1000&DEV_00AF&SUBSYS_40001000");
    let (plan, sys, _) = inject_checked(&w.root, &[dev]);
    let drivers = w.root.join("Windows/System32/drivers");
    assert_eq!(
        std::fs::read(drivers.join("esraid.sys")).unwrap(),
        b"MZ esraid.sys"
    );
    assert_eq!(
        std::fs::read(drivers.join("esrlib.sys")).unwrap(),
        b"MZ esrlib.sys",
        "the file of the Needs section from the sibling INF"
    );
    for f in [
        "esraid.INF",
        "esrcommon.inf",
        "ESRAID.SYS",
        "esrlib.sys",
        "esraid.cat",
    ] {
        assert!(
            w.root.join("Windows/bmr-drivers/esraid").join(f).is_file(),
            "{f}"
        );
    }
    let svc = "ControlSet001\\Services\\esraid";
    assert_eq!(sys.value(svc, "Start"), dword(0));
    assert_eq!(sys.value(svc, "Group"), sz("SCSI Miniport"));
    assert_eq!(
        sys.value(&format!("{svc}\\Parameters\\PnpInterface"), "5"),
        dword(1)
    );
    assert_eq!(
        sys.value(&format!("{svc}\\Parameters\\Device"), "DriverParameter"),
        sz("nobusreset=1;")
    );
    assert_eq!(
        sys.value(
            "DriverDatabase\\DeviceIds\\PCI\\VEN_1000&DEV_00AF&SUBSYS_40001000",
            "esraid.inf"
        ),
        Some(&Data::Binary(vec![1, 0xff, 0, 0]))
    );
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("PciIoSpaceNotRequired")),
        "{:?}",
        plan.notes
    );
    assert!(
        plan.notes.iter().any(|n| n.contains("AddReg lines")),
        "{:?}",
        plan.notes
    );
}

#[test]
fn netkvm_is_staged_for_first_boot_and_the_static_ipv4_carried() {
    let sys = SystemHive {
        static_ip: true,
        ..Default::default()
    };
    let w = world(&sys, 17763);
    let os = WindowsTarget::server_2019();
    let nic = package(&w.repo, &os, VIRTIO_NET, 1, false);
    let (plan, sys, _) = inject_checked(&w.root, &[nic]);
    // Not boot-start, not installed offline: only staged.
    assert!(sys.key("ControlSet001\\Services\\netkvm").is_none());
    assert!(!w.root.join("Windows/System32/drivers/netkvm.sys").exists());
    assert!(w
        .root
        .join("Windows/bmr-drivers/netkvm/netkvm.inf")
        .is_file());
    assert!(plan
        .registry
        .iter()
        .all(|r| !r.key.starts_with("DriverDatabase")));
    let script = std::fs::read_to_string(w.root.join("Windows/bmr-drivers/firstboot.cmd")).unwrap();
    assert!(script.contains("pnputil /add-driver \"%BMR%\\netkvm\\netkvm.inf\" /install"));
    assert!(
        script.contains("static 192.168.10.20 255.255.255.0 192.168.10.1 1"),
        "{script}"
    );
    assert!(script.contains("set dns name=\"%BMR_IF%\" static 192.168.10.2 primary"));
    assert!(script.contains("add dns name=\"%BMR_IF%\" 192.168.10.3 index=2"));
    assert!(script.contains("{7d3b9f10-2222-4f00-9a00-000000000002}"));
    assert_eq!(
        sys.value("ControlSet001\\Control\\CrashControl", "AutoReboot"),
        dword(0)
    );
}

#[test]
fn dry_run_writes_nothing() {
    let w = world(&SystemHive::default(), 17763);
    let vol = WindowsVolume::open(&w.root, false).unwrap();
    let before = tree(&w.root);
    let devs = [
        package(&w.repo, &vol.target, VIRTIO_BLK, 0, true),
        Device::in_box(&pci(NVME, 2)).unwrap(),
    ];
    let plan = inject::inject(
        &vol,
        &devs,
        &Options {
            dry_run: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!plan.is_empty() && plan.registry.len() > 10 && plan.files.len() >= 4);
    assert_eq!(tree(&w.root), before, "every byte of the volume unchanged");
    // The plan serialises (the restore report shows it).
    let json = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
}

#[test]
fn rerunning_is_idempotent_and_rollback_restores_everything() {
    let sys = SystemHive {
        static_ip: true,
        ..Default::default()
    };
    let w = world(&sys, 17763);
    let sys0 = export(&hive_path(&w.root, HiveName::System));
    let sw0 = export(&hive_path(&w.root, HiveName::Software));
    let system32 = tree(&w.root.join("Windows/System32/drivers"));
    let vol = WindowsVolume::open(&w.root, false).unwrap();
    let devs = |repo| {
        vec![
            package(repo, &WindowsTarget::server_2019(), VIRTIO_BLK, 0, true),
            package(repo, &WindowsTarget::server_2019(), VIRTIO_NET, 1, false),
            Device::in_box(&pci(NVME, 2)).unwrap(),
        ]
    };
    let first = inject::inject(&vol, &devs(&w.repo), &Options::default()).unwrap();
    assert!(!first.is_empty());
    let after_first = tree(&w.root);
    let second = inject::inject(&vol, &devs(&w.repo), &Options::default()).unwrap();
    assert!(second.is_empty(), "second run changes nothing: {second:#?}");
    assert_eq!(tree(&w.root), after_first, "hive bytes and files unchanged");
    let record = inject::read_record(&vol).unwrap();
    assert_eq!(record.len(), 1);

    let undone = inject::rollback(&vol).unwrap();
    assert_eq!(undone, [first]);
    assert_eq!(export(&hive_path(&w.root, HiveName::System)), sys0);
    assert_eq!(export(&hive_path(&w.root, HiveName::Software)), sw0);
    assert_eq!(tree(&w.root.join("Windows/System32/drivers")), system32);
    assert!(!w.root.join("Windows/bmr-drivers/firstboot.cmd").exists());
    assert!(w
        .root
        .join("Windows/bmr-drivers/record.rolled-back.json")
        .is_file());
}

#[test]
fn a_replaced_driver_is_kept_and_restored() {
    let w = world(&SystemHive::default(), 17763);
    let old = w.root.join("Windows/System32/drivers/VIOSTOR.SYS");
    std::fs::write(&old, b"MZ old viostor").unwrap();
    let vol = WindowsVolume::open(&w.root, false).unwrap();
    let dev = package(&w.repo, &vol.target, VIRTIO_BLK, 0, true);
    let plan = inject::inject(&vol, &[dev], &Options::default()).unwrap();
    let f = plan
        .files
        .iter()
        .find(|f| f.path.ends_with("VIOSTOR.SYS"))
        .expect("the existing file of another case is the one replaced");
    let kept = f.original.clone().unwrap();
    assert_eq!(
        std::fs::read(w.root.join(&kept)).unwrap(),
        b"MZ old viostor"
    );
    assert_eq!(std::fs::read(&old).unwrap(), b"MZ viostor.sys for 2k19");
    inject::rollback(&vol).unwrap();
    assert_eq!(std::fs::read(&old).unwrap(), b"MZ old viostor");
}

#[test]
fn missing_select_or_control_set_is_a_clear_error() {
    let w = world(
        &SystemHive {
            current: None,
            ..Default::default()
        },
        17763,
    );
    let e = format!("{:#}", WindowsVolume::open(&w.root, false).unwrap_err());
    assert!(e.contains("no Select key"), "{e}");
    let w = world(
        &SystemHive {
            current: Some(3),
            ..Default::default()
        },
        17763,
    );
    let e = format!("{:#}", WindowsVolume::open(&w.root, false).unwrap_err());
    assert!(
        e.contains("Select\\Current is 3") && e.contains("ControlSet003"),
        "{e}"
    );
    // An in-box driver this Windows lacks.
    let w = world(
        &SystemHive {
            driver_database: false,
            ..Default::default()
        },
        7601,
    );
    let vol = WindowsVolume::open(&w.root, false).unwrap();
    let e = inject::plan(
        &vol,
        &[Device::in_box(&pci(NVME, 2)).unwrap()],
        &Options::default(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("no in-box stornvme"), "{e:#}");
}

#[test]
fn dirty_hives_are_refused_unless_forced() {
    let w = world(&SystemHive::default(), 17763);
    let config = w.root.join("Windows/System32/config");
    let system = config.join("SYSTEM");
    let clean = std::fs::read(&system).unwrap();
    // Primary and secondary sequence numbers differ.
    let mut dirty = clean.clone();
    let seq = u32::from_le_bytes(dirty[4..8].try_into().unwrap());
    dirty[4..8].copy_from_slice(&(seq + 1).to_le_bytes());
    let c = checksum(&dirty);
    dirty[0x1FC..0x200].copy_from_slice(&c.to_le_bytes());
    std::fs::write(&system, &dirty).unwrap();
    let e = format!("{:#}", WindowsVolume::open(&w.root, false).unwrap_err());
    assert!(
        e.contains("Windows/System32/config/SYSTEM") && e.contains("not closed cleanly"),
        "{e}"
    );
    assert!(
        e.contains("--force") && e.contains("shut it down cleanly"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
    let forced = WindowsVolume::open(&w.root, true).unwrap();
    assert_eq!(forced.forced.len(), 1);
    std::fs::write(&system, &clean).unwrap();

    // A transaction log newer than the hive; an older or zeroed one is fine.
    let seq = u32::from_le_bytes(clean[8..12].try_into().unwrap());
    let log = |s: u32| {
        let mut l = clean[..512].to_vec();
        l[4..8].copy_from_slice(&s.to_le_bytes());
        l[8..12].copy_from_slice(&s.to_le_bytes());
        l.extend(vec![0u8; 4096]);
        l
    };
    std::fs::write(config.join("SOFTWARE.LOG2"), log(0)).unwrap();
    std::fs::write(config.join("SOFTWARE.LOG1"), vec![0u8; 8192]).unwrap();
    std::fs::write(config.join("system.log1"), log(seq)).unwrap();
    WindowsVolume::open(&w.root, false).unwrap();
    std::fs::write(config.join("system.log1"), log(seq + 5)).unwrap();
    let e = format!("{:#}", WindowsVolume::open(&w.root, false).unwrap_err());
    assert!(
        e.contains("SYSTEM.LOG1") && e.contains("newer than the hive"),
        "{e}"
    );
    assert!(WindowsVolume::open(&w.root, true).is_ok());
}

#[test]
fn hibernated_volume_is_refused_unless_forced() {
    let w = world(&SystemHive::default(), 17763);
    let h = w.root.join("HiberFil.sys");
    std::fs::write(&h, vec![0u8; 4096]).unwrap();
    WindowsVolume::open(&w.root, false).unwrap();
    for sig in [&b"HIBR"[..], b"hibr", b"wake", b"WAKE"] {
        let mut b = sig.to_vec();
        b.extend([0u8; 100]);
        std::fs::write(&h, b).unwrap();
        let e = format!("{:#}", WindowsVolume::open(&w.root, false).unwrap_err());
        assert!(e.contains("hiberfil.sys") && e.contains("--force"), "{e}");
        assert!(e.contains("Fast Startup"), "{e}");
    }
    let vol = WindowsVolume::open(&w.root, true).unwrap();
    assert!(vol.forced[0].contains("hibernated"));
    let plan = inject::plan(
        &vol,
        &[Device::in_box(&pci(NVME, 2)).unwrap()],
        &Options::default(),
    )
    .unwrap();
    assert!(plan.notes[0].starts_with("forced: hiberfil.sys"));
}

#[test]
fn hives_are_found_case_insensitively() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    make_hive(
        &root.join("WINDOWS/system32/CONFIG/system"),
        SYS,
        &SystemHive::default().reg(),
    );
    make_hive(
        &root.join("WINDOWS/system32/CONFIG/Software"),
        SW,
        &software_reg(17763),
    );
    let vol = WindowsVolume::open(root, false).unwrap();
    assert!(vol.system.path.ends_with("WINDOWS/system32/CONFIG/system"));
    assert!(vol.windows.ends_with("WINDOWS"));
    assert_eq!(vol.target.build, 17763);
    let e = format!(
        "{:#}",
        WindowsVolume::open(&root.join("WINDOWS"), false).unwrap_err()
    );
    assert!(e.contains("no Windows folder"), "{e}");
}

/// A real NTFS volume, mounted with ntfs-3g (case-sensitive lookups), injected into, then
/// read back with ntfscat after unmounting.
#[test]
fn ntfs_volume_end_to_end() {
    for tool in ["mkntfs", "ntfs-3g", "ntfscat", "hivexregedit"] {
        require(tool);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the NTFS test needs FUSE (modprobe fuse)"
    );
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("ntfs.img");
    ntfs_windows(&img, 64 << 20, &SystemHive::default(), 17763);
    let plan = with_ntfs(&img, &t.path().join("mnt"), |mnt| {
        assert!(
            !mnt.join("windows").exists(),
            "ntfs-3g lookups are case-sensitive"
        );
        let repo = Repo::scan(&make_repo(&t.path().join("repo"))).unwrap();
        let vol = WindowsVolume::open(mnt, false).unwrap();
        let dev = package(&repo, &vol.target, VIRTIO_BLK, 0, true);
        inject::inject(&vol, &[dev], &Options::default()).unwrap()
    });
    assert_eq!(
        ntfscat(&img, "/Windows/System32/drivers/viostor.sys"),
        b"MZ viostor.sys for 2k19"
    );
    let s = ntfs_hive_export(&img, HiveName::System);
    assert_eq!(
        s.value("ControlSet001\\Services\\viostor", "Start"),
        dword(0)
    );
    for w in plan.registry.iter().filter(|w| w.hive == HiveName::System) {
        assert_eq!(
            s.value(&w.key, &w.name),
            Some(&w.data),
            "{}\\{}",
            w.key,
            w.name
        );
    }
    let record = ntfscat(&img, "/Windows/bmr-drivers/record.json");
    assert_eq!(
        serde_json::from_slice::<Vec<Plan>>(&record).unwrap(),
        [plan]
    );
}
