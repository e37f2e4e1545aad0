//! Damaged allocation data is never trusted: a used-block map that disagrees with the
//! filesystem's own counts and structures (a zeroed NTFS `$Bitmap`, ext bitmap bits cleared
//! without checksums, a zeroed first FAT) makes the filesystem copied whole, with the reason in
//! the layout (and so in the manifest), and the kept bytes read back every file.

mod common;

use common::*;
use snapshot::layout::{analyze, DiskLayout};
use snapshot::DiskSource;
use std::path::{Path, PathBuf};

/// The layout of the disk image `img` (a filesystem on the whole disk).
fn layout(img: &Path) -> DiskLayout {
    analyze(&DiskSource::open(img).unwrap(), None, false).unwrap()
}

/// Panics unless the filesystem on `img` is copied whole with a reason mentioning every one of
/// `what`; returns a copy of `img` holding only the kept bytes.
fn expect_whole(img: &Path, what: &[&str], work: &Path) -> PathBuf {
    let l = layout(img);
    let size = std::fs::metadata(img).unwrap().len();
    let p = &l.partitions[0];
    let reason = p
        .whole
        .as_deref()
        .unwrap_or_else(|| panic!("{}: not copied whole: {:?}", img.display(), l.partitions));
    for w in what {
        assert!(reason.contains(w), "{reason:?} should mention {w:?}");
    }
    assert_eq!(l.used.ranges(), &[(0, size)], "{reason}");
    assert!(
        l.notes
            .iter()
            .any(|n| n.contains("copied whole") && n.contains(reason)),
        "{:?}",
        l.notes
    );
    let copy = work.join("kept.img");
    copy_used(img, &copy, &l.used, 0);
    copy
}

/// Panics unless the filesystem on `img` is mapped (not copied whole) and keeps less than it
/// spans.
fn expect_mapped(img: &Path) {
    let l = layout(img);
    let size = std::fs::metadata(img).unwrap().len();
    assert_eq!(l.partitions[0].whole, None, "{}", img.display());
    assert!(l.partitions[0].fs.is_some());
    assert!(
        l.used.len() < size / 4 * 3,
        "{}: {}",
        img.display(),
        l.used.len()
    );
}

/// Byte offset of the first cluster-aligned copy of `needle` in `img`.
fn find_aligned(img: &Path, needle: &[u8], align: usize) -> u64 {
    let b = std::fs::read(img).unwrap();
    (0..b.len() / align)
        .map(|i| i * align)
        .find(|&o| b.get(o..o + needle.len()) == Some(needle))
        .unwrap_or_else(|| panic!("{}: not found", img.display())) as u64
}

// NTFS

fn ntfs_flat(tree: &Path) -> Vec<(PathBuf, String)> {
    list_files(tree)
        .into_iter()
        .map(|f| {
            let name = f.to_str().unwrap().replace('/', "_");
            (tree.join(f), name)
        })
        .collect()
}

fn ntfs_assert_files(copy: &Path, tree: &Path) {
    for (src, name) in ntfs_flat(tree) {
        let want = std::fs::read(&src).unwrap();
        let got = std::process::Command::new(tool("ntfscat"))
            .arg(copy)
            .arg(&name)
            .output()
            .unwrap();
        assert!(got.status.success(), "ntfscat {name}: {:?}", got);
        assert!(got.stdout == want, "{name} differs in the kept copy");
    }
}

