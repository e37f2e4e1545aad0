//! ext2/3/4 used-block maps against e2fsprogs: dumpe2fs's free blocks are exactly the complement
//! of our used blocks, and an image holding only the used blocks passes e2fsck and has the same
//! files.

mod common;

use common::*;
use snapshot::fs::{self, Found, FsKind, Probe};
use snapshot::DiskSource;
use std::path::Path;
use std::time::Instant;

struct Dump {
    block_size: u64,
    cluster_ratio: u64,
    blocks: u64,
    free: Vec<(u64, u64)>,
}

fn dumpe2fs(img: &Path) -> Dump {
    let out = run(cmd("dumpe2fs").arg(img));
    let field = |name: &str| -> Option<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().parse().unwrap())
    };
    let block_size = field("Block size:").unwrap();
    let cluster_ratio = field("Cluster size:").map_or(1, |c| c / block_size);
    let blocks = field("Block count:").unwrap();
    let mut free = Vec::new();
    for l in out.lines() {
        if let Some(r) = l.trim().strip_prefix("Free blocks: ") {
            for (a, b) in parse_ranges(r) {
                // With bigalloc, dumpe2fs prints each free run as first block of first cluster to
                // first block of last cluster.
                free.push((a, b - 1 + cluster_ratio));
            }
        }
    }
    Dump {
        block_size,
        cluster_ratio,
        blocks,
        free,
    }
}

/// Our used blocks, in block units, clipped to the filesystem.
fn used_blocks(p: &Probe, bs: u64, blocks: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in p.used.ranges() {
        let (a, b) = (a / bs, b.div_ceil(bs).min(blocks));
        if a >= b {
            continue;
        }
        match v.last_mut() {
            Some(l) if l.1 >= a => l.1 = l.1.max(b),
            _ => v.push((a, b)),
        }
    }
    v
}

