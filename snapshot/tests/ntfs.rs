//! NTFS used-cluster maps against ntfs-3g's tools: an image holding only the used ranges passes
//! ntfsfix -n, and ntfscat reads back every file unchanged.

mod common;

use common::*;
use snapshot::fs::{Found, FsKind, Probe};
use std::path::{Path, PathBuf};

/// The files of `tree`, flattened to names in the root directory (ntfscp cannot make
/// directories).
fn flat(tree: &Path) -> Vec<(PathBuf, String)> {
    list_files(tree)
        .into_iter()
        .map(|f| {
            let name = f.to_str().unwrap().replace('/', "_");
            (tree.join(f), name)
        })
        .collect()
}

fn fill(img: &Path, tree: &Path) {
    for (src, name) in flat(tree) {
        run(cmd("ntfscp").arg("-f").arg(img).arg(&src).arg(&name));
    }
}

/// Free bytes as ntfscluster counts them from $Bitmap.
fn ntfs_free_bytes(img: &Path) -> u64 {
    let out = run(cmd("ntfscluster").arg("-i").arg(img));
    out.lines()
        .find_map(|l| l.strip_prefix("bytes of free space"))
        .map(|v| v.trim_start_matches([' ', ':']).trim().parse().unwrap())
        .unwrap_or_else(|| panic!("ntfscluster -i:\n{out}"))
}

fn check(img: &Path, tree: &Path, label: Option<&str>, work: &Path) -> Probe {
    let len = std::fs::metadata(img).unwrap().len();
    let p = known(img);
    assert_eq!(p.fs.kind, FsKind::Ntfs);
    let id = blkid(img);
    assert_eq!(p.fs.uuid.as_deref(), id.get("UUID").map(String::as_str));
    let ntfslabel = run(cmd("ntfslabel").arg(img));
    let ntfslabel = ntfslabel.trim_end_matches('\n');
    assert_eq!(p.fs.label.as_deref().unwrap_or(""), ntfslabel);
    assert_eq!(p.fs.label.as_deref(), label);
    let cluster = u64::from(p.fs.block_size);
    let clusters = (p.fs.size / 512 * 512) / cluster;
    // Used clusters inside the volume vs ntfscluster's free space.
    let in_volume: u64 = p
        .used
        .within(0, clusters * cluster)
        .map(|(a, b)| b - a)
        .sum();
    assert_eq!(
        clusters * cluster - in_volume,
        ntfs_free_bytes(img),
        "free bytes vs ntfscluster"
    );
    // The backup boot sector (last sector) is kept.
    assert!(p.used.within(len - 512, len).count() == 1);
    assert_eq!(p.fs.used, p.used.len());

    let copy = used_copy(img, &p, work);
    let out = run(cmd("ntfsfix").arg("-n").arg(&copy));
    assert!(out.contains("processed successfully"), "{out}");
    for (src, name) in flat(tree) {
        let want = std::fs::read(&src).unwrap();
        let got = std::process::Command::new(tool("ntfscat"))
            .arg(&copy)
            .arg(&name)
            .output()
            .unwrap();
        assert!(got.status.success(), "ntfscat {name}");
        assert!(
            got.stdout == want,
            "{}: {name} differs in the copy",
            img.display()
        );
    }
    assert_eq!(ntfs_free_bytes(&copy), ntfs_free_bytes(img));
    p
}

#[test]
fn ntfs_variants_copy_cleanly() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("ntfs.img");
    let cases: &[(u64, &[&str], Option<&str>)] = &[
        (
            64 * MIB,
            &["-s", "512", "-c", "4096", "-L", "Data Vol"],
            Some("Data Vol"),
        ),
        (64 * MIB + 3 * 512, &["-s", "512", "-c", "512"], None),
        (
            96 * MIB,
            &["-s", "4096", "-c", "4096", "-L", "four k"],
            Some("four k"),
        ),
        (128 * MIB, &["-s", "512", "-c", "65536"], None),
        (
            64 * MIB,
            &["-s", "512", "-c", "2048", "-L", "ünï"],
            Some("ünï"),
        ),
    ];
    for (size, args, label) in cases {
        mkfs_image(&img, *size, "mkntfs", &[&["-F", "-Q"], *args].concat());
        fill(&img, &tree);
        let p = check(&img, &tree, *label, d.path());
        eprintln!("mkntfs {args:?}: {} of {} bytes used", p.fs.used, p.fs.size);
    }
}

