//! LVM2 physical volumes at ingest/capture: the PV label, metadata area and VG metadata are read,
//! each linear LV's filesystem is mapped through its segments, and only the used blocks (plus
//! the PV's label and metadata area) are kept. Fixtures are made with the real lvm2 tools on a
//! loop device over the PV partition; this kernel has no device-mapper, so LVs are created
//! inactive (`-an -Zn`) and their filesystems written through a loop device over their extents.
//! The kept bytes alone are then checked with `vgck`, `lvs`, `e2fsck -fn` and a tree compare.

mod common;

use common::*;
use snapshot::layout::{analyze, DiskLayout};
use snapshot::manifest::LvmPv;
use snapshot::DiskSource;
use std::path::{Path, PathBuf};

const GIB: u64 = 1 << 30;

/// lvm2 restricted to one loop device: no host PV or VG (a host VG may share the name) is seen.
struct Lvm {
    dev: String,
}

impl Lvm {
    fn config(&self) -> String {
        format!(
            "devices {{ filter = [ \"a|^{}$|\", \"r|.*|\" ] use_devicesfile = 0 \
             obtain_device_list_from_udev = 0 }} activation {{ udev_sync = 0 udev_rules = 0 }} \
             backup {{ backup = 0 archive = 0 }}",
            self.dev
        )
    }
    fn run(&self, args: &[&str]) -> String {
        let mut c = cmd("lvm");
        // No device-mapper in this kernel: lvm2 changes metadata only, never activates.
        c.args(args)
            .arg("--driverloaded")
            .arg("n")
            .arg("--config")
            .arg(self.config())
            .env("LVM_SUPPRESS_FD_WARNINGS", "1");
        run(&mut c)
    }
    /// (first byte from the PV start, bytes) of a linear LV.
    fn lv_range(&self, vg: &str, lv: &str) -> (u64, u64) {
        let pe_start: u64 = self
            .run(&[
                "pvs",
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "pe_start",
                &self.dev,
            ])
            .trim()
            .parse()
            .unwrap();
        let es: u64 = self
            .run(&[
                "vgs",
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "vg_extent_size",
                vg,
            ])
            .trim()
            .parse()
            .unwrap();
        let ranges = self.run(&[
            "lvs",
            "--noheadings",
            "-o",
            "seg_pe_ranges",
            &format!("{vg}/{lv}"),
        ]);
        let r = ranges.trim();
        assert_eq!(r.lines().count(), 1, "{lv} is not one segment: {r}");
        let (_, pes) = r.rsplit_once(':').unwrap();
        let (a, b) = pes.split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        (pe_start + a * es, (b + 1 - a) * es)
    }
}

/// A loop device over a byte range of an image, detached on drop.
struct RangeLoop(String);

impl RangeLoop {
    fn new(img: &Path, offset: u64, size: u64) -> RangeLoop {
        let out = run(cmd("losetup")
            .args([
                "-f",
                "--show",
                "-o",
                &offset.to_string(),
                "--sizelimit",
                &size.to_string(),
            ])
            .arg(img));
        RangeLoop(out.trim().to_string())
    }
}

impl Drop for RangeLoop {
    fn drop(&mut self) {
        let _ = std::process::Command::new(tool("losetup"))
            .args(["-d", &self.0])
            .status();
    }
}

/// Files of pseudo-random (incompressible) contents, `mib` MiB in all, in a few directories.
fn files(dir: &Path, mib: usize) {
    make_tree(dir, 1);
    std::fs::create_dir_all(dir.join("data/a/b")).unwrap();
    for i in 0..mib / 4 {
        let sub = if i % 2 == 0 { "data" } else { "data/a/b" };
        std::fs::write(
            dir.join(format!("{sub}/f{i:03}.bin")),
            pseudo_random(1000 + i as u64, 4 << 20),
        )
        .unwrap();
    }
}

struct Disk {
    img: PathBuf,
    /// (offset, size) of the PV partition.
    pv: (u64, u64),
    /// (offset from the PV start, size) of LV root.
    root: (u64, u64),
    tree: PathBuf,
}