/// Check one image: the map against dumpe2fs, then a copy of only the used blocks against
/// e2fsck and the original files.
fn check(img: &Path, tree: &Path, kind: FsKind, work: &Path) -> Probe {
    let p = known(img);
    assert_eq!(p.fs.kind, kind, "{}", img.display());
    let id = blkid(img);
    assert_eq!(p.fs.uuid.as_deref(), id.get("UUID").map(String::as_str));
    assert_eq!(p.fs.label.as_deref(), id.get("LABEL").map(String::as_str));
    let d = dumpe2fs(img);
    assert_eq!(u64::from(p.fs.block_size), d.block_size);
    assert_eq!(p.fs.size, d.blocks * d.block_size);
    let expect = complement(&d.free, d.blocks);
    let got = used_blocks(&p, d.block_size, d.blocks);
    assert_eq!(
        got,
        expect,
        "{}: used blocks differ from the complement of dumpe2fs's free blocks (cluster ratio {})",
        img.display(),
        d.cluster_ratio
    );
    assert_eq!(p.fs.used, p.used.len());

    let copy = used_copy(img, &p, work);
    run(cmd("e2fsck").args(["-fn"]).arg(&copy));
    let dump = work.join("dump");
    fresh_dir(&dump);
    run(cmd("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dump.display()))
        .arg(&copy));
    assert_same_files(tree, &dump, img.display());
    // debugfs cat agrees too (a second reader).
    let cat = std::process::Command::new(tool("debugfs"))
        .args(["-R", "cat /sub/deeper/deepest/hello.txt"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(cat.stdout, b"hello, world\n");
    p
}

fn mkfs(prog: &str, img: &Path, size: u64, args: &[&str], tree: &Path) {
    sparse(img, size);
    run(cmd(prog)
        .args(["-q", "-F", "-L", "testvol", "-d"])
        .arg(tree)
        .args(args)
        .arg(img));
}

#[test]
fn ext_variants_match_dumpe2fs_and_copy_cleanly() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("fs.img");
    let cases: &[(&str, u64, &[&str], FsKind)] = &[
        ("mkfs.ext4", 64 * MIB, &[], FsKind::Ext4),
        ("mkfs.ext4", 96 * MIB, &["-b", "4096"], FsKind::Ext4),
        ("mkfs.ext4", 64 * MIB, &["-O", "^flex_bg"], FsKind::Ext4),
        (
            "mkfs.ext4",
            64 * MIB,
            &["-O", "64bit", "-b", "1024", "-g", "1024"],
            FsKind::Ext4,
        ),
        (
            "mkfs.ext4",
            64 * MIB,
            &["-O", "^64bit,^metadata_csum,uninit_bg"],
            FsKind::Ext4,
        ),
        (
            "mkfs.ext4",
            64 * MIB,
            &["-O", "meta_bg,^resize_inode", "-g", "256", "-b", "1024"],
            FsKind::Ext4,
        ),
        (
            "mkfs.ext4",
            64 * MIB,
            &["-O", "sparse_super2", "-b", "4096", "-g", "2048"],
            FsKind::Ext4,
        ),
        (
            "mkfs.ext4",
            64 * MIB,
            &["-O", "^sparse_super,^resize_inode", "-g", "2048"],
            FsKind::Ext4,
        ),
        (
            "mkfs.ext4",
            128 * MIB,
            &["-b", "4096", "-O", "bigalloc", "-C", "16384"],
            FsKind::Ext4,
        ),
        (
            "mkfs.ext4",
            64 * MIB,
            &["-I", "128", "-b", "2048"],
            FsKind::Ext4,
        ),
        ("mkfs.ext2", 64 * MIB, &[], FsKind::Ext2),
        (
            "mkfs.ext2",
            64 * MIB,
            &["-b", "4096", "-O", "^sparse_super,^resize_inode"],
            FsKind::Ext2,
        ),
        ("mkfs.ext3", 64 * MIB, &[], FsKind::Ext3),
        (
            "mkfs.ext3",
            64 * MIB + 3 * 1024,
            &["-b", "1024"],
            FsKind::Ext3,
        ),
    ];
    for (prog, size, args, kind) in cases {
        mkfs(prog, &img, *size, args, &tree);
        let p = check(&img, &tree, *kind, d.path());
        eprintln!("{prog} {args:?}: {} of {} bytes used", p.fs.used, p.fs.size);
    }
}

#[test]
fn ext_inside_a_partition_with_slack() {
    let (d, tree) = tmp_with_tree(1);
    let fsimg = d.path().join("fs.img");
    mkfs("mkfs.ext4", &fsimg, 40 * MIB, &[], &tree);
    // Put it 1 MiB into a disk, in a 48 MiB partition: 8 MiB of slack past the filesystem.
    let disk = d.path().join("disk.img");
    let (reference, p) = probe_in_partition(&fsimg, &disk, 64 * MIB, 48 * MIB);
    assert_eq!(p.fs.size, 40 * MIB);
    assert_used_plus(&p, &reference, (40 * MIB, 48 * MIB), "slack is used");
}

#[test]
fn ext4_4gib_map_is_fast() {
    let (d, tree) = tmp_with_tree(3);
    let img = d.path().join("big.img");
    mkfs("mkfs.ext4", &img, 4096 * MIB, &[], &tree);
    let dev = DiskSource::open(&img).unwrap();
    let t = Instant::now();
    let found = fs::probe(&dev, 0, 4096 * MIB);
    let took = t.elapsed();
    let Found::Known(p) = found else {
        panic!("{found:?}")
    };
    eprintln!("4 GiB ext4 map: {took:?}, {} ranges", p.used.ranges().len());
    assert!(took.as_millis() < 500, "mapping took {took:?}");
    let dd = dumpe2fs(&img);
    assert_eq!(
        used_blocks(&p, dd.block_size, dd.blocks),
        complement(&dd.free, dd.blocks)
    );

    // Worst case: no uninitialised groups and every bitmap fragmented (random bits ORed in).
    mkfs(
        "mkfs.ext4",
        &img,
        4096 * MIB,
        &["-O", "^metadata_csum,^uninit_bg"],
        &tree,
    );
    let out = run(cmd("dumpe2fs").arg(&img));
    let bitmaps: Vec<u64> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Block bitmap at "))
        .map(|r| r.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(bitmaps.len(), 32);
    // The groups' and the superblock's free counts follow, as for a real fragmented filesystem
    // (counts that disagree with the bitmaps are damage).
    let mut script = String::new();
    let mut total_free = 0;
    for (i, b) in bitmaps.iter().enumerate() {
        let mut cur = read_range(&img, b * 4096, 4096);
        for (c, r) in cur.iter_mut().zip(pseudo_random(i as u64 + 100, 4096)) {
            *c |= r & (r >> 1);
        }
        let free = 32768 - cur.iter().map(|b| u64::from(b.count_ones())).sum::<u64>();
        total_free += free;
        script.push_str(&format!("set_bg {i} free_blocks_count {free}\n"));
        apply(&img, &[(b * 4096, cur)]);
    }
    script.push_str(&format!("ssv free_blocks_count {total_free}\n"));
    let script_file = d.path().join("counts");
    std::fs::write(&script_file, script).unwrap();
    run(cmd("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_file)
        .arg(&img));
    let dev = DiskSource::open(&img).unwrap();
    let t = Instant::now();
    let found = fs::probe(&dev, 0, 4096 * MIB);
    let took = t.elapsed();
    let Found::Known(p) = found else {
        panic!("{found:?}")
    };
    eprintln!(
        "4 GiB ext4 map, fragmented: {took:?}, {} ranges",
        p.used.ranges().len()
    );
    assert!(p.used.ranges().len() > 100_000);
    assert!(took.as_millis() < 1000, "mapping took {took:?}");
    let dd = dumpe2fs(&img);
    assert_eq!(
        used_blocks(&p, dd.block_size, dd.blocks),
        complement(&dd.free, dd.blocks)
    );
}

#[test]
fn ext_damage_gives_errors_not_panics() {
    let (d, tree) = tmp_with_tree(1);
    // Checksums first (the default metadata_csum): the kernel refuses these, and so do we.
    let img = d.path().join("work.img");
    let len = 64 * MIB;
    mkfs("mkfs.ext4", &img, len, &["-b", "4096"], &tree);
    let csummed = std::fs::read(&img).unwrap();
    let restore = || std::fs::write(&img, &csummed).unwrap();
    apply(&img, &[(1024 + 0x2C, vec![0x55])]); // s_mtime: harmless but checksummed
    expect_damaged(&img, len, &["superblock checksum mismatch"]);
    restore();
    apply(&img, &[(4096 + 0x12, vec![0x02])]); // group 0 flags: BLOCK_UNINIT
    expect_damaged(&img, len, &["group descriptor 0", "checksum mismatch"]);
    restore();
    let g0 = &groups(&img)[0];
    apply(&img, &[(g0.bitmap * 4096 + 100, vec![0x00])]);
    expect_damaged(&img, len, &["block bitmap of group 0", "checksum mismatch"]);
    // The same damage to a gdt_csum (uninit_bg) filesystem.
    mkfs(
        "mkfs.ext4",
        &img,
        len,
        &["-b", "4096", "-O", "^metadata_csum,uninit_bg"],
        &tree,
    );
    apply(&img, &[(4096 + 0x12, vec![0x02])]);
    expect_damaged(&img, len, &["group descriptor 0", "checksum mismatch"]);

    // Damage is reported with the variant the superblock announces.
    for (prog, kind) in [("mkfs.ext2", FsKind::Ext2), ("mkfs.ext3", FsKind::Ext3)] {
        mkfs(prog, &img, len, &[], &tree);
        match probe_at(&img, 0, len / 2) {
            Found::Damaged { kind: k, .. } => assert_eq!(k, kind),
            o => panic!("{o:?}"),
        }
    }

    // Structure, without checksums in the way.
    let pristine = d.path().join("pristine.img");
    mkfs(
        "mkfs.ext4",
        &pristine,
        64 * MIB,
        &["-b", "4096", "-O", "^metadata_csum"],
        &tree,
    );
    let fresh = || std::fs::copy(&pristine, &img).unwrap();

    // Truncated image: the partition is shorter than the filesystem.
    fresh();
    expect_damaged(&img, 32 * MIB, &["superblock", "truncated"]);

    // Block count beyond the partition.
    fresh();
    apply(&img, &[(1024 + 4, (1u32 << 30).to_le_bytes().to_vec())]);
    expect_damaged(&img, len, &["superblock", "1073741824 blocks"]);

    // Nonsense block size.
    fresh();
    apply(&img, &[(1024 + 0x18, 9u32.to_le_bytes().to_vec())]);
    expect_damaged(&img, len, &["s_log_block_size"]);

    // Inode count that does not match the groups.
    fresh();
    apply(&img, &[(1024, 12345u32.to_le_bytes().to_vec())]);
    expect_damaged(&img, len, &["inodes"]);

    // A group descriptor pointing its block bitmap outside the filesystem.
    fresh();
    apply(&img, &[(4096, 0x7fff_fff0u32.to_le_bytes().to_vec())]);
    expect_damaged(&img, len, &["group descriptor 0", "block bitmap"]);

    // A journal that needs recovery but whose superblock is garbage.
    fresh();
    run(cmd("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&img));
    let jblock = journal_first_block(&img);
    apply(&img, &[(jblock * 4096, vec![0xAA; 64])]);
    expect_damaged(&img, len, &["journal", "superblock"]);

    // No magic: not ext.
    fresh();
    apply(&img, &[(1024 + 0x38, vec![0, 0])]);
    assert!(matches!(probe_at(&img, 0, len), Found::Unknown));

    // Random bit flips in the superblock and descriptors of a small filesystem never panic.
    let small = d.path().join("small.img");
    mkfs_image(
        &small,
        4 * MIB,
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "1024",
            "-g",
            "1024",
            "-O",
            "^metadata_csum",
        ],
    );
    let base = std::fs::read(&small).unwrap();
    let rnd = pseudo_random(5, 9000);
    // Superblock (1024..2048) and descriptors (2048..3072).
    flip_bits(&base, &rnd, 3000, 3, |h| 1024 + h % 2048, fs::ext::probe);
    // The same for the journal of a filesystem that needs recovery: its superblock, the first
    // transaction blocks and the journal inode.
    let script = d.path().join("jcmds");
    let bm = d.path().join("bm.bin");
    std::fs::write(&bm, vec![0xFFu8; 1024]).unwrap();
    std::fs::write(&script, format!("jo -c\njw -b 3 {}\njc\n", bm.display())).unwrap();
    run(cmd("debugfs").arg("-w").arg("-f").arg(&script).arg(&small));
    let base = std::fs::read(&small).unwrap();
    assert!(matches!(
        snapshot::fs::ext::probe(&Bytes(&base), 0, base.len() as u64),
        Some(Ok(_))
    ));
    let j0 = journal_first_block(&small) as usize * 1024;
    let itable: usize = run(cmd("debugfs").args(["-R", "imap <8>"]).arg(&small))
        .lines()
        .find_map(|l| l.trim().strip_prefix("located at block "))
        .and_then(|r| r.split(',').next())
        .unwrap()
        .parse::<usize>()
        .unwrap()
        * 1024;
    let spots: Vec<usize> = (j0..j0 + 4 * 1024).chain(itable..itable + 1024).collect();
    let spot = |h: usize| spots[h % spots.len()];
    flip_bits(&base, &rnd, 3000, 2, spot, fs::ext::probe);

    // Garbage with the magic.
    let mut g = pseudo_random(9, 4 * MIB as usize);
    g[1024 + 0x38] = 0x53;
    g[1024 + 0x39] = 0xEF;
    assert!(matches!(
        snapshot::fs::ext::probe(&Bytes(&g), 0, g.len() as u64),
        Some(Err(_))
    ));
}

/// Physical block of the journal inode's first block.
fn journal_first_block(img: &Path) -> u64 {
    let out = run(cmd("debugfs").args(["-R", "bmap <8> 0"]).arg(img));
    out.trim().parse().unwrap()
}

struct GroupInfo {
    first: u64,
    bitmap: u64,
    block_uninit: bool,
    /// Largest free range.
    free: Option<(u64, u64)>,
}

/// Every group's first block, block bitmap location, flags and largest free range (dumpe2fs).
fn groups(img: &Path) -> Vec<GroupInfo> {
    let out = run(cmd("dumpe2fs").arg(img));
    let mut v: Vec<GroupInfo> = Vec::new();
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("Group ") {
            if let Some((_, r)) = rest.split_once("(Blocks ") {
                v.push(GroupInfo {
                    first: r.split('-').next().unwrap().parse().unwrap(),
                    bitmap: 0,
                    block_uninit: l.contains("BLOCK_UNINIT"),
                    free: None,
                });
            }
        } else if let Some(g) = v.last_mut() {
            if let Some(r) = l.trim().strip_prefix("Block bitmap at ") {
                g.bitmap = r.split(' ').next().unwrap().parse().unwrap();
            } else if let Some(r) = l.trim().strip_prefix("Free blocks: ") {
                g.free = parse_ranges(r).into_iter().max_by_key(|(a, b)| b - a);
            }
        }
    }
    v
}

/// Write `bitmap` as block `bb` in a journal transaction (debugfs, not replayed).
fn journal_write(img: &Path, work: &Path, jo: &str, bb: u64, bitmap: &[u8]) {
    let bm_file = work.join("bitmap.bin");
    std::fs::write(&bm_file, bitmap).unwrap();
    let script = work.join("cmds");
    std::fs::write(
        &script,
        format!("{jo}\njw -b {bb} {}\njc\n", bm_file.display()),
    )
    .unwrap();
    run(cmd("debugfs").arg("-w").arg("-f").arg(&script).arg(img));
    let h = run(cmd("dumpe2fs").arg("-h").arg(img));
    assert!(h.contains("needs_recovery"), "{h}");
}

fn set_bits(bitmap: &mut [u8], from: u64, to: u64) {
    for bit in from..to {
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
    }
}

/// A transaction in the journal (written by debugfs, not replayed) allocates blocks that the
/// on-disk bitmap still shows free, and ordered-mode data is already in them. The map must keep
/// them, and a copy of only the used blocks must replay to the same bitmap and data.
#[test]
fn ext_journal_needing_recovery_is_read() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("j.img");
    let cases: &[(&str, &[&str], &str)] = &[
        ("mkfs.ext4", &["-b", "4096", "-g", "4096"], "jo"),
        ("mkfs.ext4", &["-b", "4096", "-g", "4096"], "jo -c"),
        ("mkfs.ext4", &["-b", "1024", "-O", "^64bit"], "jo -c -v 2"),
        ("mkfs.ext3", &["-b", "4096", "-g", "4096"], "jo"),
        ("mkfs.ext3", &["-b", "1024"], "jo -c"),
    ];
    for (prog, args, jo) in cases {
        let what = format!("{prog} {args:?} {jo}");
        mkfs(prog, &img, 64 * MIB, args, &tree);
        let before = known(&img);
        let bs = u64::from(before.fs.block_size);
        // An initialised group with room: its bitmap is on disk; the journal has a newer one.
        let g = groups(&img)
            .into_iter()
            .find(|g| !g.block_uninit && g.free.is_some_and(|(a, b)| b - a >= 300))
            .unwrap_or_else(|| panic!("{what}: no initialised group with free space"));
        let (group_first, bb, (fa, fb)) = (g.first, g.bitmap, g.free.unwrap());
        let (a, b) = (fa + (fb - fa) / 3, fa + (fb - fa) / 3 + 100);
        let mut bitmap = read_range(&img, bb * bs, bs as usize);
        set_bits(&mut bitmap, a - group_first, b - group_first);
        let data = pseudo_random(a, ((b - a) * bs) as usize);
        apply(&img, &[(a * bs, data.clone())]);
        journal_write(&img, d.path(), jo, bb, &bitmap);

        let p = known(&img);
        assert!(
            p.used.within(a * bs, b * bs).eq([(a * bs, b * bs)]),
            "{what}: journaled allocation {a}..{b} not kept"
        );
        assert_used_plus(&p, &before, (a * bs, b * bs), &what);

        // Replay a copy holding only the used blocks: same bitmap, same data, files intact.
        let copy = used_copy(&img, &p, d.path());
        run(cmd("debugfs").args(["-w", "-R", "jr"]).arg(&copy));
        let h = run(cmd("dumpe2fs").arg("-h").arg(&copy));
        assert!(!h.contains("needs_recovery"), "{what}: {h}");
        assert!(read_range(&copy, bb * bs, bs as usize) == bitmap, "{what}");
        assert!(read_range(&copy, a * bs, data.len()) == data, "{what}");
        let tested = run(cmd("debugfs")
            .args(["-n", "-R", &format!("testb {a} {}", b - a)])
            .arg(&copy));
        assert_eq!(
            tested.matches("marked in use").count() as u64,
            b - a,
            "{what}: {tested}"
        );
        let dump = d.path().join("dump");
        fresh_dir(&dump);
        run(cmd("debugfs")
            .arg("-n")
            .arg("-R")
            .arg(format!("rdump / {}", dump.display()))
            .arg(&copy));
        assert_same_files(&tree, &dump, &what);
    }

    // An uninitialised group (no bitmap on disk) that the journal initialises.
    mkfs(
        "mkfs.ext4",
        &img,
        64 * MIB,
        &["-b", "4096", "-g", "4096"],
        &tree,
    );
    let before = known(&img);
    let gs = groups(&img);
    let gu = gs
        .iter()
        .rev()
        .find(|g| g.block_uninit)
        .expect("an uninitialised group");
    let (bb, first) = (gu.bitmap, gu.first);
    let mut bitmap = vec![0u8; 4096];
    for (s, e) in before.used.within(first * 4096, (first + 4096) * 4096) {
        set_bits(&mut bitmap, s / 4096 - first, e / 4096 - first);
    }
    set_bits(&mut bitmap, 1000, 1500);
    journal_write(&img, d.path(), "jo -c", bb, &bitmap);
    let p = known(&img);
    let journaled = ((first + 1000) * 4096, (first + 1500) * 4096);
    assert_used_plus(&p, &before, journaled, "journaled group initialisation");

    // needs_recovery without a journal: a clear error.
    mkfs(
        "mkfs.ext4",
        &img,
        64 * MIB,
        &["-b", "4096", "-O", "^has_journal"],
        &tree,
    );
    run(cmd("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&img));
    expect_damaged(&img, 64 * MIB, &["journal"]);
}
