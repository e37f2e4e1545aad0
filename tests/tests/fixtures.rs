//! The fixture builder and the oracles checked against themselves: a perfect copy passes, a
//! damaged one fails, and each fixture has what the acceptance tests rely on.

use bmr_tests::fixtures::{self, FsKind, TableSpec};
use bmr_tests::oracle::{self, Expect};
use bmr_tests::util::{find_in_file, Cmd};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

fn scratch(name: &str) -> tempfile::TempDir {
    let base = bmr_tests::Workspace::root().join("target").join("tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)
        .unwrap()
}

#[test]
fn gpt_server_has_what_tests_need() {
    let fx = fixtures::gpt_server().unwrap();
    assert_eq!(fx.sector_size, 512);
    assert!(matches!(fx.table, TableSpec::Gpt { .. }));
    let kinds: Vec<_> = fx.partitions.iter().map(|p| p.fs).collect();
    assert_eq!(
        kinds,
        [Some(FsKind::Fat32), Some(FsKind::Ext4), Some(FsKind::Swap)]
    );
    let root = fx.partition(2);
    let pct = root.used_bytes as f64 / root.size as f64;
    assert!(
        (0.35..0.5).contains(&pct),
        "ext4 root {:.0}% used",
        pct * 100.0
    );
    assert!(root.files.iter().any(|f| f.path == "usr/bin/ls"));
    let d = fx.deleted.as_ref().unwrap();
    assert!(find_in_file(&fx.image, d.marker.as_bytes())
        .unwrap()
        .is_some());
    let last = fx
        .partitions
        .iter()
        .map(|p| p.offset + p.size)
        .max()
        .unwrap();
    assert!(
        fx.size - last > 16 << 20,
        "free space at the end of the disk"
    );
    let esp = fx.partition(1);
    assert!(esp.files.iter().any(|f| f.path == "EFI/BOOT/BOOTX64.EFI"));
    let out = Cmd::new("sgdisk").arg("-v").arg(&fx.image).ok();
    assert!(
        out.stdout.contains("No problems found"),
        "{}",
        out.describe()
    );
}

#[test]
fn mbr_mixed_has_what_tests_need() {
    let fx = fixtures::mbr_mixed().unwrap();
    assert_eq!(
        fx.table,
        TableSpec::Mbr {
            signature: 0x1234_5678
        }
    );
    let img = std::fs::read(&fx.image).unwrap();
    assert_eq!(&img[440..444], &0x1234_5678u32.to_le_bytes());
    let kinds: Vec<_> = fx
        .partitions
        .iter()
        .map(|p| (p.number, p.fs, p.extended))
        .collect();
    assert_eq!(
        kinds,
        [
            (1, Some(FsKind::Fat16), false),
            (2, Some(FsKind::Ntfs), false),
            (3, None, true),
            (5, Some(FsKind::Ext2), false)
        ]
    );
}

#[test]
fn gpt_4k_is_made_for_4096_byte_sectors() {
    let fx = fixtures::gpt_4k().unwrap();
    assert_eq!(fx.sector_size, 4096);
    let f = std::fs::File::open(&fx.image).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 4096).unwrap();
    assert_eq!(&b, b"EFI PART", "GPT header at LBA 1 of 4096 bytes");
    f.read_exact_at(&mut b, 512).unwrap();
    assert_ne!(&b, b"EFI PART", "no GPT header at LBA 1 of 512 bytes");
    let esp = fx.partition(1);
    let s = scratch("esp4k");
    let part = s.path().join("esp.img");
    bmr_tests::util::extract(&fx.image, esp.offset, esp.size, &part).unwrap();
    let g = oracle::fat_geometry(&part).unwrap();
    assert_eq!((g.bits, g.bytes_per_sector), (32, 4096));
}

/// A copy with every free block zeroed passes the oracle; a used block changed, a file changed
/// or the deleted pattern left in place each fail it.
#[test]
fn oracle_passes_ideal_copy_and_catches_damage() {
    for fx in [
        fixtures::gpt_server().unwrap(),
        fixtures::mbr_mixed().unwrap(),
    ] {
        let s = scratch(&fx.name);
        let ideal = s.path().join("ideal.img");
        oracle::ideal_copy(&fx, &ideal, &s.path().join("w")).unwrap();
        oracle::compare_disk(
            &fx,
            &fx.image,
            &ideal,
            &s.path().join("w"),
            Expect::default(),
        )
        .unwrap_or_else(|e| panic!("{}: ideal copy refused: {e:#}", fx.name));

        // free space: garbage in the source, zeros in the ideal copy
        for (n, nonzero, free) in
            oracle::free_not_zeroed(&fx, &fx.image, &ideal, &s.path().join("w")).unwrap()
        {
            assert_eq!(
                nonzero, 0,
                "{} partition {n}: ideal copy has non-zero free bytes",
                fx.name
            );
            assert!(free > 0);
        }
        for (n, nonzero, free) in
            oracle::free_not_zeroed(&fx, &fx.image, &fx.image, &s.path().join("w")).unwrap()
        {
            assert!(
                nonzero > free / 2,
                "{} partition {n}: free space is not garbage ({nonzero} of {free} non-zero)",
                fx.name
            );
        }

        // the source itself still holds the deleted file and the swap garbage
        if fx.deleted.is_some() {
            let e = oracle::compare_disk(
                &fx,
                &fx.image,
                &fx.image,
                &s.path().join("w"),
                Expect::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("deleted file's pattern"), "{e}");
            assert!(e.contains("swap"), "{e}");
        }

        // one byte of each file's data changed: caught by the used-range comparison or the hashes
        for p in fx
            .partitions
            .iter()
            .filter(|p| p.fs.is_some() && !p.files.is_empty())
        {
            let damaged = s.path().join("damaged.img");
            std::fs::copy(&ideal, &damaged).unwrap();
            let part = s.path().join("part.img");
            bmr_tests::util::extract(&fx.image, p.offset, p.size, &part).unwrap();
            let kind = p.fs.unwrap();
            let used = oracle::complement(&oracle::free_ranges(kind, &part).unwrap(), p.size);
            // the last used range is file data in every fixture filesystem
            let (s0, e0) = *used.iter().rev().find(|(a, b)| b - a >= 4096).unwrap();
            let at = p.offset + (s0 + e0) / 2;
            let f = OpenOptions::new()
                .write(true)
                .read(true)
                .open(&damaged)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
            drop(f);
            let e = oracle::compare_disk(
                &fx,
                &fx.image,
                &damaged,
                &s.path().join("w"),
                Expect::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("differs at disk offset"), "{}: {e}", fx.name);
        }
    }
}