/// `sfdisk` script for the table; the PV partition is the last one and fills the disk.
fn build(work: &Path, size: u64, table: &str, mib: usize, mdas: u32) -> Disk {
    let img = work.join("disk.img");
    sparse(&img, size);
    run_input(cmd("sfdisk").arg("-q").arg(&img), Some(table.as_bytes()));
    let parts = run(cmd("sfdisk").args(["-J"]).arg(&img));
    let j: serde_json::Value = serde_json::from_str(&parts).unwrap();
    let ps = j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .clone();
    let range = |i: usize| {
        (
            ps[i]["start"].as_u64().unwrap() * 512,
            ps[i]["size"].as_u64().unwrap() * 512,
        )
    };
    let tree = work.join("tree");
    files(&tree, mib);
    // Every partition but the last holds a small ext4 (the /boot of a RHEL-like layout).
    for i in 0..ps.len() - 1 {
        let (o, s) = range(i);
        let lo = RangeLoop::new(&img, o, s);
        run(cmd("mkfs.ext4").args(["-q", "-F", "-L", "boot"]).arg(&lo.0));
    }
    let pv = range(ps.len() - 1);
    let lo = RangeLoop::new(&img, pv.0, pv.1);
    let lvm = Lvm { dev: lo.0.clone() };
    lvm.run(&[
        "pvcreate",
        "-q",
        "--pvmetadatacopies",
        &mdas.to_string(),
        &lo.0,
    ]);
    lvm.run(&["vgcreate", "-q", "rhel", &lo.0]);
    lvm.run(&[
        "lvcreate", "-q", "-an", "-Zn", "-y", "-L", "512m", "-n", "swap", "rhel",
    ]);
    lvm.run(&[
        "lvcreate", "-q", "-an", "-Zn", "-y", "-L", "4g", "-n", "root", "rhel",
    ]);
    let sw = lvm.lv_range("rhel", "swap");
    let root = lvm.lv_range("rhel", "root");
    {
        let s = RangeLoop::new(&img, pv.0 + sw.0, sw.1);
        run(cmd("mkswap").arg(&s.0));
        let r = RangeLoop::new(&img, pv.0 + root.0, root.1);
        run(cmd("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&tree)
            .arg(&r.0));
    }
    drop(lo);
    Disk {
        img,
        pv,
        root,
        tree,
    }
}

fn layout(img: &Path) -> DiskLayout {
    analyze(&DiskSource::open(img).unwrap(), None, false).unwrap()
}

fn pv_of(l: &DiskLayout) -> &LvmPv {
    l.partitions
        .last()
        .and_then(|p| p.lvm.as_deref())
        .unwrap_or_else(|| panic!("no PV recorded: {:?} {:?}", l.partitions, l.notes))
}

/// Bytes of `[a, b)` that `l` keeps.
fn kept(l: &DiskLayout, a: u64, b: u64) -> u64 {
    l.used.within(a, b).map(|(s, e)| e - s).sum()
}

/// The kept bytes alone hold a sound PV, VG and root filesystem with every file identical.
fn check_kept(d: &Disk, l: &DiskLayout, work: &Path) {
    let copy = work.join("kept.img");
    copy_used(&d.img, &copy, &l.used, 0);
    let lo = RangeLoop::new(&copy, d.pv.0, d.pv.1);
    let lvm = Lvm { dev: lo.0.clone() };
    lvm.run(&["vgck", "rhel"]);
    let lvs = lvm.run(&["lvs", "--noheadings", "-o", "lv_name", "rhel"]);
    // lvm2 also prints warnings there ("Retrying metadata scan.") when one copy is damaged.
    let mut names: Vec<&str> = lvs
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(' '))
        .collect();
    names.sort();
    assert_eq!(names, ["root", "swap"]);
    let r = RangeLoop::new(&copy, d.pv.0 + d.root.0, d.root.1);
    run(cmd("e2fsck").args(["-fn"]).arg(&r.0));
    let out = work.join("out");
    fresh_dir(&out);
    run(cmd("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", out.display()))
        .arg(&r.0));
    let got = out.join("");
    let want = list_files(&d.tree);
    let mut have = list_files(&got);
    have.retain(|p| !p.starts_with("lost+found"));
    assert_eq!(have, want, "file lists differ");
    for f in &want {
        assert!(
            std::fs::read(got.join(f)).unwrap() == std::fs::read(d.tree.join(f)).unwrap(),
            "{} differs",
            f.display()
        );
    }
}

