//! File-level restore (issue 10, item 5) from ext4 and NTFS snapshots: `appliance files
//! ls|get|export` read through the chunks, never restoring the disk. A GPT disk (ESP, an ext4 made
//! by `mkfs.ext4 -d` from a tree with modes, owners, times, a symbolic link, a sparse file and a
//! 2 GiB file, and an NTFS filled through ntfs-3g) is ingested; the listing matches the tree, the exported tar unpacks (GNU tar) to the same files,
//! modes, owners, times and links, with no absolute or `..` names; `..` in a request is refused;
//! the 2 GiB file streams out under a 512 MiB address-space limit.

mod common;

use bmr_tests::prng::write_random as random_file;
use bmr_tests::util::Cmd;
use common::{Env, BIN};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Unpack `tarball` (GNU tar, modes and owners kept) into `env`'s `name` and require
/// `diff -r` of `top` there against `top` of `src` (links compared as links) to be clean.
/// Returns the directory unpacked into.
fn unpack_matches(
    env: &Env,
    tarball: &Path,
    name: &str,
    src: &Path,
    top: &str,
) -> std::path::PathBuf {
    let dst = env.path(name);
    std::fs::create_dir_all(&dst).unwrap();
    Cmd::new("tar")
        .args(["-x", "-p", "--same-owner", "-f"])
        .arg(tarball)
        .arg("-C")
        .arg(&dst)
        .ok();
    let diff = Cmd::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(src.join(top))
        .arg(dst.join(top))
        .run();
    assert!(diff.success(), "{}", diff.describe());
    dst
}

fn sh(script: &str) {
    Cmd::new("bash").args(["-euc", script]).ok();
}

/// `appliance files ARGS[0] --store .. --host fs1 --partition PART ARGS[1..]`.
fn files_in(env: &Env, part: &str, args: &[&str]) -> Cmd {
    Cmd::new(BIN)
        .arg("files")
        .arg(args[0])
        .arg("--store")
        .arg(&env.store)
        .args(["--host", "fs1", "--partition", part])
        .args(&args[1..])
        .timeout(Duration::from_secs(600))
}

fn files(env: &Env, args: &[&str]) -> Cmd {
    files_in(env, "2", args)
}

fn sha(p: &Path) -> String {
    Cmd::new("sha256sum").arg(p).ok().stdout[..64].to_string()
}

const NTFS_SIZE: u64 = 200 * MIB;

