//! XFS used-block maps against xfsprogs on real `mkfs.xfs` images filled through the kernel's
//! XFS (a loop mount): free space equals `xfs_db`'s (per AG and in total), an image holding only
//! the used ranges passes `xfs_repair -n`, and, mounted read-only, every file reads back the same.

mod common;

use common::*;
use snapshot::fs::{Found, FsKind, Probe};
use std::path::Path;

/// A mount point that is unmounted on drop (before the loop device's own drop detaches it).
struct Mount(std::path::PathBuf, #[allow(dead_code)] Loop);

impl Mount {
    fn new(img: &Path, at: &Path, opts: &str) -> Mount {
        let lo = Loop::new(img, 512);
        fresh_dir(at);
        run(cmd("mount")
            .args(["-t", "xfs", "-o", opts])
            .arg(&lo.0)
            .arg(at));
        Mount(at.to_path_buf(), lo)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new(tool("umount"))
            .arg(&self.0)
            .status();
    }
}

/// A sparse image formatted by mkfs.xfs. mkfs.xfs refuses filesystems under 300 MB unless it
/// runs under xfstests (`TEST_DIR`, `TEST_DEV` and `QA_CHECK_FS` set); small images keep these tests quick.
fn mkxfs(img: &Path, size: u64, args: &[&str]) {
    sparse(img, size);
    run(cmd("mkfs.xfs")
        .envs([
            ("TEST_DIR", "/tmp"),
            ("TEST_DEV", "/dev/null"),
            ("QA_CHECK_FS", "1"),
        ])
        .args(args)
        .arg(img));
}

fn xfs_db(img: &Path, cmds: &[&str]) -> String {
    let mut c = cmd("xfs_db");
    c.arg("-r");
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg(img))
}

fn field(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{out}"))
}

/// Copy `tree` into the filesystem of `img` (mounted read-write), then delete every other small
/// file when `holes`, to fragment free space.
fn fill(img: &Path, tree: &Path, work: &Path, holes: bool) {
    let m = Mount::new(img, &work.join("mnt"), "rw");
    run(cmd("cp")
        .arg("-a")
        .arg(format!("{}/.", tree.display()))
        .arg(&m.0));
    if holes {
        // Allocate first (delayed allocation would never place files deleted before writeback).
        run(cmd("sync").arg("-f").arg(&m.0));
        for (i, f) in list_files(tree).iter().enumerate() {
            if i % 2 == 1 && f.to_string_lossy().starts_with("small-") {
                std::fs::remove_file(tree.join(f)).unwrap();
                std::fs::remove_file(m.0.join(f)).unwrap();
            }
        }
    }
    drop(m);
}

/// Checks `img` against xfsprogs and returns our probe; `height` is the bnobt height of AG 0
/// the case expects at least.
fn check(img: &Path, tree: Option<&Path>, work: &Path, label: Option<&str>, height: u64) -> Probe {
    let p = known(img);
    assert_eq!(p.fs.kind, FsKind::Xfs);
    let id = blkid(img);
    assert_eq!(p.fs.uuid.as_deref(), id.get("UUID").map(String::as_str));
    assert_eq!(p.fs.label.as_deref(), label);
    let sb = xfs_db(img, &["sb 0", "print blocksize dblocks agcount"]);
    let bs = field(&sb, "blocksize");
    assert_eq!(u64::from(p.fs.block_size), bs);
    assert_eq!(p.fs.size, field(&sb, "dblocks") * bs);
    assert_eq!(p.fs.used, p.used.len());
    let agblocks = field(&xfs_db(img, &["sb 0", "print agblocks"]), "agblocks");
    // Per AG: our free blocks = AGF freeblks; xfs_db's freesp also counts the AGFL blocks.
    let mut fl_total = 0;
    for ag in 0..field(&sb, "agcount") {
        let agf = xfs_db(
            img,
            &[
                &format!("agf {ag}"),
                "print freeblks flcount length bnolevel",
            ],
        );
        let (start, len) = (ag * agblocks * bs, field(&agf, "length") * bs);
        let ours: u64 = p.used.within(start, start + len).map(|(a, b)| b - a).sum();
        assert_eq!(
            (len - ours) / bs,
            field(&agf, "freeblks"),
            "AG {ag} free blocks vs xfs_db"
        );
        fl_total += field(&agf, "flcount");
        if ag == 0 {
            assert!(
                field(&agf, "bnolevel") >= height,
                "AG 0 bnobt height {} (the case wants {height})",
                field(&agf, "bnolevel")
            );
        }
    }
    let freesp = xfs_db(img, &["freesp -s"]);
    let total_free: u64 = freesp
        .lines()
        .find_map(|l| l.strip_prefix("total free blocks "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("freesp -s:\n{freesp}"));
    assert_eq!(
        p.fs.size - p.used.within(0, p.fs.size).map(|(a, b)| b - a).sum::<u64>(),
        (total_free - fl_total) * bs,
        "free bytes vs xfs_db freesp"
    );

    // No data lost: the used ranges alone make a clean filesystem with every file intact.
    let copy = used_copy(img, &p, work);
    // On a loop device: on an image file xfs_repair asks the host filesystem for its geometry,
    // which tmpfs cannot answer.
    let lo = Loop::new(&copy, 512);
    run(cmd("xfs_repair").arg("-n").arg(&lo.0));
    drop(lo);
    if let Some(tree) = tree {
        let m = Mount::new(&copy, &work.join("ro"), "ro,norecovery");
        assert_same_files(tree, &m.0, img.display());
        drop(m);
    }
    p
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn v5_filled_and_fragmented() {
    let (d, tree) = tmp_with_tree(6);
    let img = d.path().join("xfs.img");
    mkxfs(&img, 300 * MIB, &["-q", "-L", "data"]);
    fill(&img, &tree, d.path(), true);
    check(&img, Some(&tree), d.path(), Some("data"), 1);
}

/// Enough small files with every other deleted that AG 0's bnobt has more than one level (a 1 KiB
/// block holds at most 121 records in a v5 bnobt leaf).
#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn v5_multilevel_bnobt() {
    let d = tmp();
    let tree = d.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for i in 0..3000u64 {
        std::fs::write(
            tree.join(format!("small-{i:05}")),
            pseudo_random(i + 9, 1500),
        )
        .unwrap();
    }
    let img = d.path().join("xfs.img");
    mkxfs(
        &img,
        64 * MIB,
        &["-q", "-b", "size=1024", "-d", "agcount=2", "-l", "size=4m"],
    );
    fill(&img, &tree, d.path(), true);
    check(&img, Some(&tree), d.path(), None, 2);
}

/// V4 (no CRCs): kernels built without `CONFIG_XFS_SUPPORT_V4` (this host's) cannot mount it,
/// so the image is checked empty, against xfs_db and xfs_repair only.
#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn v4_empty() {
    let d = tmp();
    let img = d.path().join("xfs.img");
    mkxfs(&img, 64 * MIB, &["-q", "-m", "crc=0", "-L", "old"]);
    check(&img, None, d.path(), Some("old"), 1);
}