/// GPT: ESP-sized first partition, /boot ext4, then a PV with VG `rhel` (`swap`, `root` ext4
/// of 4 GiB holding about 200 MiB of files) and 1 GiB of unallocated extents.
#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn rhel_like_gpt_keeps_only_used_blocks_of_the_lvs() {
    let t = tmp();
    let table = "label: gpt\n\
                 size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
                 size=256MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
                 type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n";
    let d = build(t.path(), 6 * GIB, table, 200, 1);
    let l = layout(&d.img);
    let pv = pv_of(&l);
    assert_eq!(pv.vg.name, "rhel");
    assert_eq!(pv.vg.pv_count, 1);
    let root = pv.vg.lvs.iter().find(|v| v.name == "root").unwrap();
    let swap = pv.vg.lvs.iter().find(|v| v.name == "swap").unwrap();
    assert_eq!(root.size, 4 * GIB);
    assert_eq!(
        root.fs.as_ref().map(|f| f.kind),
        Some(snapshot::fs::FsKind::Ext4),
        "{:?}",
        l.notes
    );
    assert_eq!(
        swap.fs.as_ref().map(|f| f.kind),
        Some(snapshot::fs::FsKind::Swap)
    );
    assert!(root.whole.is_none() && swap.whole.is_none());
    let root_used = root.fs.as_ref().unwrap().used;
    let swap_used = swap.fs.as_ref().unwrap().used;
    let pv_kept = kept(&l, d.pv.0, d.pv.0 + d.pv.1);
    // Exactly: the label and metadata area before the first extent, the root filesystem's used
    // blocks, swap's header page, and the slack past the last extent. Not the LV's free space,
    // nor the 1 GiB of unallocated extents.
    let tail = d.pv.1 - pv.pe_start - pv.pe_count * pv.extent_size;
    assert_eq!(
        pv_kept,
        pv.pe_start + root_used + swap_used + tail,
        "PV partition keeps {pv_kept} bytes; root uses {root_used}"
    );
    assert!(pv_kept >= 200 << 20, "{pv_kept}");
    assert!(
        pv_kept < 600 << 20,
        "PV partition keeps {pv_kept} bytes of {}",
        d.pv.1
    );
    check_kept(&d, &l, t.path());
}

/// The PV in an MBR partition (type 0x8e) after a /boot partition.
#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn lvm_on_mbr() {
    let t = tmp();
    let table = "label: dos\nsize=128MiB, type=83\ntype=8e\n";
    let d = build(t.path(), 5 * GIB, table, 40, 1);
    let l = layout(&d.img);
    let pv = pv_of(&l);
    assert_eq!(l.partitions.last().unwrap().number, 2);
    let root = pv.vg.lvs.iter().find(|v| v.name == "root").unwrap();
    assert!(root.fs.is_some(), "{:?}", l.notes);
    let pv_kept = kept(&l, d.pv.0, d.pv.0 + d.pv.1);
    assert!(pv_kept < 300 << 20, "{pv_kept}");
    check_kept(&d, &l, t.path());
}

/// Offset and length of the current metadata text of the metadata area at PV byte `mda`.
fn current_text(img: &Path, pv: u64, mda: u64) -> (u64, u64) {
    let h = read_range(img, pv + mda, 512);
    let off = u64::from_le_bytes(h[40..48].try_into().unwrap());
    let len = u64::from_le_bytes(h[48..56].try_into().unwrap());
    (pv + mda + off, len)
}

/// A bad checksum on one metadata copy: the other copy is used (and said so); on every copy:
/// the PV partition is copied whole with the reason.
#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn damaged_metadata_uses_the_other_copy_or_keeps_the_pv_whole() {
    let t = tmp();
    let table = "label: gpt\nsize=64MiB\ntype=E6D6D379-F507-44C2-A23C-238F2A3DF928\n";
    let d = build(t.path(), 5 * GIB, table, 20, 2);
    let good = layout(&d.img);
    let seqno = pv_of(&good).vg.seqno;
    // First metadata area at PV byte 4096; the second one at the end of the PV.
    let (text, len) = current_text(&d.img, d.pv.0, 4096);
    let mut b = read_range(&d.img, text, len as usize);
    let at = b.iter().position(|&c| c == b'{').unwrap();
    b[at] = b'(';
    apply(&d.img, &[(text, b.clone())]);
    let l = layout(&d.img);
    let pv = pv_of(&l);
    assert_eq!(pv.vg.seqno, seqno);
    assert!(
        l.notes
            .iter()
            .any(|n| n.contains("checksum") && n.contains("metadata area 1")),
        "{:?}",
        l.notes
    );
    assert_eq!(l.used, good.used);
    check_kept(&d, &l, t.path());
    // Now the second copy too.
    let tail = d.pv.1 - (1 << 20);
    let mda2 = (0..d.pv.1 / 512)
        .rev()
        .map(|s| s * 512)
        .take(4096)
        .find(|&o| o >= tail && read_range(&d.img, d.pv.0 + o + 4, 16) == b" LVM2 x[5A%r0N*>")
        .expect("second metadata area");
    let (text2, len2) = current_text(&d.img, d.pv.0, mda2);
    let mut b2 = read_range(&d.img, text2, len2 as usize);
    b2[0] ^= 0x20;
    apply(&d.img, &[(text2, b2)]);
    let l = layout(&d.img);
    let p = l.partitions.last().unwrap();
    let why = p
        .whole
        .as_deref()
        .unwrap_or_else(|| panic!("{:?}", l.partitions));
    assert!(
        why.contains("no valid VG metadata") && why.contains("checksum"),
        "{why}"
    );
    assert_eq!(kept(&l, d.pv.0, d.pv.0 + d.pv.1), d.pv.1);
    assert!(
        l.notes.iter().any(|n| n.contains("copied whole")),
        "{:?}",
        l.notes
    );
}
