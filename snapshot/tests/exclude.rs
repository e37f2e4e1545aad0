//! Exclusions on real filesystems: swap files on ext2/ext4 (by name and by `/etc/fstab`) and
//! `pagefile.sys` on NTFS are found through the filesystem's metadata and their contents left
//! out of the used-block map, except the first page. An image holding only what is still mapped
//! passes `e2fsck -fn` / `ntfsfix -n`, every other file reads back unchanged, the excluded files
//! keep their names, sizes and first page.

mod common;

use common::*;
use snapshot::fs::exclude::{Exclusions, KEEP};
use snapshot::fs::{probe_excluding, Found, Probe};
use snapshot::DiskSource;
use std::path::Path;

fn probe_ex(img: &Path, ex: &Exclusions) -> (Probe, Vec<(String, u64)>, Vec<String>) {
    let len = std::fs::metadata(img).unwrap().len();
    let (found, excluded, notes) = probe_excluding(&DiskSource::open(img).unwrap(), 0, len, ex);
    let Found::Known(p) = found else {
        panic!("{}: {found:?}", img.display())
    };
    let ex = excluded.into_iter().map(|e| (e.path, e.bytes)).collect();
    (p, ex, notes)
}

/// A swap file of `size` random bytes with a real `mkswap` header.
fn swap_file(path: &Path, size: u64, seed: u64) {
    std::fs::write(path, pseudo_random(seed, size as usize)).unwrap();
    run(cmd("mkswap").arg("-f").arg(path));
}

fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
    let out = std::process::Command::new(tool("debugfs"))
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs cat {path}");
    out.stdout
}

fn ext_case(mkfs: &str, args: &[&str], swap_size: u64, fstab_swap_size: u64) {
    let (d, tree) = tmp_with_tree(1);
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("var")).unwrap();
    std::fs::write(
        tree.join("etc/fstab"),
        "UUID=abc / ext4 errors=remount-ro 0 1\n/var/swap none swap sw 0 0\n",
    )
    .unwrap();
    swap_file(&tree.join("swapfile"), swap_size, 7);
    swap_file(&tree.join("var/swap"), fstab_swap_size, 8);
    // Named like a swap file but not one: kept.
    std::fs::write(tree.join("swap.img"), pseudo_random(9, 3 << 20)).unwrap();
    let img = d.path().join("fs.img");
    let size = (swap_size + fstab_swap_size) * 3 / 2 + 64 * MIB;
    sparse(&img, size);
    run(cmd(mkfs).args(args).arg("-d").arg(&tree).arg(&img));

    let (all, none, _) = probe_ex(&img, &Exclusions::none());
    assert!(none.is_empty());
    let (p, ex, notes) = probe_ex(&img, &Exclusions::default());
    assert!(notes.is_empty(), "{notes:?}");
    let names: Vec<&str> = ex.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(names, ["/swapfile", "/var/swap"], "{mkfs} {args:?}");
    assert_eq!(ex[0].1, swap_size - KEEP, "{mkfs}: /swapfile bytes");
    assert_eq!(ex[1].1, fstab_swap_size - KEEP, "{mkfs}: /var/swap bytes");
    assert_eq!(
        all.used.len() - p.used.len(),
        swap_size + fstab_swap_size - 2 * KEEP
    );
    assert_eq!(p.fs.used, p.used.len());

    let copy = used_copy(&img, &p, d.path());
    run(cmd("e2fsck").args(["-fn"]).arg(&copy));
    let dump = d.path().join("dump");
    fresh_dir(&dump);
    run(cmd("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dump.display()))
        .arg(&copy));
    for f in list_files(&tree) {
        let name = f.to_str().unwrap();
        let want = std::fs::read(tree.join(&f)).unwrap();
        let got = std::fs::read(dump.join(&f)).unwrap();
        if name == "swapfile" || name == "var/swap" {
            assert_eq!(got.len(), want.len(), "{name}: size kept");
            assert_eq!(
                got[..KEEP as usize],
                want[..KEEP as usize],
                "{name}: header kept"
            );
        } else {
            assert!(got == want, "{mkfs}: {name} differs in the copy");
        }
    }
    // The swap header is intact: swapon would take it.
    let head = debugfs_cat(&copy, "/swapfile");
    assert_eq!(&head[4086..4096], b"SWAPSPACE2");
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn ext4_swap_files_are_not_kept() {
    ext_case("mkfs.ext4", &["-q", "-F"], 512 * MIB, 32 * MIB);
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn ext2_block_map_swap_files_are_not_kept() {
    // 1 KiB blocks: a 20 MiB file needs the double-indirect block.
    ext_case("mkfs.ext2", &["-q", "-F", "-b", "1024"], 20 * MIB, 3 * MIB);
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn ntfs_pagefile_is_not_kept() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("ntfs.img");
    mkfs_image(&img, 1536 * MIB, "mkntfs", &["-F", "-Q", "-c", "4096"]);
    let page = d.path().join("pagefile.sys");
    std::fs::write(&page, pseudo_random(3, (1 << 30) as usize)).unwrap();
    run(cmd("ntfscp")
        .arg("-f")
        .arg(&img)
        .arg(&page)
        .arg("pagefile.sys"));
    // Enough other names that the root index spills into INDX blocks.
    let mut others = Vec::new();
    for f in list_files(&tree) {
        let name = f.to_str().unwrap().replace('/', "_");
        run(cmd("ntfscp")
            .arg("-f")
            .arg(&img)
            .arg(tree.join(&f))
            .arg(&name));
        others.push((tree.join(&f), name));
    }
    for i in 0..60 {
        let src = d.path().join(format!("n{i}"));
        std::fs::write(&src, format!("file {i}")).unwrap();
        let name = format!("a-rather-long-file-name-number-{i:03}.txt");
        run(cmd("ntfscp").arg("-f").arg(&img).arg(&src).arg(&name));
        others.push((src, name));
    }
    let (all, _, _) = probe_ex(&img, &Exclusions::none());
    let ex_upper = Exclusions {
        paths: vec!["/PAGEFILE.SYS".into(), "/hiberfil.sys".into()],
        ..Exclusions::default()
    };
    let (p, ex, notes) = probe_ex(&img, &ex_upper);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(ex, vec![("/PAGEFILE.SYS".to_string(), (1 << 30) - KEEP)]);
    assert_eq!(all.used.len() - p.used.len(), (1 << 30) - KEEP);

    let copy = used_copy(&img, &p, d.path());
    let out = run(cmd("ntfsfix").arg("-n").arg(&copy));
    assert!(out.contains("processed successfully"), "{out}");
    for (src, name) in &others {
        let got = std::process::Command::new(tool("ntfscat"))
            .arg(&copy)
            .arg(name)
            .output()
            .unwrap();
        assert!(
            got.stdout == std::fs::read(src).unwrap(),
            "{name} differs in the copy"
        );
    }
    let got = std::process::Command::new(tool("ntfscat"))
        .arg(&copy)
        .arg("pagefile.sys")
        .output()
        .unwrap();
    assert_eq!(got.stdout.len(), 1 << 30, "pagefile.sys keeps its size");
    assert_eq!(
        got.stdout[..KEEP as usize],
        std::fs::read(&page).unwrap()[..KEEP as usize]
    );
}
