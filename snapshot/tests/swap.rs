//! Linux swap: only the header page is used; blkid agrees on UUID and label, also on a copy
//! that holds nothing else.

mod common;

use common::*;
use snapshot::fs::{Found, FsKind};

#[test]
fn swap_header_only() {
    let d = tmp();
    let img = d.path().join("swap.img");
    mkfs_image(
        &img,
        64 * MIB,
        "mkswap",
        &["-L", "swappy", "-U", "0d6a1c2e-1111-4222-8333-444455556666"],
    );
    // Some junk in the swap area: it must not be kept.
    apply(&img, &[(10 * MIB, vec![0xAB; 4096])]);
    let p = known_at(&img, 0, 64 * MIB);
    assert_eq!(p.fs.kind, FsKind::Swap);
    assert_eq!(
        p.fs.uuid.as_deref(),
        Some("0d6a1c2e-1111-4222-8333-444455556666")
    );
    assert_eq!(p.fs.label.as_deref(), Some("swappy"));
    assert_eq!(p.used.ranges(), &[(0, 4096)]);
    assert_eq!(p.fs.size, 64 * MIB);
    assert_eq!(p.fs.used, 4096);
    let id = blkid(&img);
    let copy = used_copy(&img, &p, d.path());
    let id2 = blkid(&copy);
    for k in ["TYPE", "UUID", "LABEL"] {
        assert_eq!(id.get(k), id2.get(k), "{k}");
    }
    assert_eq!(id2.get("TYPE").map(String::as_str), Some("swap"));
    assert_eq!(read_range(&copy, 10 * MIB, 4), vec![0; 4]);

    // Swap smaller than its partition: the tail is kept.
    sparse(&img, 64 * MIB);
    run(cmd("mkswap").arg(&img).arg("16384"));
    let p = known_at(&img, 0, 64 * MIB);
    assert_eq!(p.fs.size, 16 * MIB);
    assert_eq!(p.used.ranges(), &[(0, 4096), (16 * MIB, 64 * MIB)]);
}

#[test]
fn swap_damage() {
    let d = tmp();
    let img = d.path().join("swap.img");
    mkfs_image(&img, 64 * MIB, "mkswap", &[]);
    expect_damaged(&img, 32 * MIB, &["past the end"]);
    apply(&img, &[(1024, 7u32.to_le_bytes().to_vec())]);
    expect_damaged(&img, 64 * MIB, &["version 7"]);
    apply(&img, &[(4086, vec![0; 10])]);
    assert!(matches!(probe_at(&img, 0, 64 * MIB), Found::Unknown));
    for n in [0usize, 100, 4095, 4096, 5000] {
        let b = vec![0u8; n];
        assert!(snapshot::fs::swap::probe(&Bytes(&b), 0, n as u64).is_none());
    }
}