#[test]
fn ntfs_inside_a_partition() {
    let (d, tree) = tmp_with_tree(1);
    let fsimg = d.path().join("fs.img");
    mkfs_image(&fsimg, 48 * MIB, "mkntfs", &["-F", "-Q"]);
    fill(&fsimg, &tree);
    let disk = d.path().join("disk.img");
    let (whole, p) = probe_in_partition(&fsimg, &disk, 64 * MIB, 56 * MIB);
    let tail = (48 * MIB - 4096, 56 * MIB);
    assert_used_plus(&p, &whole, tail, "the tail past the volume is used");
}

#[test]
fn ntfs_damage_gives_errors_not_panics() {
    let d = tmp();
    let pristine = d.path().join("p.img");
    mkfs_image(&pristine, 32 * MIB, "mkntfs", &["-F", "-Q", "-c", "4096"]);
    let img = d.path().join("w.img");
    let fresh = || std::fs::copy(&pristine, &img).unwrap();
    let damaged = |len: u64, what: &str| expect_damaged(&img, len, &[what]);
    let b = std::fs::read(&pristine).unwrap();
    let mft_lcn = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap());
    let mft = mft_lcn * 4096;

    fresh();
    damaged(16 * MIB, "truncated");
    fresh();
    apply(&img, &[(0x0B, 3u16.to_le_bytes().to_vec())]);
    damaged(32 * MIB, "bytes per sector");
    fresh();
    apply(&img, &[(0x30, (1u64 << 40).to_le_bytes().to_vec())]);
    damaged(32 * MIB, "MFT cluster");
    // $Bitmap's record: wrong magic, then a torn write (fixup mismatch).
    fresh();
    apply(&img, &[(mft + 6 * 1024, b"BAAD".to_vec())]);
    damaged(32 * MIB, "MFT record 6 ($Bitmap)");
    fresh();
    apply(&img, &[(mft + 6 * 1024 + 510, vec![0x12, 0x34])]);
    damaged(32 * MIB, "update sequence mismatch");
    // $MFT record itself.
    fresh();
    apply(&img, &[(mft, b"XXXX".to_vec())]);
    damaged(32 * MIB, "MFT record 0");
    // Not NTFS.
    fresh();
    apply(&img, &[(3, b"XXXX    ".to_vec())]);
    assert!(matches!(probe_at(&img, 0, 32 * MIB), Found::Unknown));

    // Random bit flips in the boot sector and the first MFT records never panic.
    let spots: Vec<usize> = (0..512)
        .chain(mft as usize..mft as usize + 8 * 1024)
        .collect();
    let rnd = pseudo_random(11, 12_000);
    let spot = |h: usize| spots[h % spots.len()];
    flip_bits(&b, &rnd, 4000, 3, spot, snapshot::fs::ntfs::probe);
}

/// LCN of `$LogFile`'s first run, from ntfsinfo.
fn logfile_lcn(img: &Path) -> u64 {
    let out = run(cmd("ntfsinfo").args(["-i", "2", "-v"]).arg(img));
    let mut lines = out.lines().skip_while(|l| !l.contains("Runlist:"));
    let first = lines.nth(1).unwrap_or_else(|| panic!("ntfsinfo:\n{out}"));
    let lcn = first.split_whitespace().nth(1).unwrap();
    u64::from_str_radix(lcn.trim_start_matches("0x"), 16).unwrap()
}