fn agf_offset(img: &Path, ag: u64) -> u64 {
    let sb = xfs_db(img, &["sb 0", "print agblocks blocksize sectsize"]);
    ag * field(&sb, "agblocks") * field(&sb, "blocksize") + field(&sb, "sectsize")
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn damaged_freeblks_and_bnobt_block() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("xfs.img");
    mkxfs(&img, 64 * MIB, &["-q"]);
    fill(&img, &tree, d.path(), true);
    let len = std::fs::metadata(&img).unwrap().len();
    let good = std::fs::read(&img).unwrap();

    // AGF 1 freeblks one less.
    let at = agf_offset(&img, 1) + 52;
    let v = u32::from_be_bytes(read_range(&img, at, 4).try_into().unwrap());
    apply(&img, &[(at, (v - 1).to_be_bytes().to_vec())]);
    expect_damaged(
        &img,
        len,
        &["XFS", "AG 1", "AGF says", &(v - 1).to_string()],
    );

    // AG 0's bnobt root block: magic destroyed.
    std::fs::write(&img, &good).unwrap();
    let agf = xfs_db(&img, &["agf 0", "print bnoroot"]);
    let bs = field(&xfs_db(&img, &["sb 0", "print blocksize"]), "blocksize");
    let root = field(&agf, "bnoroot");
    apply(&img, &[(root * bs, b"JUNK".to_vec())]);
    expect_damaged(
        &img,
        len,
        &["XFS", "AG 0", "free-space btree block", "magic"],
    );

    // A record count past the block's capacity must not panic or allocate wildly.
    std::fs::write(&img, &good).unwrap();
    apply(&img, &[(root * bs + 6, vec![0xff, 0xff])]);
    expect_damaged(&img, len, &["records"]);

    // The superblock counter off by one.
    std::fs::write(&img, &good).unwrap();
    let fd = u64::from_be_bytes(read_range(&img, 144, 8).try_into().unwrap());
    apply(&img, &[(144, (fd + 1).to_be_bytes().to_vec())]);
    expect_damaged(&img, len, &["superblock counts"]);

    // Truncated image.
    std::fs::write(&img, &good).unwrap();
    match probe_at(&img, 0, len / 2) {
        Found::Damaged { kind, reason } => {
            assert_eq!(kind, FsKind::Xfs);
            assert!(reason.contains("truncated"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bit_flips_never_panic() {
    let d = tmp();
    let img = d.path().join("xfs.img");
    mkxfs(&img, 32 * MIB, &["-q", "-b", "size=1024"]);
    // The metadata lives in the first blocks of each AG: flip in the first 64 KiB.
    let base = std::fs::read(&img).unwrap();
    let rnd = pseudo_random(5, 4096);
    flip_bits(&base, &rnd, 300, 3, |i| i % (64 << 10), snapshot::fs::probe);
}

/// A filesystem shut down without flushing its log (as a crash or a crash-consistent snapshot of
/// a running system leaves it) is copied whole, naming the log; once mounted and unmounted again
/// (the kernel replays the log) it is mapped.
#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn dirty_log_is_copied_whole() {
    let (d, tree) = tmp_with_tree(1);
    let img = d.path().join("xfs.img");
    mkxfs(&img, 300 * MIB, &["-q"]);
    {
        let m = Mount::new(&img, &d.path().join("mnt"), "rw");
        run(cmd("cp")
            .arg("-a")
            .arg(format!("{}/.", tree.display()))
            .arg(&m.0));
        run(cmd("sync").arg("-f").arg(&m.0));
        std::fs::write(m.0.join("after-sync"), pseudo_random(1, 1 << 20)).unwrap();
        // Shut down without flushing the log: what a crash leaves.
        run(cmd("xfs_io").args(["-x", "-c", "shutdown"]).arg(&m.0));
    }
    let len = std::fs::metadata(&img).unwrap().len();
    expect_damaged(&img, len, &["log is not clean"]);
    drop(Mount::new(&img, &d.path().join("mnt"), "rw"));
    let p = known(&img);
    assert_eq!(p.fs.kind, FsKind::Xfs);
}

/// The checked-in fixture `xfs-v5-filled` (made by `scripts/make-fixtures` on a loop mount, as
/// root) against what the real tools said of it when it was made: our free blocks equal
/// `xfs_db`'s AGF counts, and every extent `xfs_io fiemap` gave for a file lies in our used
/// ranges and holds that file's bytes. Runs in the fast tier: no root, no xfsprogs.
#[test]
fn fixture_filled_image_matches_the_real_tools() {
    use sha2::{Digest as _, Sha256};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let zst = std::fs::read(dir.join("xfs-v5-filled.img.zst")).unwrap();
    let image = zstd::stream::decode_all(&zst[..]).unwrap();
    let facts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("xfs-v5-filled.json")).unwrap()).unwrap();
    let num = |v: &serde_json::Value| v.as_u64().unwrap();
    let d = tmp();
    let img = d.path().join("xfs.img");
    std::fs::write(&img, &image).unwrap();
    let p = known(&img);
    assert_eq!(p.fs.kind, FsKind::Xfs);
    assert_eq!(p.fs.label.as_deref(), facts["label"].as_str());
    assert_eq!(p.fs.uuid.as_deref(), facts["uuid"].as_str());
    let bs = num(&facts["block_size"]);
    assert_eq!(u64::from(p.fs.block_size), bs);
    assert_eq!(p.fs.size, num(&facts["dblocks"]) * bs);
    let agblocks = num(&facts["agblocks"]);
    for (ag, f) in facts["ags"].as_array().unwrap().iter().enumerate() {
        let (start, len) = (ag as u64 * agblocks * bs, num(&f["length"]) * bs);
        let ours: u64 = p.used.within(start, start + len).map(|(a, b)| b - a).sum();
        assert_eq!(
            (len - ours) / bs,
            num(&f["freeblks"]),
            "AG {ag} free blocks vs xfs_db"
        );
    }
    let files = facts["files"].as_array().unwrap();
    assert!(files.len() > 300, "{} files", files.len());
    for f in files {
        let path = f["path"].as_str().unwrap();
        let size = num(&f["size"]) as usize;
        let mut content = vec![0u8; size];
        for e in f["extents"].as_array().unwrap() {
            let (phys, len, logical) = (num(&e[0]), num(&e[1]), num(&e[2]));
            let covered: u64 = p.used.within(phys, phys + len).map(|(a, b)| b - a).sum();
            assert_eq!(
                covered, len,
                "{path}: extent at {phys} not all in the used ranges"
            );
            let n = (len as usize).min(size.saturating_sub(logical as usize));
            content[logical as usize..logical as usize + n]
                .copy_from_slice(&image[phys as usize..phys as usize + n]);
        }
        let sha = format!("{:x}", Sha256::digest(&content));
        assert_eq!(
            sha,
            f["sha256"].as_str().unwrap(),
            "{path}: bytes at its extents"
        );
    }
}

/// Bit flips in the metadata of the filled fixture (its B+trees have records, unlike an empty
/// filesystem's), at the start of either AG: never a panic. Fast tier.
#[test]
fn fixture_bit_flips_never_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let zst = std::fs::read(dir.join("xfs-v5-filled.img.zst")).unwrap();
    let base = zstd::stream::decode_all(&zst[..]).unwrap();
    let rnd = pseudo_random(11, 4096);
    let ag1 = 32 << 20;
    let spot = |i: usize| (i % 2) * ag1 + (i / 2) % (64 << 10);
    flip_bits(&base, &rnd, 150, 3, spot, snapshot::fs::probe);
}
