//! Target safety through aliases (issue 8, item 6): a target is the same disk as something in use
//! or as another target when it shares a device number or an inode with it, whatever its path. A
//! hard link to a mounted loop device's backing file, a second loop device over that file, one
//! file named twice through a hard link and two loop devices over one file are all refused before
//! any write, with one line naming both paths. Needs root (loop devices, mount).

mod common;

use bmr_tests::util::Cmd;
use common::*;
use std::path::{Path, PathBuf};

/// A store with host `host`: `disks` raw disks of `size` bytes of a pattern (no table: nothing
/// to analyse, quick to ingest).
fn raw_snapshot(env: &Env, host: &str, disks: usize, size: u64) {
    let mut images = Vec::new();
    for k in 0..disks {
        let p = env.dir.join(format!("src{k}.raw"));
        let mut data = vec![0u8; size as usize];
        for (i, b) in data.iter_mut().enumerate().take(MIB as usize) {
            *b = (i * 7 + k) as u8;
        }
        std::fs::write(&p, &data).unwrap();
        images.push(p);
    }
    appliance()
        .args(["ingest", "--raw", "--host", host, "--store"])
        .arg(&env.store)
        .args(&images)
        .ok();
}

/// A 32 MiB ext4 image holding `keep.txt`, attached to a loop device and mounted read-only (the
/// kernel then writes nothing to it: any change is the restorer's).
fn mounted_image(env: &Env, name: &str) -> (PathBuf, LoopDev, Mount) {
    let file = env.file(&format!("{name}.img"), 32 * MIB);
    let tree = env.dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("keep.txt"), "keep").unwrap();
    Cmd::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
        ])
        .arg(&tree)
        .arg(&file)
        .ok();
    let dev = LoopDev::attach(&file, 512);
    let mnt = Mount::read_only(&dev.path, &env.dir.join(format!("{name}-mnt")));
    assert!(mnt.dir.join("keep.txt").exists());
    (file, dev, mnt)
}

fn restore_local(env: &Env, host: &str, targets: &[&Path]) -> bmr_tests::util::Output {
    let t: Vec<String> = targets.iter().map(|p| p.display().to_string()).collect();
    restorer()
        .args(["restore", "--host", host, "--from"])
        .arg(&env.store)
        .arg("--target")
        .arg(t.join(","))
        .run()
        .no_panic()
}

/// Refused, on one line of stderr naming both `a` and `b`.
#[track_caller]
fn refused_naming(out: &bmr_tests::util::Output, a: &Path, b: &Path) {
    assert!(!out.success(), "accepted:\n{}", out.describe());
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("restorer: error"))
        .unwrap_or_else(|| panic!("no error line:\n{}", out.describe()));
    eprintln!("{line}");
    for p in [a, b] {
        assert!(
            line.contains(&p.display().to_string()),
            "the reason does not name {}: {line}",
            p.display()
        );
    }
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn hard_link_to_a_mounted_loops_backing_file_refused() {
    let env = Env::new("alias-hardlink-mounted");
    raw_snapshot(&env, "al1", 1, 8 * MIB);
    let (file, dev, _mnt) = mounted_image(&env, "mounted");
    let link = env.dir.join("other-name.img");
    std::fs::hard_link(&file, &link).unwrap();
    let before = sha(&file);
    let out = restore_local(&env, "al1", &[&link]);
    refused_naming(&out, &link, &file);
    assert!(out.stderr.contains("mounted"), "{}", out.describe());
    assert!(
        out.stderr.contains(&dev.path.display().to_string()),
        "names the loop device: {}",
        out.describe()
    );
    assert_eq!(sha(&file), before, "the mounted filesystem was written");
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn second_loop_over_a_mounted_loops_file_refused() {
    let env = Env::new("alias-second-loop");
    raw_snapshot(&env, "al2", 1, 8 * MIB);
    let (file, dev, _mnt) = mounted_image(&env, "mounted");
    let second = LoopDev::attach(&file, 512);
    let before = sha(&file);
    let out = restore_local(&env, "al2", &[&second.path]);
    refused_naming(&out, &second.path, &dev.path);
    assert!(out.stderr.contains("mounted"), "{}", out.describe());
    assert_eq!(sha(&file), before, "the mounted filesystem was written");
}

#[test]
fn same_file_twice_through_a_hard_link_refused() {
    let env = Env::new("alias-twice-hardlink");
    raw_snapshot(&env, "al3", 2, 8 * MIB);
    let file = env.file("disk.img", 16 * MIB);
    let link = env.dir.join("disk-link.img");
    std::fs::hard_link(&file, &link).unwrap();
    let before = sha(&file);
    let out = restore_local(&env, "al3", &[&file, &link]);
    refused_naming(&out, &link, &file);
    assert_eq!(sha(&file), before, "the target was written");
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn two_loop_devices_over_one_file_refused() {
    let env = Env::new("alias-two-loops");
    raw_snapshot(&env, "al4", 2, 8 * MIB);
    let file = env.file("disk.img", 16 * MIB);
    let a = LoopDev::attach(&file, 512);
    let b = LoopDev::attach(&file, 512);
    let before = sha(&file);
    let out = restore_local(&env, "al4", &[&a.path, &b.path]);
    refused_naming(&out, &b.path, &a.path);
    assert_eq!(sha(&file), before, "the target was written");
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn hard_link_to_a_deleted_backing_file_refused() {
    // The backing file's own name removed: sysfs then shows "NAME (deleted)", which names nothing.
    // The kernel's loop status still gives its device and inode, which the hard link shares.
    let env = Env::new("alias-deleted");
    raw_snapshot(&env, "al5", 1, 8 * MIB);
    let (file, dev, _mnt) = mounted_image(&env, "mounted");
    let link = env.dir.join("survivor.img");
    std::fs::hard_link(&file, &link).unwrap();
    std::fs::remove_file(&file).unwrap();
    let before = sha(&link);
    let out = restore_local(&env, "al5", &[&link]);
    refused_naming(&out, &link, &dev.path);
    assert!(out.stderr.contains("mounted"), "{}", out.describe());
    assert_eq!(sha(&link), before, "the mounted filesystem was written");
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn loop_over_a_mounted_loop_device_refused() {
    // A loop device over a block device (here a mounted loop device) writes that device.
    let env = Env::new("alias-loop-over-device");
    raw_snapshot(&env, "al6", 1, 8 * MIB);
    let (file, dev, _mnt) = mounted_image(&env, "mounted");
    let over = LoopDev::attach(&dev.path, 512);
    let before = sha(&file);
    let out = restore_local(&env, "al6", &[&over.path]);
    refused_naming(&out, &over.path, &dev.path);
    assert!(out.stderr.contains("mounted"), "{}", out.describe());
    assert_eq!(sha(&file), before, "the mounted filesystem was written");
}
