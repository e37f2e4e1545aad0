//! LVM2 growth end to end (issue 10, item 1): a RHEL-like disk (GPT, ESP, `/boot` XFS, a PV
//! holding VG `rhel` with `swap`, `root` XFS and `home` ext4, and free extents) made with the real
//! lvm2, mkfs.xfs and mke2fs, ingested, and restored onto a bigger disk inside a throwaway guest
//! (this host's kernel has no device-mapper): the PV grows (`pvresize`), the LV holding the most
//! data takes the new extents (`lvextend`) and its filesystem grows (`xfs_growfs`); with
//! `--grow-lv rhel/home` that LV and its ext4 (`resize2fs`) do. `vgck`, `xfs_repair -n` and
//! `e2fsck -fn` are clean, the VG and PV UUIDs are the source's, every file is identical, and
//! `restorer verify` accepts the grown disks. A `--grow-lv` naming no LV is refused before any
//! write.

mod common;

use bmr_tests::guest::Guest;
use bmr_tests::util::Cmd;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DISK: u64 = 2048 * MIB;
const BIG: u64 = 3072 * MIB;
const LVM_CONFIG: &str = "devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 } \
     activation { udev_sync = 0 udev_rules = 0 } backup { backup = 0 archive = 0 } \
     global { activation = 0 }";
const MODULES: &[&str] = &["crc32c_generic", "dm_mod", "xfs", "ext4", "loop"];

fn run(c: Cmd) -> String {
    c.timeout(Duration::from_secs(600)).ok().stdout
}