/// A valid 4096-byte restart page (as ntfs-3g checks it) for a 2 MiB log, with one client
/// record and update-sequence protection.
fn restart_page(lsn: u64, in_use: u16, flags: u16) -> Vec<u8> {
    let put16 = |p: &mut Vec<u8>, o: usize, v: u16| p[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |p: &mut Vec<u8>, o: usize, v: u32| p[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |p: &mut Vec<u8>, o: usize, v: u64| p[o..o + 8].copy_from_slice(&v.to_le_bytes());
    let mut p = vec![0u8; 4096];
    p[0..4].copy_from_slice(b"RSTR");
    put16(&mut p, 4, 0x1E); // usa offset
    put16(&mut p, 6, 9); // usa count
    put32(&mut p, 0x10, 4096); // system page size
    put32(&mut p, 0x14, 4096); // log page size
    put16(&mut p, 0x18, 0x30); // restart area offset
    put16(&mut p, 0x1A, 1);
    put16(&mut p, 0x1C, 1);
    let ra = 0x30;
    let log_size: u64 = 2 << 20;
    put64(&mut p, ra, lsn);
    put16(&mut p, ra + 8, 1); // log clients
    put16(&mut p, ra + 10, 0xFFFF); // free list
    put16(&mut p, ra + 12, in_use);
    put16(&mut p, ra + 14, flags);
    put32(&mut p, ra + 16, 67 - (64 - log_size.leading_zeros())); // sequence number bits
    put16(&mut p, ra + 20, 48 + 160); // restart area length
    put16(&mut p, ra + 22, 48); // client array offset
    put64(&mut p, ra + 24, log_size);
    put16(&mut p, ra + 36, 48); // log record header length
    put16(&mut p, ra + 38, 64); // log page data offset
    let cr = ra + 48;
    put64(&mut p, cr, lsn);
    put64(&mut p, cr + 8, lsn);
    put16(&mut p, cr + 16, 0xFFFF);
    put16(&mut p, cr + 18, 0xFFFF);
    put16(&mut p, cr + 20, 1);
    put32(&mut p, cr + 32, 8);
    for (i, u) in "NTFS".encode_utf16().enumerate() {
        put16(&mut p, cr + 36 + 2 * i, u);
    }
    let usn = [0x07, 0x00];
    p[0x1E..0x20].copy_from_slice(&usn);
    for i in 1..9 {
        let pos = i * 512 - 2;
        let orig = [p[pos], p[pos + 1]];
        p[0x1E + 2 * i..0x20 + 2 * i].copy_from_slice(&orig);
        p[pos..pos + 2].copy_from_slice(&usn);
    }
    p
}

/// Whether ntfs-3g agrees to mount the volume read-write (ntfslabel writes the label).
fn ntfs3g_mounts_rw(img: &Path) -> bool {
    let (code, _, err) = run_status(cmd("ntfslabel").arg(img).arg("probe"), None);
    match code {
        Some(0) => true,
        _ => {
            assert!(err.contains("unclean"), "ntfslabel failed otherwise: {err}");
            false
        }
    }
}

#[test]
fn ntfs_unclean_logfile_is_refused() {
    let d = tmp();
    let pristine = d.path().join("p.img");
    mkfs_image(
        &pristine,
        32 * MIB,
        "mkntfs",
        &["-F", "-Q", "-s", "512", "-c", "4096"],
    );
    let at = logfile_lcn(&pristine) * 4096;
    let img = d.path().join("w.img");
    let scratch = d.path().join("s.img");
    let with = |pages: &[(u64, Vec<u8>)]| {
        std::fs::copy(&pristine, &img).unwrap();
        let p: Vec<(u64, Vec<u8>)> = pages.iter().map(|(o, b)| (at + o, b.clone())).collect();
        apply(&img, &p);
        std::fs::copy(&img, &scratch).unwrap();
        (probe_at(&img, 0, 32 * MIB), ntfs3g_mounts_rw(&scratch))
    };
    // Windows running or crashed: a client in use and no clean flag. ntfs-3g refuses too.
    match with(&[(0, restart_page(100, 0, 0)), (4096, restart_page(90, 0, 0))]) {
        (Found::Damaged { reason, .. }, false) => {
            assert!(reason.contains("not cleanly unmounted"), "{reason}")
        }
        o => panic!("{o:?}"),
    }
    // Cleanly shut down, or no client in use: both accept.
    for (in_use, flags) in [(0, 2), (0xFFFF, 0), (0xFFFF, 2)] {
        match with(&[
            (0, restart_page(100, in_use, flags)),
            (4096, restart_page(90, in_use, flags)),
        ]) {
            (Found::Known(_), true) => {}
            o => panic!("in use {in_use:x} flags {flags}: {o:?}"),
        }
    }
    // The newer of the two restart pages decides.
    assert!(matches!(
        with(&[
            (0, restart_page(100, 0, 2)),
            (4096, restart_page(120, 0, 0))
        ])
        .0,
        Found::Damaged { .. }
    ));
    assert!(matches!(
        with(&[
            (0, restart_page(100, 0, 0)),
            (4096, restart_page(120, 0, 2))
        ])
        .0,
        Found::Known(_)
    ));
    // A torn restart page is ignored; with no valid page left, the log is refused.
    let mut torn = restart_page(100, 0xFFFF, 2);
    torn[1022] ^= 0xFF;
    match with(&[(0, torn), (4096, vec![0u8; 4096])]).0 {
        Found::Damaged { reason, .. } => assert!(reason.contains("restart page"), "{reason}"),
        o => panic!("{o:?}"),
    }
}