#[test]
fn ntfs_with_damaged_bitmap_is_copied_whole() {
    let (d, tree) = tmp_with_tree(1);
    let pristine = d.path().join("pristine.img");
    mkfs_image(&pristine, 64 * MIB, "mkntfs", &["-F", "-Q", "-c", "4096"]);
    for (src, name) in ntfs_flat(&tree) {
        run(cmd("ntfscp").arg("-f").arg(&pristine).arg(&src).arg(&name));
    }
    expect_mapped(&pristine);
    let bitmap = std::process::Command::new(tool("ntfscat"))
        .arg(&pristine)
        .arg("$Bitmap")
        .output()
        .unwrap()
        .stdout;
    assert_eq!(bitmap.len(), 2048);
    let at = find_aligned(&pristine, &bitmap, 4096);
    let img = d.path().join("ntfs.img");

    // $Bitmap zeroed: nothing but the tail would be kept.
    std::fs::copy(&pristine, &img).unwrap();
    apply(&img, &[(at, vec![0; bitmap.len()])]);
    let copy = expect_whole(&img, &["ntfs", "$Bitmap", "$MFT"], d.path());
    ntfs_assert_files(&copy, &tree);

    // Only the first cluster of one file cleared: the MFT says it is in use.
    std::fs::copy(&pristine, &img).unwrap();
    let big = std::fs::read(tree.join("big.bin")).unwrap();
    let cl = find_aligned(&img, &big[..4096], 4096) / 4096;
    let mut bm = bitmap.clone();
    bm[(cl / 8) as usize] &= !(1 << (cl % 8));
    apply(&img, &[(at, bm)]);
    let copy = expect_whole(
        &img,
        &["ntfs", "$Bitmap", &format!("cluster {cl}")],
        d.path(),
    );
    ntfs_assert_files(&copy, &tree);
}

// ext

