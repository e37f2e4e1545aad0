//! FAT12/16/32 used-block maps against dosfstools and mtools: fsck.fat's used-cluster count equals
//! ours, and an image holding only the used ranges passes fsck.fat and has the same files.

mod common;

use common::*;
use snapshot::fs::{Found, FsKind, Probe};
use std::path::Path;

struct FsckInfo {
    used: u64,
    total: u64,
    data_start: u64,
    cluster: u64,
}

/// fsck.fat -nv: data area start, cluster size, "N files, USED/TOTAL clusters".
fn fsck_info(img: &Path) -> FsckInfo {
    let out = run(cmd("fsck.fat").arg("-nv").arg(img));
    let num = |prefix: &str, suffix: &str| -> u64 {
        out.lines()
            .find_map(|l| {
                let l = l.trim();
                let rest = l.strip_prefix(prefix)?;
                let v = rest.split(suffix).next()?.trim();
                v.parse().ok()
            })
            .unwrap_or_else(|| panic!("no {prefix:?}..{suffix:?} in fsck.fat output:\n{out}"))
    };
    let line = out
        .lines()
        .find(|l| l.ends_with(" clusters") && l.contains('/'))
        .unwrap_or_else(|| panic!("fsck.fat output:\n{out}"));
    let frac = line
        .rsplit(", ")
        .next()
        .unwrap()
        .trim_end_matches(" clusters");
    let (u, t) = frac.split_once('/').unwrap();
    FsckInfo {
        used: u.parse().unwrap(),
        total: t.parse().unwrap(),
        data_start: num("Data area starts at byte ", " "),
        cluster: out
            .lines()
            .find_map(|l| l.trim().strip_suffix(" bytes per cluster"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap(),
    }
}

fn fill(img: &Path, tree: &Path) {
    run(cmd("mcopy").args(["-s", "-i"]).arg(img).arg(tree).arg("::"));
}

fn check(img: &Path, tree: &Path, kind: FsKind, label: Option<&str>, work: &Path) -> Probe {
    let len = std::fs::metadata(img).unwrap().len();
    let p = known(img);
    assert_eq!(p.fs.kind, kind);
    let id = blkid(img);
    assert_eq!(
        id.get("VERSION").map(String::as_str),
        Some(format!("{kind:?}").to_uppercase().as_str())
    );
    assert_eq!(p.fs.uuid.as_deref(), id.get("UUID").map(String::as_str));
    assert_eq!(p.fs.label.as_deref(), id.get("LABEL").map(String::as_str));
    assert_eq!(p.fs.label.as_deref(), label);

    // Used data clusters: ours vs fsck.fat's count; everything before the data area is used.
    let f = fsck_info(img);
    assert_eq!(u64::from(p.fs.block_size), f.cluster);
    let data_end = f.data_start + f.total * f.cluster;
    let r = p.used.ranges();
    assert_eq!(r[0].0, 0);
    assert!(r[0].1 >= f.data_start);
    let mut clusters_used = 0;
    for &(a, b) in r {
        let (a, b) = (a.max(f.data_start), b.min(data_end));
        if a < b {
            assert_eq!(
                (a - f.data_start) % f.cluster,
                0,
                "range start not on a cluster"
            );
            assert_eq!(
                (b - f.data_start) % f.cluster,
                0,
                "range end not on a cluster"
            );
            clusters_used += (b - a) / f.cluster;
        }
    }
    assert_eq!(clusters_used, f.used, "used clusters vs fsck.fat");
    if data_end < len {
        let tail: Vec<_> = p.used.within(data_end, len).collect();
        assert_eq!(
            tail,
            vec![(data_end, len)],
            "the tail past the clusters is used"
        );
    }
    assert_eq!(p.fs.used, p.used.len());

    let copy = used_copy(img, &p, work);
    run(cmd("fsck.fat").arg("-n").arg(&copy));
    let fc = fsck_info(&copy);
    assert_eq!((fc.used, fc.total), (f.used, f.total));
    let outdir = work.join("out");
    fresh_dir(&outdir);
    let name = tree.file_name().unwrap().to_str().unwrap();
    run(cmd("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(&copy)
        .arg(format!("::/{name}"))
        .arg(&outdir));
    assert_same_files(tree, &outdir.join(name), img.display());
    let typed = run(cmd("mtype")
        .arg("-i")
        .arg(&copy)
        .arg(format!("::/{name}/sub/deeper/deepest/hello.txt")));
    assert_eq!(typed, "hello, world\n");
    p
}

#[test]
fn fat_variants_match_fsck_and_copy_cleanly() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("fat.img");
    let cases: &[(u64, &[&str], FsKind, Option<&str>)] = &[
        (
            12 * MIB,
            &["-F", "12", "-n", "SMALL"],
            FsKind::Fat12,
            Some("SMALL"),
        ),
        (
            64 * MIB,
            &["-F", "16", "-n", "MY LABEL"],
            FsKind::Fat16,
            Some("MY LABEL"),
        ),
        (
            64 * MIB,
            &["-F", "16", "-s", "8", "-f", "1"],
            FsKind::Fat16,
            None,
        ),
        (
            64 * MIB,
            &["-F", "32", "-n", "ESP"],
            FsKind::Fat32,
            Some("ESP"),
        ),
        (300 * MIB, &["-F", "32", "-s", "8"], FsKind::Fat32, None),
        (
            300 * MIB,
            &["-F", "32", "-S", "4096", "-s", "1"],
            FsKind::Fat32,
            None,
        ),
        (
            40 * MIB + 7 * 512,
            &["-F", "32", "-s", "1", "-i", "1234ABCD"],
            FsKind::Fat32,
            None,
        ),
    ];
    for (size, args, kind, label) in cases {
        mkfs_image(&img, *size, "mkfs.fat", args);
        fill(&img, &tree);
        let p = check(&img, &tree, *kind, *label, d.path());
        eprintln!(
            "mkfs.fat {args:?}: {} of {} bytes used",
            p.fs.used, p.fs.size
        );
    }
    assert_eq!(
        match probe_at(&img, 0, 40 * MIB + 7 * 512) {
            Found::Known(p) => p.fs.uuid,
            _ => None,
        }
        .as_deref(),
        Some("1234-ABCD")
    );
}

#[test]
fn fat_inside_a_partition() {
    let (d, tree) = tmp_with_tree(1);
    let fsimg = d.path().join("fs.img");
    mkfs_image(&fsimg, 64 * MIB, "mkfs.fat", &["-F", "32"]);
    fill(&fsimg, &tree);
    let disk = d.path().join("disk.img");
    let (whole, p) = probe_in_partition(&fsimg, &disk, 80 * MIB, 72 * MIB);
    assert_used_plus(&p, &whole, (64 * MIB, 72 * MIB), "slack is used");
}

#[test]
fn fat_damage_gives_errors_not_panics() {
    let d = tmp();
    let img = d.path().join("f.img");
    let pristine = d.path().join("p.img");
    mkfs_image(&pristine, 64 * MIB, "mkfs.fat", &["-F", "32"]);
    let fresh = || std::fs::copy(&pristine, &img).unwrap();
    let damaged = |len: u64, what: &str| expect_damaged(&img, len, &[what]);
    fresh();
    damaged(32 * MIB, "truncated");
    fresh();
    apply(&img, &[(0x0B, 1000u16.to_le_bytes().to_vec())]);
    damaged(64 * MIB, "bytes per sector");
    fresh();
    apply(&img, &[(0x24, 1u32.to_le_bytes().to_vec())]);
    damaged(64 * MIB, "cannot describe");
    fresh();
    apply(&img, &[(0x10, vec![0])]);
    damaged(64 * MIB, "zero FATs");
    // FAT32 by its BPB, but too few clusters for FAT32 by Microsoft's rule.
    mkfs_image(
        &img,
        64 * MIB,
        "mkfs.fat",
        &["-F", "32", "-S", "4096", "-s", "1"],
    );
    damaged(64 * MIB, "make this Fat16");
    // Not FAT at all.
    fresh();
    apply(&img, &[(510, vec![0, 0])]);
    assert!(matches!(probe_at(&img, 0, 64 * MIB), Found::Unknown));

    // Damage is reported with the FAT type the boot sector announces.
    mkfs_image(&img, 8 * MIB, "mkfs.fat", &["-F", "12"]);
    match probe_at(&img, 0, 4 * MIB) {
        Found::Damaged { kind, .. } => assert_eq!(kind, FsKind::Fat12),
        o => panic!("{o:?}"),
    }

    // Bit flips in the boot sector never panic.
    let small = d.path().join("s.img");
    mkfs_image(&small, 2 * MIB, "mkfs.fat", &["-F", "12"]);
    let base = std::fs::read(&small).unwrap();
    let rnd = pseudo_random(3, 9000);
    flip_bits(&base, &rnd, 3000, 3, |h| h % 0x60, snapshot::fs::fat::probe);
}
