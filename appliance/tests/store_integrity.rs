//! Store integrity under real-world conditions (issue 8): multi-TiB disks over HTTP, `latest`
//! that follows commits, concurrent writers of one host, damaged chunks healed, and a rolled-back
//! `latest` caught.

mod common;

use bmr_tests::util::Cmd;
use common::http::Server;
use common::{read_back, Env};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

/// Deterministic bytes (xorshift) that zstd cannot shrink.
fn noise(seed: u64, len: usize) -> Vec<u8> {
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
fn write_swap(f: &File, offset: u64, len: u64) {
    let mut page = vec![0u8; 4096];
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&((len / 4096 - 1) as u32).to_le_bytes());
    page[4086..].copy_from_slice(b"SWAPSPACE2");
    f.write_all_at(&page, offset).unwrap();
}

/// A sparse `size`-byte disk with a GPT: a small ext4 with files at the start, raw data (an
/// unknown partition type, kept whole) in the middle and at the end, swap in between. Returns
/// the regions that hold data, as (offset, len).
fn big_sparse_disk(env: &Env, path: &Path, size: u64) -> Vec<(u64, u64)> {
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
    let files = env.path("ext-files");
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

fn same_regions(a: &Path, b: &Path, regions: &[(u64, u64)]) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    for &(off, len) in regions {
        let (mut x, mut y) = (vec![0u8; len as usize], vec![0u8; len as usize]);
        fa.read_exact_at(&mut x, off).unwrap();
        fb.read_exact_at(&mut y, off).unwrap();
        assert!(x == y, "{len} bytes at {off} differ after the restore");
    }
}

/// Peak resident memory of this process (the test's reader), in MiB.
fn peak_rss_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Issue 8 item 1: a 4 TiB disk's index (32 MiB) used to be cut at 8 MiB by the HTTP reader
/// ("index hashes to ..., the manifest says ..."). Ingest, serve and read back over HTTP.
#[test]
fn four_tib_sparse_disk_restores_over_http() {
    let env = Env::new("four_tib_sparse_disk_restores_over_http");
    let img = env.path("big.img");
    let size = 4 * TIB;
    let regions = big_sparse_disk(&env, &img, size);
    let t = Instant::now();
    let out = env.ingest_ok("big", "s1", &[&img]);
    let ingest_secs = t.elapsed().as_secs_f64();
    assert!(out.stdout.contains("committed"), "{}", out.describe());
    let srv = Server::start(&env.store, &[]);
    let t = Instant::now();
    let restored = read_back(
        &srv.url("/store"),
        &env.pubkey(),
        "big",
        "s1",
        &env.path("out"),
    )
    .unwrap_or_else(|e| panic!("reading the 4 TiB snapshot over HTTP: {e:#}"));
    let read_secs = t.elapsed().as_secs_f64();
    assert_eq!(std::fs::metadata(&restored[0]).unwrap().len(), size);
    same_regions(&img, &restored[0], &regions);
    let rss = peak_rss_mib();
    eprintln!(
        "4 TiB sparse disk: ingest {ingest_secs:.1}s, read back over HTTP {read_secs:.1}s, \
         test process peak RSS {rss} MiB"
    );
    assert!(rss < 1024, "peak RSS {rss} MiB");
    assert!(
        ingest_secs + read_secs < Duration::from_secs(240).as_secs_f64(),
        "too slow"
    );
}