/// An NTFS volume filled through ntfs-3g: nested folders, a resident (tiny) file, big and
/// fragmented ones, Unicode names, set modification times. The tree is kept in `ntfs-tree`.
fn ntfs_volume(env: &Env) -> std::path::PathBuf {
    let img = env.path("ntfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(NTFS_SIZE)
        .unwrap();
    Cmd::new("mkntfs")
        .args(["-F", "-Q", "-q", "-L", "Data", "-c", "4096"])
        .arg(&img)
        .ok();
    let tree = env.path("ntfs-tree");
    std::fs::create_dir_all(tree.join("Users/Public/Documents")).unwrap();
    std::fs::write(tree.join("Users/Public/tiny.txt"), "resident\r\n").unwrap();
    random_file(
        &tree.join("Users/Public/Documents/Résumé été.docx"),
        123_457,
        21,
    );
    random_file(
        &tree.join("Users/Public/Documents/report.pdf"),
        9 * MIB + 17,
        22,
    );
    for i in 0..40u64 {
        random_file(
            &tree.join(format!("Users/Public/file {i:02}.dat")),
            3000 + i * 4111,
            30 + i,
        );
    }
    sh(&format!(
        "touch -d @1300000000 '{t}/Users/Public/tiny.txt' '{t}/Users/Public/Documents/report.pdf'",
        t = tree.display()
    ));
    let mnt = env.path("ntfs-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    Cmd::new("ntfs-3g").arg(&img).arg(&mnt).ok();
    let copied = Cmd::new("cp")
        .args(["-r", "--preserve=timestamps"])
        .arg(tree.join("Users"))
        .arg(&mnt)
        .run();
    Cmd::new("umount").arg(&mnt).ok();
    assert!(copied.success(), "{}", copied.describe());
    img
}

fn ntfs_checks(env: &Env) {
    let tree = env.path("ntfs-tree");
    let ls = files_in(env, "3", &["ls", "--json", "/Users/Public"]).ok();
    let v: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 42, "{names:?}");
    assert!(
        names.contains(&"Documents") && names.contains(&"tiny.txt"),
        "{names:?}"
    );
    let tiny = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "tiny.txt")
        .unwrap();
    assert_eq!(tiny["mtime"], 1_300_000_000u64, "{tiny}");
    assert_eq!(tiny["size"], 10);
    // Windows looks names up without regard to case.
    let out = env.path("nt-got");
    files_in(
        env,
        "3",
        &[
            "get",
            "/users/PUBLIC/documents/RÉSUMÉ ÉTÉ.docx",
            "-o",
            out.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(
        sha(&out),
        sha(&tree.join("Users/Public/Documents/Résumé été.docx"))
    );
    let tarball = env.path("users.tar");
    files_in(
        env,
        "3",
        &["export", "/Users", "-o", tarball.to_str().unwrap()],
    )
    .ok();
    let dst = unpack_matches(env, &tarball, "nt-unpacked", &tree, "Users");
    let m = std::fs::metadata(dst.join("Users/Public/Documents/report.pdf")).unwrap();
    assert_eq!(m.mtime(), 1_300_000_000, "NTFS modification time kept");
}

/// An XFS volume filled through the kernel (loop mount): a short-form directory, a block
/// directory, a 5,000-entry (leaf/node) directory, a file in many extents, a sparse file, a
/// symbolic link, modes, owners and times. The tree is `xfs-tree`.
fn xfs_files(env: &Env, img: &Path) {
    let tree = env.path("xfs-tree");
    std::fs::create_dir_all(tree.join("srv/small")).unwrap();
    std::fs::create_dir_all(tree.join("srv/block")).unwrap();
    std::fs::create_dir_all(tree.join("srv/huge")).unwrap();
    std::fs::write(tree.join("srv/small/a"), "a\n").unwrap();
    for i in 0..40u64 {
        random_file(
            &tree.join(format!("srv/block/entry-with-a-longer-name-{i:03}")),
            100 + i,
            60 + i,
        );
    }
    sh(&format!(
        "cd {t}/srv/huge && seq -f 'n%05g' 1 5000 | xargs touch
         cd {t}/srv && truncate -s 40M sparse && printf end | dd of=sparse bs=1 seek=$((30*1024*1024)) conv=notrunc status=none
         ln -s small/a {t}/srv/link
         chmod 0640 {t}/srv/small/a; chown 77:88 {t}/srv/small/a; touch -d @1234567890 {t}/srv/small/a",
        t = tree.display()
    ));
    random_file(&tree.join("srv/data.bin"), 20 * MIB + 3, 61);
    let mnt = env.path("xfs-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    Cmd::new("mount")
        .args(["-o", "loop"])
        .arg(img)
        .arg(&mnt)
        .ok();
    // A file in more extents than its inode holds (a block-map btree): 64 pieces between holes.
    let frag = sh_out(&format!(
        "cd {m} && for i in $(seq 0 63); do dd if={t}/srv/data.bin of=frag bs=64k skip=$i seek=$((2*i)) count=1 conv=notrunc oflag=direct status=none; done; cp -a {t}/srv . && xfs_bmap frag | wc -l",
        m = mnt.display(),
        t = tree.display()
    ));
    Cmd::new("umount").arg(&mnt).ok();
    assert!(
        frag.trim().parse::<u32>().unwrap_or(0) > 100,
        "frag has {frag} map lines"
    );
}

fn sh_out(script: &str) -> String {
    Cmd::new("bash").args(["-euc", script]).ok().stdout
}

fn xfs_checks(env: &Env) {
    let tree = env.path("xfs-tree");
    let ls = files_in(env, "4", &["ls", "--json", "/srv"]).ok();
    let v: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["block", "data.bin", "huge", "link", "small", "sparse"],
        "{v}"
    );
    let huge = files_in(env, "4", &["ls", "--json", "/srv/huge"]).ok();
    let h: serde_json::Value = serde_json::from_str(&huge.stdout).unwrap();
    assert_eq!(
        h.as_array().unwrap().len(),
        5000,
        "a node directory lists whole"
    );
    let small = files_in(env, "4", &["ls", "--json", "/srv/small"]).ok();
    let a: serde_json::Value = serde_json::from_str(&small.stdout).unwrap();
    assert_eq!(
        (
            a[0]["mode"].clone(),
            a[0]["uid"].clone(),
            a[0]["gid"].clone()
        ),
        (0o640.into(), 77.into(), 88.into()),
        "{a}"
    );
    assert_eq!(a[0]["mtime"], 1_234_567_890u64);
    let out = env.path("xfs-frag");
    files_in(env, "4", &["get", "/frag", "-o", out.to_str().unwrap()]).ok();
    let data = std::fs::read(tree.join("srv/data.bin")).unwrap();
    let piece = 64 * 1024;
    let mut want = vec![0u8; 127 * piece];
    for i in 0..64 {
        want[2 * i * piece..(2 * i + 1) * piece].copy_from_slice(&data[i * piece..(i + 1) * piece]);
    }
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the file in 64 extents (a btree)"
    );
    let tarball = env.path("xfs.tar");
    files_in(
        env,
        "4",
        &["export", "/srv", "-o", tarball.to_str().unwrap()],
    )
    .ok();
    let dst = unpack_matches(env, &tarball, "xfs-unpacked", &tree, "srv");
    let m = std::fs::metadata(dst.join("srv/small/a")).unwrap();
    assert_eq!((m.mtime(), m.uid(), m.gid()), (1_234_567_890, 77, 88));
}

/// The same over `appliance serve`'s API, with a read token for the host and one for another.
fn api_checks(env: &Env) {
    use common::http::{get, write_tokens, Server};
    write_tokens(
        &env.store,
        serde_json::json!({ "tokens": [
            { "name": "fs1", "token": "read-fs1-0123456789", "access": "read", "hosts": ["fs1"] },
            { "name": "other", "token": "read-other-0123456789", "access": "read", "hosts": ["other"] },
        ]}),
    );
    let srv = Server::start(&env.store, &[]);
    let tok = Some("read-fs1-0123456789");
    let api = |rest: &str| srv.url(&format!("/api/v1/hosts/fs1/snapshots/latest/{rest}"));
    let r = get(&api("files?partition=2&path=/srv/data"), tok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().unwrap().len(), 301);
    let r = get(&api("file?partition=2&path=/etc/ssh/ssh_host_key"), tok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.h("content-length"), Some("1675"));
    let want = std::fs::read(env.path("tree/etc/ssh/ssh_host_key")).unwrap();
    assert!(r.body == want, "the file over HTTP");
    let r = get(&api("export?partition=3&path=/Users"), tok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.h("content-type"), Some("application/x-tar"));
    let tarball = env.path("api-users.tar");
    std::fs::write(&tarball, &r.body).unwrap();
    unpack_matches(
        env,
        &tarball,
        "api-unpacked",
        &env.path("ntfs-tree"),
        "Users",
    );
    for (rest, token, status) in [
        ("file?partition=2&path=/nope", tok, 404),
        ("file?partition=2&path=/srv/../etc/hostname", tok, 400),
        ("file?partition=2&path=/srv", tok, 400),
        ("files?partition=9", tok, 400),
        (
            "files?partition=2&path=/",
            Some("read-other-0123456789"),
            403,
        ),
        ("files?partition=2&path=/", None, 401),
    ] {
        let r = get(&api(rest), token);
        assert_eq!(r.status, status, "{rest}: {}", r.text());
    }
}

/// An ESP-like FAT16 volume filled with mtools: long names, nested folders, set times (FAT keeps
/// them to 2 seconds, in local time: the test runs mtools with TZ=UTC). The tree is `fat-tree`.
fn fat_files(env: &Env, img: &Path) {
    let tree = env.path("fat-tree");
    std::fs::create_dir_all(tree.join("EFI/BOOT")).unwrap();
    std::fs::create_dir_all(tree.join("EFI/debian/Long Folder Name")).unwrap();
    random_file(&tree.join("EFI/BOOT/BOOTX64.EFI"), 945_000, 51);
    random_file(&tree.join("EFI/debian/grubx64.efi"), 2_100_000, 52);
    std::fs::write(
        tree.join("EFI/debian/grub.cfg"),
        "search.fs_uuid 1234 root\n",
    )
    .unwrap();
    random_file(
        &tree.join("EFI/debian/Long Folder Name/A file with a long name.txt"),
        777,
        53,
    );
    std::fs::write(tree.join("EFI/debian/Long Folder Name/empty"), "").unwrap();
    sh(&format!(
        "find {} -exec touch -d @1500000000 {{}} +",
        tree.display()
    ));
    Cmd::new("mcopy")
        .env("TZ", "UTC")
        .args(["-s", "-m", "-i"])
        .arg(img)
        .arg(tree.join("EFI"))
        .arg("::/")
        .ok();
}

fn fat_checks(env: &Env) {
    let tree = env.path("fat-tree");
    let ls = files_in(env, "1", &["ls", "--json", "/efi/DEBIAN"]).ok();
    let v: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Long Folder Name", "grub.cfg", "grubx64.efi"],
        "{v}"
    );
    assert_eq!(v[2]["size"], 2_100_000);
    assert_eq!(v[2]["mtime"], 1_500_000_000u64);
    let tarball = env.path("efi.tar");
    files_in(
        env,
        "1",
        &["export", "/EFI", "-o", tarball.to_str().unwrap()],
    )
    .ok();
    let dst = unpack_matches(env, &tarball, "fat-unpacked", &tree, "EFI");
    let m = std::fs::metadata(dst.join("EFI/debian/Long Folder Name/A file with a long name.txt"))
        .unwrap();
    assert_eq!(m.mtime(), 1_500_000_000, "FAT modification time kept");
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn ext4_xfs_ntfs_and_fat_files_listed_got_and_exported_from_a_snapshot() {
    let env = Env::new("files");
    let tree = env.path("tree");
    std::fs::create_dir_all(tree.join("etc/ssh")).unwrap();
    std::fs::create_dir_all(tree.join("srv/data/deep/er")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "fs1\n").unwrap();
    random_file(&tree.join("etc/ssh/ssh_host_key"), 1675, 1);
    for i in 0..300u64 {
        random_file(
            &tree.join(format!("srv/data/file{i:03}.bin")),
            i * 997 + 1,
            100 + i,
        );
    }
    random_file(&tree.join("srv/data/deep/er/nested.txt"), 70_000, 7);
    random_file(&tree.join("big.bin"), 2 * GIB, 9);
    std::fs::write(tree.join("empty"), "").unwrap();
    sh(&format!(
        "cd {t}
         truncate -s 64M sparse.img && printf tail | dd of=sparse.img bs=1 seek=$((48*1024*1024)) conv=notrunc status=none
         ln -s ../etc/hostname srv/link-to-hostname
         chmod 0600 etc/ssh/ssh_host_key; chmod 4755 srv/data/file001.bin; chmod 0750 srv/data/deep
         chown 1234:5678 srv/data/file002.bin; chown -h 42:43 srv/link-to-hostname
         touch -d @1500000000 etc/hostname; touch -d @1600000000 srv/data/deep; touch -h -d @1400000000 srv/link-to-hostname",
        t = tree.display()
    ));
    let fs = env.path("ext.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(2 * GIB + 512 * MIB)
        .unwrap();
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&fs)
        .ok();
    let nt = ntfs_volume(&env);
    let disk = env.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(2 * GIB + 1200 * MIB)
        .unwrap();
    let ext_sectors = (2 * GIB + 512 * MIB) / 512;
    let xfs_at = 67584 + ext_sectors + NTFS_SIZE / 512;
    Cmd::new("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(format!(
            "label: gpt\nstart=2048, size=65536, type=U\nstart=67584, size={ext_sectors}, type=L\nstart={}, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\nstart={xfs_at}, size={}, type=L\n",
            67584 + ext_sectors,
            NTFS_SIZE / 512,
            320 * MIB / 512
        ))
        .ok();
    let esp = env.path("esp.img");
    std::fs::File::create(&esp)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    Cmd::new("mkfs.fat").arg(&esp).ok();
    fat_files(&env, &esp);
    let xfs = env.path("xfs.img");
    std::fs::File::create(&xfs)
        .unwrap()
        .set_len(320 * MIB)
        .unwrap();
    Cmd::new("mkfs.xfs").args(["-q", "-f"]).arg(&xfs).ok();
    xfs_files(&env, &xfs);
    for (img, at) in [
        (&esp, MIB),
        (&fs, 67584 * 512),
        (&nt, (67584 + ext_sectors) * 512),
        (&xfs, xfs_at * 512),
    ] {
        Cmd::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", disk.display()))
            .args([
                "bs=4M",
                "conv=notrunc,sparse",
                "oflag=seek_bytes",
                "status=none",
            ])
            .arg(format!("seek={at}"))
            .ok();
    }
    std::fs::remove_file(&fs).unwrap();
    std::fs::remove_file(&nt).unwrap();
    env.ingest_ok("fs1", "s1", &[&disk]);
    ntfs_checks(&env);
    api_checks(&env);

    // ls: names, kinds, modes, owners, times and sizes as the tree has them.
    let ls = files(&env, &["ls", "--json", "/srv/data"]).ok();
    let v: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 301, "300 files and a directory");
    let find = |n: &str| {
        list.iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert_eq!(find("deep")["kind"], "dir");
    assert_eq!(find("deep")["mode"], 0o750);
    assert_eq!(find("deep")["mtime"], 1_600_000_000u64);
    assert_eq!(find("file001.bin")["mode"], 0o4755);
    assert_eq!(find("file002.bin")["uid"], 1234);
    assert_eq!(find("file002.bin")["gid"], 5678);
    assert_eq!(find("file299.bin")["size"], 299 * 997 + 1);
    let root = files(&env, &["ls", "--json", "/srv"]).ok();
    let v: serde_json::Value = serde_json::from_str(&root.stdout).unwrap();
    let link = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "link-to-hostname")
        .unwrap();
    assert_eq!(link["kind"], "symlink");
    assert_eq!(link["link"], "../etc/hostname");
    let text = files(&env, &["ls", "/etc"]).ok().stdout;
    assert!(
        text.contains("hostname") && text.contains("2017-07-14T02:40:00Z"),
        "{text}"
    );

    // get: exact bytes, including a sparse file and a 2 GiB one under a 512 MiB limit.
    for name in [
        "etc/ssh/ssh_host_key",
        "sparse.img",
        "empty",
        "srv/data/deep/er/nested.txt",
    ] {
        let out = env.path("got");
        files(
            &env,
            &["get", &format!("/{name}"), "-o", out.to_str().unwrap()],
        )
        .ok();
        assert_eq!(sha(&out), sha(&tree.join(name)), "{name}");
    }
    let big = env.path("big-got");
    let got = Cmd::new("prlimit")
        .args(["--as=536870912", "--", BIN, "files", "get", "--store"])
        .arg(&env.store)
        .args(["--host", "fs1", "--partition", "2", "/big.bin", "-o"])
        .arg(&big)
        .timeout(Duration::from_secs(600))
        .ok();
    assert!(got.success());
    assert_eq!(sha(&big), sha(&tree.join("big.bin")), "the 2 GiB file");
    std::fs::remove_file(&big).unwrap();

    // Refusals: `..`, a missing file, a directory for get, a partition that is not ext.
    for (args, want) in [
        (vec!["get", "/srv/../etc/hostname"], "`..`"),
        (vec!["get", "/nope"], "no such file"),
        (vec!["get", "/srv"], "not a regular file"),
    ] {
        let out = files(&env, &args).run();
        assert!(!out.success(), "{args:?}: {}", out.describe());
        let err = out.stderr.trim();
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }

    fat_checks(&env);
    xfs_checks(&env);
    let which = Cmd::new(BIN)
        .args(["files", "ls", "--store"])
        .arg(&env.store)
        .args(["--host", "fs1", "/"])
        .run();
    assert!(
        !which.success() && which.stderr.contains("name a partition"),
        "{}",
        which.describe()
    );

    // export: a tar that GNU tar unpacks to the same tree.
    let tarball = env.path("srv.tar");
    files(&env, &["export", "/srv", "-o", tarball.to_str().unwrap()]).ok();
    let names = Cmd::new("tar").arg("-tf").arg(&tarball).ok().stdout;
    for n in names.lines() {
        assert!(
            !n.starts_with('/') && !n.split('/').any(|c| c == ".."),
            "archive name {n:?}"
        );
    }
    let out = unpack_matches(&env, &tarball, "unpacked", &tree, "srv");
    let src = tree.join("srv");
    let dst = out.join("srv");
    for rel in [
        "data/file001.bin",
        "data/file002.bin",
        "data/deep",
        "data/deep/er/nested.txt",
        "link-to-hostname",
    ] {
        let (a, b) = (
            std::fs::symlink_metadata(src.join(rel)).unwrap(),
            std::fs::symlink_metadata(dst.join(rel)).unwrap(),
        );
        assert_eq!(
            a.permissions().mode() & 0o7777,
            b.permissions().mode() & 0o7777,
            "{rel} mode"
        );
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{rel} owner");
        if !a.file_type().is_symlink() {
            assert_eq!(a.mtime(), b.mtime(), "{rel} mtime");
        }
    }
    assert_eq!(
        std::fs::read_link(dst.join("link-to-hostname")).unwrap(),
        Path::new("../etc/hostname")
    );
}