/// lvm2 on the host (no device-mapper: metadata only), seeing `dev` alone.
fn lvm(dev: &Path, args: &[&str]) -> String {
    run(Cmd::new("lvm")
        .args(args)
        .arg("--devices")
        .arg(dev)
        .args(["--config", LVM_CONFIG])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1"))
}

/// A loop device over a byte range of an image, detached on drop.
struct Range(PathBuf);

impl Range {
    fn new(img: &Path, offset: u64, size: u64) -> Range {
        let out = run(Cmd::new("losetup")
            .args(["-f", "--show", "-o", &offset.to_string()])
            .args(["--sizelimit", &size.to_string()])
            .arg(img));
        Range(PathBuf::from(out.trim()))
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

/// Pseudo-random files, `n` of `kib` KiB each, in two directories; path -> SHA-256.
fn fill(dir: &Path, seed: u64, n: usize, kib: usize) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    let mut want = BTreeMap::new();
    let mut x = seed | 1;
    for i in 0..n {
        let body: Vec<u8> = (0..kib * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let rel = if i % 3 == 0 {
            format!("sub/deeper/f{i}")
        } else {
            format!("f{i}")
        };
        std::fs::write(dir.join(&rel), &body).unwrap();
        let h = sha(&dir.join(&rel));
        want.insert(rel, h);
    }
    want
}

/// mkfs.xfs on a loop device over `range` of `img`, filled with `files(dir)` through a mount.
fn xfs(img: &Path, range: (u64, u64), label: &str, scratch: &Path, seed: u64, n: usize) -> Tree {
    let dev = Range::new(img, range.0, range.1);
    run(Cmd::new("mkfs.xfs")
        .args(["-q", "-f", "-L", label])
        .arg(&dev.0));
    let mnt = scratch.join(format!("mnt-{label}"));
    std::fs::create_dir_all(&mnt).unwrap();
    run(Cmd::new("mount").args(["-t", "xfs"]).arg(&dev.0).arg(&mnt));
    let files = fill(&mnt, seed, n, 1024);
    run(Cmd::new("umount").arg(&mnt));
    files
}

type Tree = BTreeMap<String, String>;

struct Source {
    img: PathBuf,
    boot: Tree,
    root: Tree,
    home: Tree,
    vg_uuid: String,
    pv_uuid: String,
}

const GPT: &str = "label: gpt\n\
     size=32MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
     size=300MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
     type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n";

fn build(env: &Env) -> Source {
    let img = env.file("rhel.img", DISK);
    run(Cmd::new("sfdisk").arg("-q").arg(&img).stdin(GPT));
    let parts = parts_of(&img);
    {
        let esp = Range::new(&img, parts[0].0, parts[0].1);
        run(Cmd::new("mkfs.fat").args(["-n", "ESP"]).arg(&esp.0));
    }
    let scratch = env.dir.join("scratch");
    let boot = xfs(&img, parts[1], "boot", &scratch, 11, 6);
    let pv = Range::new(&img, parts[2].0, parts[2].1);
    lvm(&pv.0, &["pvcreate", "-q", &pv.0.to_string_lossy()]);
    lvm(&pv.0, &["vgcreate", "-q", "rhel", &pv.0.to_string_lossy()]);
    for (name, size) in [("swap", "64m"), ("root", "640m"), ("home", "320m")] {
        lvm(
            &pv.0,
            &[
                "lvcreate", "-q", "-an", "-Zn", "-y", "-L", size, "-n", name, "rhel",
            ],
        );
    }
    let field = |args: &[&str]| lvm(&pv.0, args).trim().to_string();
    let pe_start: u64 = field(&[
        "pvs",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "pe_start",
    ])
    .parse()
    .unwrap();
    let es: u64 = field(&[
        "vgs",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "vg_extent_size",
        "rhel",
    ])
    .parse()
    .unwrap();
    let range = |lv: &str| {
        let r = field(&[
            "lvs",
            "--noheadings",
            "-o",
            "seg_pe_ranges",
            &format!("rhel/{lv}"),
        ]);
        let (_, pes) = r.rsplit_once(':').unwrap();
        let (a, b) = pes.split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        (parts[2].0 + pe_start + a * es, (b + 1 - a) * es)
    };
    {
        let sw = Range::new(&img, range("swap").0, range("swap").1);
        run(Cmd::new("mkswap").args(["-L", "swap"]).arg(&sw.0));
    }
    let root = xfs(&img, range("root"), "root", &scratch, 22, 24);
    let home_dir = scratch.join("home");
    let home = fill(&home_dir, 33, 5, 1024);
    {
        let h = Range::new(&img, range("home").0, range("home").1);
        run(Cmd::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "home", "-d"])
            .arg(&home_dir)
            .arg(&h.0));
    }
    let vg_uuid = field(&["vgs", "--noheadings", "-o", "vg_uuid", "rhel"]);
    let pv_uuid = field(&["pvs", "--noheadings", "-o", "pv_uuid"]);
    Source {
        img,
        boot,
        root,
        home,
        vg_uuid,
        pv_uuid,
    }
}

/// File-level restore from the LVs (issue 10 item 5): `appliance files export --lv` of the ext4
/// in rhel/home and the XFS in rhel/root, read through the LVs' segments, unpack to the same
/// files; a missing LV is refused, naming those there are.
fn files_from_lvs(env: &Env, src: &Source) {
    for (lv, tree) in [("rhel/home", &src.home), ("rhel/root", &src.root)] {
        let tarball = env.dir.join(format!("{}.tar", lv.replace('/', "-")));
        appliance()
            .args(["files", "export", "--store"])
            .arg(&env.store)
            .args(["--host", "rhel1", "--lv", lv, "/", "-o"])
            .arg(&tarball)
            .ok();
        let out = env.dir.join(format!("{}-files", lv.replace('/', "-")));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        run(Cmd::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&out));
        for (rel, want) in tree {
            assert_eq!(&sha(&out.join(rel)), want, "{lv}: {rel}");
        }
    }
    let bad = appliance()
        .args(["files", "ls", "--store"])
        .arg(&env.store)
        .args(["--host", "rhel1", "--lv", "rhel/tmp", "/"])
        .run();
    assert!(
        !bad.success() && bad.stderr.contains("LVs: rhel/swap, rhel/root, rhel/home"),
        "{}",
        bad.describe()
    );
}