fn ext_assert_files(copy: &Path, tree: &Path, work: &Path) {
    let dump = work.join("dump");
    fresh_dir(&dump);
    run(cmd("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dump.display()))
        .arg(copy));
    assert_same_files(tree, &dump, copy.display());
}

fn dumpe2fs_field(img: &Path, name: &str) -> u64 {
    run(cmd("dumpe2fs").arg(img))
        .lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .and_then(|v| v.split([' ', ',', '-']).find(|s| !s.is_empty()))
        .unwrap_or_else(|| panic!("no {name:?} in dumpe2fs"))
        .parse()
        .unwrap()
}

#[test]
fn ext2_with_cleared_bitmap_bits_is_copied_whole() {
    let (d, tree) = tmp_with_tree(1);
    let pristine = d.path().join("pristine.img");
    sparse(&pristine, 64 * MIB);
    run(cmd("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&pristine));
    expect_mapped(&pristine);
    let bb = dumpe2fs_field(&pristine, "Block bitmap at ");
    let itable = dumpe2fs_field(&pristine, "Inode table at ");
    let bitmap = read_range(&pristine, bb * 4096, 4096);
    let img = d.path().join("ext2.img");

    // The bits of big.bin's blocks cleared, nothing else touched: e2fsck sees the counts wrong.
    std::fs::copy(&pristine, &img).unwrap();
    let blocks: Vec<u64> = run(cmd("debugfs").args(["-R", "blocks /big.bin"]).arg(&img))
        .split_whitespace()
        .map(|b| b.parse().unwrap())
        .collect();
    assert!(blocks.len() > 100);
    let mut bm = bitmap.clone();
    for b in &blocks {
        bm[(b / 8) as usize] &= !(1 << (b % 8));
    }
    apply(&img, &[(bb * 4096, bm)]);
    let (_, out, _) = run_status(cmd("e2fsck").arg("-fn").arg(&img), None);
    assert!(out.contains("Free blocks count wrong"), "{out}");
    let copy = expect_whole(&img, &["ext2", "group 0", "free"], d.path());
    ext_assert_files(&copy, &tree, d.path());

    // An inode table block cleared, and the group's and superblock's free counts raised to match:
    // the counts agree, the structure does not.
    std::fs::copy(&pristine, &img).unwrap();
    let mut bm = bitmap.clone();
    bm[(itable / 8) as usize] &= !(1 << (itable % 8));
    let gd_free = u16::from_le_bytes(read_range(&img, 4096 + 0x0C, 2).try_into().unwrap());
    let sb_free = u32::from_le_bytes(read_range(&img, 1024 + 0x0C, 4).try_into().unwrap());
    apply(
        &img,
        &[
            (bb * 4096, bm),
            (4096 + 0x0C, (gd_free + 1).to_le_bytes().to_vec()),
            (1024 + 0x0C, (sb_free + 1).to_le_bytes().to_vec()),
        ],
    );
    let copy = expect_whole(&img, &["ext2", "inode table", "group 0"], d.path());
    ext_assert_files(&copy, &tree, d.path());

    // Only the superblock's free count disagrees with the groups'.
    std::fs::copy(&pristine, &img).unwrap();
    apply(&img, &[(1024 + 0x0C, (sb_free + 7).to_le_bytes().to_vec())]);
    expect_whole(&img, &["ext2", "superblock", "free"], d.path());
}

// FAT

/// (first FAT offset, FAT length in bytes, number of FATs) from the boot sector.
fn fat_geometry(img: &Path) -> (u64, u64, u64) {
    let bs = read_range(img, 0, 512);
    let bps = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
    let rsvd = u64::from(u16::from_le_bytes([bs[14], bs[15]]));
    let fatsz16 = u64::from(u16::from_le_bytes([bs[22], bs[23]]));
    let fatsz = if fatsz16 != 0 {
        fatsz16
    } else {
        u64::from(u32::from_le_bytes([bs[36], bs[37], bs[38], bs[39]]))
    };
    (rsvd * bps, fatsz * bps, u64::from(bs[16]))
}

fn fat_assert_files(copy: &Path, tree: &Path, work: &Path) {
    let out = work.join("out");
    fresh_dir(&out);
    run(cmd("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(copy)
        .arg("::tree")
        .arg(&out));
    assert_same_files(tree, &out.join("tree"), copy.display());
}

#[test]
fn fat_with_zeroed_first_fat_is_copied_whole() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("fat.img");
    for bits in ["12", "16", "32"] {
        let size = match bits {
            "12" => 8 * MIB,
            "16" => 16 * MIB,
            _ => 64 * MIB,
        };
        let mut args = vec!["-F", bits];
        if bits == "12" {
            args.extend(["-s", "8"]); // 2048 clusters of 4 KiB
        }
        mkfs_image(&img, size, "mkfs.fat", &args);
        run(cmd("mcopy")
            .args(["-s", "-i"])
            .arg(&img)
            .arg(&tree)
            .arg("::"));
        expect_mapped(&img);
        let (fat, len, nfats) = fat_geometry(&img);
        assert_eq!(nfats, 2);
        apply(&img, &[(fat, vec![0; len as usize])]);
        let copy = expect_whole(&img, &[&format!("fat{bits}"), "FAT"], d.path());
        // Repair as fsck.fat would, from the second FAT, then read every file back.
        let second = read_range(&copy, fat + len, len as usize);
        apply(&copy, &[(fat, second)]);
        fat_assert_files(&copy, &tree, d.path());
    }

    // One FAT only, zeroed: its media descriptor entry is gone.
    mkfs_image(&img, 16 * MIB, "mkfs.fat", &["-F", "16", "-f", "1"]);
    run(cmd("mcopy")
        .args(["-s", "-i"])
        .arg(&img)
        .arg(&tree)
        .arg("::"));
    expect_mapped(&img);
    let (fat, len, _) = fat_geometry(&img);
    apply(&img, &[(fat, vec![0; len as usize])]);
    expect_whole(&img, &["fat16", "media"], d.path());

    // FAT32 whose root directory cluster is free in both FATs.
    mkfs_image(&img, 64 * MIB, "mkfs.fat", &["-F", "32"]);
    run(cmd("mcopy")
        .args(["-s", "-i"])
        .arg(&img)
        .arg(&tree)
        .arg("::"));
    let (fat, len, _) = fat_geometry(&img);
    let bs = read_range(&img, 0, 512);
    let root = u64::from(u32::from_le_bytes([bs[44], bs[45], bs[46], bs[47]]));
    apply(
        &img,
        &[
            (fat + 4 * root, vec![0; 4]),
            (fat + len + 4 * root, vec![0; 4]),
        ],
    );
    expect_whole(&img, &["fat32", "root directory"], d.path());
}

/// The manifest carries the reason as an optional `whole` field of the partition: written when
/// there is one, absent otherwise, and manifests from older writers (without it) still read.
#[test]
fn whole_reason_is_an_optional_manifest_field() {
    use snapshot::ptable::Partition;
    let old = r#"{"number": 1, "offset": 1048576, "size": 4096}"#;
    let p: Partition = serde_json::from_str(old).unwrap();
    assert_eq!(p.whole, None);
    assert!(!serde_json::to_string(&p).unwrap().contains("whole"));
    let p = Partition {
        whole: Some("ntfs: $Bitmap marks cluster 0 free".into()),
        ..p
    };
    let v: serde_json::Value = serde_json::to_value(&p).unwrap();
    assert_eq!(v["whole"], "ntfs: $Bitmap marks cluster 0 free");
    let back: Partition = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}
