//! Multi-TiB sparse disks for the big-disk tests: a GPT with a small ext4 at the start, raw data
//! in the middle and at the end, and swap partitions (one stored page each) spanning the rest.

use crate::util::Cmd;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Deterministic bytes (xorshift) that zstd cannot shrink.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A Linux swap header (v1) at `offset` for a partition of `len` bytes: the used-block map keeps
/// its first page only.
pub fn write_swap(f: &File, offset: u64, len: u64) {
    let mut page = vec![0u8; 4096];
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&((len / 4096 - 1) as u32).to_le_bytes());
    page[4086..].copy_from_slice(b"SWAPSPACE2");
    f.write_all_at(&page, offset).unwrap();
}

/// A sparse `size`-byte disk with a GPT: a small ext4 with files at the start, raw data (an
/// unknown partition type, kept whole) in the middle and at the end, swap in between. Returns
/// the regions that hold data, as (offset, len). `scratch` holds the ext4's files.
pub fn big_sparse_disk(scratch: &Path, path: &Path, size: u64) -> Vec<(u64, u64)> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let mid = size / 2;
    let end = size - 64 * MIB;
    let p = |n: u32, first: u64, last: u64, ty: &str| {
        vec![
            format!("--new={n}:{}:{}", first / 512, last / 512 - 1),
            format!("--typecode={n}:{ty}"),
        ]
    };
    let mut args = vec!["--clear".to_string()];
    args.extend(p(1, MIB, 65 * MIB, "8300"));
    args.extend(p(2, 65 * MIB, mid, "8200"));
    args.extend(p(3, mid, mid + 8 * MIB, "8301"));
    args.extend(p(4, mid + 8 * MIB, end, "8200"));
    args.extend(p(5, end, end + 8 * MIB, "8301"));
    Cmd::new("sgdisk").args(&args).arg(path).ok();
    let files = scratch.to_path_buf();
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("hello.txt"), noise(1, 3 << 20)).unwrap();
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&files)
        .args(["-E", &format!("offset={MIB}")])
        .arg(path)
        .arg("16384")
        .ok();
    let f = File::options().write(true).open(path).unwrap();
    write_swap(&f, 65 * MIB, mid - 65 * MIB);
    write_swap(&f, mid + 8 * MIB, end - mid - 8 * MIB);
    f.write_all_at(&noise(2, 8 * MIB as usize), mid).unwrap();
    f.write_all_at(&noise(3, 8 * MIB as usize), end).unwrap();
    f.sync_all().unwrap();
    vec![
        (0, 65 * MIB),
        (65 * MIB, 4096),
        (mid, 8 * MIB + 4096),
        (end, 8 * MIB),
        (size - MIB, MIB),
    ]
}

pub fn same_regions(a: &Path, b: &Path, regions: &[(u64, u64)]) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    for &(off, len) in regions {
        let (mut x, mut y) = (vec![0u8; len as usize], vec![0u8; len as usize]);
        fa.read_exact_at(&mut x, off).unwrap();
        fb.read_exact_at(&mut y, off).unwrap();
        assert!(x == y, "{len} bytes at {off} differ after the restore");
    }
}