/// (offset, size) in bytes of each partition of `img`.
fn parts_of(img: &Path) -> Vec<(u64, u64)> {
    let j: serde_json::Value =
        serde_json::from_str(&run(Cmd::new("sfdisk").arg("-J").arg(img))).unwrap();
    j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
            )
        })
        .collect()
}

/// The guest's checks of a restored disk on `dev`, printed as `KEY=value` lines and file lists.
fn checks(dev: &str, tag: &str) -> String {
    format!(
        r#"
L() {{ c=$1; shift; lvm $c --devices {dev}3 --config 'devices {{ use_devicesfile = 0 obtain_device_list_from_udev = 0 }} activation {{ udev_sync = 0 udev_rules = 0 }} backup {{ backup = 0 archive = 0 }}' "$@"; }}
L vgck rhel
L vgs --noheadings -o vg_uuid,vg_free --units b --nosuffix rhel | sed 's/^ */{tag}-VG=/'
L pvs --noheadings -o pv_uuid,pv_size --units b --nosuffix | sed 's/^ */{tag}-PV=/'
L lvs --noheadings -o lv_name,lv_size --units b --nosuffix rhel | sed 's/^ */{tag}-LV=/'
L vgchange -ay rhel
xfs_repair -n /dev/mapper/rhel-root
e2fsck -fn /dev/mapper/rhel-home
xfs_repair -n {dev}2
for fs in root:/dev/mapper/rhel-root boot:{dev}2; do
  n=${{fs%%:*}}; d=${{fs#*:}}
  echo "{tag}-XFS-$n=$(xfs_db -r -c 'sb 0' -c 'print dblocks' -c 'print blocksize' $d | tr '\n' ' ')"
  mkdir -p /mnt/$n; mount -t xfs -o ro,norecovery,nouuid $d /mnt/$n
  (cd /mnt/$n && find . -type f | sort | while read f; do echo "{tag}-FILE-$n=$f $(sha256sum "$f" | cut -d' ' -f1)"; done)
  umount /mnt/$n
done
echo "{tag}-HOME=$(dumpe2fs -h /dev/mapper/rhel-home 2>/dev/null | sed -n 's/^Block \(count\|size\): *//p' | tr '\n' ' ')"
mkdir -p /mnt/home; mount -t ext4 -o ro,noload /dev/mapper/rhel-home /mnt/home
(cd /mnt/home && find . -type f ! -path './lost+found/*' | sort | while read f; do echo "{tag}-FILE-home=$f $(sha256sum "$f" | cut -d' ' -f1)"; done)
umount /mnt/home
L vgchange -an rhel
"#
    )
}

/// Lines `TAG-KEY=value` of the guest's log.
fn values(log: &str, key: &str) -> Vec<String> {
    let k = format!("{key}=");
    log.lines()
        .filter_map(|l| l.find(&k).map(|i| l[i + k.len()..].trim().to_string()))
        .collect()
}

fn files(log: &str, key: &str) -> Tree {
    values(log, key)
        .iter()
        .filter_map(|l| {
            let (p, h) = l.rsplit_once(' ')?;
            Some((p.trim_start_matches("./").to_string(), h.to_string()))
        })
        .collect()
}

/// The `n`th whitespace-separated number of the first `key` line.
fn num(log: &str, key: &str, n: usize) -> u64 {
    let v = values(log, key);
    let line = v.first().unwrap_or_else(|| panic!("no {key} in the log"));
    line.split_whitespace()
        .filter_map(|w| {
            w.trim_start_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .nth(n)
        .unwrap_or_else(|| panic!("{key}: {line}"))
}

fn lv_size(log: &str, tag: &str, lv: &str) -> u64 {
    values(log, &format!("{tag}-LV"))
        .iter()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(lv)).then(|| w.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no LV {lv} for {tag}"))
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn rhel_like_pv_grows_and_the_named_lv_with_its_filesystem() {
    let env = Env::new("lvm");
    let src = build(&env);
    let id = env.ingest("rhel1", &[&src.img]);
    let manifest = std::fs::read_to_string(
        env.store
            .join("hosts/rhel1/snapshots")
            .join(&id)
            .join("manifest.json"),
    )
    .unwrap();
    assert!(manifest.contains("\"kind\": \"xfs\""), "{manifest}");
    // 35 MiB of incompressible files (6 in /boot, 24 in root, 5 in home): stored with the
    // filesystems' and the PV's metadata, not the free space of the LVs or the free extents.
    let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let stored = m["disks"][0]["totals"]["stored_bytes"].as_u64().unwrap();
    assert!(
        (35 * MIB..40 * MIB).contains(&stored),
        "stored {stored} bytes"
    );
    eprintln!("lvm: stored {stored} bytes for 35 MiB of files on a 2 GiB disk");
    files_from_lvs(&env, &src);

    // On the host: the plan names the LV, and a --grow-lv naming no LV is refused, nothing written.
    let big = env.file("big.img", BIG);
    let store = env.store.to_string_lossy().into_owned();
    let (out, _) = restore(&store, "rhel1", &[&big], &["--dry-run"]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.contains(
            "grow the PV to 2.7 GiB (pvresize) and LV rhel/root by 1.7 GiB (lvextend, xfs_growfs)"
        ),
        "{}",
        out.stdout
    );
    for (bad, says) in [
        (
            "rhel/tmp",
            "VG rhel has no LV \"tmp\" (its LVs: swap, root, home)",
        ),
        (
            "vg0/root",
            "the snapshot has no VG \"vg0\" on the disks restored (VGs: rhel)",
        ),
    ] {
        let (out, _) = restore(&store, "rhel1", &[&big], &["--grow-lv", bad]);
        assert!(
            !out.success() && out.stderr.contains(says),
            "{}",
            out.describe()
        );
    }
    assert!(!has_table(&big), "a refused restore wrote the target");

    // Here, without device-mapper (this host has none): the PV and LV grow, their metadata being
    // all that changes, and the summary says the filesystem was left for the restored system.
    let here = env.file("here.img", BIG);
    let (out, v) = restore(&store, "rhel1", &[&here], &["--no-adapt"]);
    assert!(out.success(), "{}", out.describe());
    if !Path::new("/dev/mapper/control").exists() {
        let warnings = v["summary"][0]["warnings"].to_string();
        assert!(
            warnings.contains(
                "LV rhel/root: its filesystem is not grown: this kernel has no device-mapper"
            ),
            "{}",
            out.stdout
        );
        let p3 = parts_of(&here)[2];
        let pv = Range::new(&here, p3.0, p3.1);
        let root: u64 = lvm(
            &pv.0,
            &[
                "lvs",
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_size",
                "rhel/root",
            ],
        )
        .trim()
        .parse()
        .unwrap();
        assert!(root > 640 * MIB + (BIG - DISK), "root: {root}");
        lvm(&pv.0, &["vgck", "rhel"]);
    }
    std::fs::remove_file(&here).unwrap();

    // In a guest with device-mapper: the default (root, XFS) onto vda, rhel/home (ext4) onto vdb.
    let guest_bin = env.dir.join("restorer");
    run(Cmd::new("objcopy")
        .arg("--strip-debug")
        .arg(env!("CARGO_BIN_EXE_restorer"))
        .arg(&guest_bin));
    let tree = env.dir.join("guest-tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).unwrap();
    run(Cmd::new("cp")
        .arg("-a")
        .arg(&env.store)
        .arg(tree.join("store")));
    let other = env.file("other.img", BIG);
    let script = format!(
        "export PATH=/usr/bin:/usr/sbin:/bin:/sbin\n\
         R='restorer restore --no-adapt --from /data/store --host rhel1'\n\
         V='restorer verify --from /data/store --host rhel1'\n\
         $R --target /dev/vda\n\
         $V --target /dev/vda\n\
         $R --target /dev/vdb --grow-lv rhel/home\n\
         $V --target /dev/vdb --grow-lv rhel/home\n\
         {}{}",
        checks("/dev/vda", "A"),
        checks("/dev/vdb", "B")
    );
    let g = Guest {
        tools: &[
            guest_bin.to_str().unwrap(),
            "lvm",
            "losetup",
            "mount",
            "umount",
            "xfs_growfs",
            "xfs_repair",
            "xfs_db",
            "e2fsck",
            "resize2fs",
            "dumpe2fs",
            "sha256sum",
        ],
        modules: MODULES,
        tree: Some(&tree),
    };
    let log = g
        .run("lvm-grow", &script, &[&big, &other], &env.dir.join("guest"))
        .unwrap();
    assert!(
        log.contains(
            "LV rhel/root takes its new extents (lvextend), its filesystem grown (xfs_growfs)"
        ),
        "{log}"
    );
    assert!(
        log.contains(
            "LV rhel/home takes its new extents (lvextend), its filesystem grown (resize2fs)"
        ),
        "{log}"
    );

    let grown = BIG - DISK;
    for tag in ["A", "B"] {
        assert_eq!(
            values(&log, &format!("{tag}-VG"))[0]
                .split_whitespace()
                .next(),
            Some(src.vg_uuid.as_str())
        );
        assert_eq!(
            values(&log, &format!("{tag}-PV"))[0]
                .split_whitespace()
                .next(),
            Some(src.pv_uuid.as_str())
        );
        assert_eq!(
            num(&log, &format!("{tag}-VG"), 0),
            0,
            "no extent left free: {log}"
        );
        assert_eq!(lv_size(&log, tag, "swap"), 64 * MIB);
        assert_eq!(
            files(&log, &format!("{tag}-FILE-boot")),
            src.boot,
            "{tag}: /boot"
        );
        assert_eq!(
            files(&log, &format!("{tag}-FILE-root")),
            src.root,
            "{tag}: root"
        );
        assert_eq!(
            files(&log, &format!("{tag}-FILE-home")),
            src.home,
            "{tag}: home"
        );
    }
    // The PV's free extents before: 2048 - 1 - 32 - 300 MiB of partitions, less 1 MiB of PV
    // header, less the 1024 MiB of LVs; the grown LV takes them and the disk's extra GiB.
    let free_before = parts_of(&src.img)[2].1 - MIB - 1024 * MIB;
    let extra = |lv: u64, base: u64| lv - base;
    let root_a = lv_size(&log, "A", "root");
    assert!(
        extra(root_a, 640 * MIB) + 4 * MIB >= free_before + grown - 4 * MIB,
        "root: {root_a}"
    );
    assert_eq!(lv_size(&log, "A", "home"), 320 * MIB);
    assert_eq!(lv_size(&log, "B", "root"), 640 * MIB);
    let home_b = lv_size(&log, "B", "home");
    assert!(home_b > 320 * MIB + grown, "home: {home_b}");
    // The filesystems fill their LVs: XFS dblocks x blocksize, ext4 block count x block size.
    let xfs_a = num(&log, "A-XFS-root", 0) * num(&log, "A-XFS-root", 1);
    assert_eq!(xfs_a, root_a, "root XFS fills its LV");
    let xfs_b = num(&log, "B-XFS-root", 0) * num(&log, "B-XFS-root", 1);
    assert_eq!(xfs_b, 640 * MIB, "root XFS keeps its size on B");
    assert_eq!(
        num(&log, "B-HOME", 0) * num(&log, "B-HOME", 1),
        home_b,
        "home ext4 fills its LV"
    );
    // verify, run right after each restore, accepts the grown disk: what differs lies in the
    // grown PV.
    assert_eq!(
        log.matches("more in grown filesystems, as expected)")
            .count(),
        2,
        "{log}"
    );
}
