//! Acceptance of restoring onto a smaller disk (issue 10): a 20 GiB GPT disk (ESP, a 10 GiB ext4,
//! a 9.7 GiB NTFS) holding 3 GiB of files, placed deep inside both filesystems so the tools must
//! move data, restored over HTTP onto an 8 GiB target: the ext4 and NTFS partitions shrink
//! (`resize2fs`, `ntfsresize` on scratch rebuilds), the NTFS one moves and its boot sectors name
//! its new start, `e2fsck -fn`, `ntfsfix -n` and `fsck.fat -n` are clean and every file reads back
//! identical. A 2 GiB target is refused before any write, naming the size needed. The images are
//! made in place (offset loop devices, fillers allocated with `fallocate`/`ntfsfallocate`) and
//! removed when the test passes: about 12 GiB of disk at the peak.

mod common;

use bmr_tests::prng::{write_random as random_file, Prng};
use bmr_tests::util::{extract, Cmd};
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const GIB: u64 = 1 << 30;

fn run(c: Cmd) -> String {
    c.timeout(Duration::from_secs(900)).ok().stdout
}

/// A mounted filesystem, unmounted when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Cmd::new("umount").arg(&self.0).run();
    }
}

struct Source {
    image: PathBuf,
    esp: (u64, u64),
    ext: (u64, u64),
    ntfs: (u64, u64),
    /// (path inside the filesystem, size, seed)
    ext_files: Vec<(String, u64, u64)>,
    ntfs_files: Vec<(String, u64, u64)>,
}

/// A loop device over `len` bytes of `disk` at `offset`: the filesystems are made in place,
/// which keeps the fixture sparse and quick (no 20 GiB copy).
fn part(disk: &Path, (offset, len): (u64, u64)) -> LoopDev {
    let out = run(Cmd::new("losetup")
        .args(["--find", "--show", "--offset", &offset.to_string()])
        .args(["--sizelimit", &len.to_string()])
        .arg(disk));
    LoopDev {
        path: PathBuf::from(out.trim()),
    }
}

fn source_disk(env: &Env) -> Source {
    let dir = &env.dir;
    let size = 20 * GIB;
    let esp = (MIB, 256 * MIB);
    let ext = (esp.0 + esp.1, 10 * GIB);
    let ntfs = (ext.0 + ext.1, size - ext.0 - ext.1 - MIB);
    let image = env.file("source.img", size);
    let table = format!(
        "label: gpt\nstart={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nstart={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\nstart={}, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
        esp.0 / 512,
        esp.1 / 512,
        ext.0 / 512,
        ext.1 / 512,
        ntfs.0 / 512,
        ntfs.1 / 512
    );
    run(Cmd::new("sfdisk").arg("-q").arg(&image).stdin(table));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    // ESP: a few files through mtools.
    let fat = part(&image, esp);
    run(Cmd::new("mkfs.fat")
        .args(["-F", "32", "-n", "ESP"])
        .arg(&fat.path));
    let loader = dir.join("loader.efi");
    random_file(&loader, 300_000, 1);
    run(Cmd::new("mmd")
        .arg("-i")
        .arg(&fat.path)
        .args(["::/EFI", "::/EFI/BOOT"]));
    run(Cmd::new("mcopy")
        .arg("-i")
        .arg(&fat.path)
        .arg(&loader)
        .arg("::/EFI/BOOT/BOOTX64.EFI"));
    drop(fat);

    // ext4: a 5 GiB filler allocated first and deleted last, so the 2 GiB of files sit past
    // where the shrunk filesystem ends.
    let ex = part(&image, ext);
    run(Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root"])
        .arg(&ex.path));
    let mut ext_files = Vec::new();
    {
        run(Cmd::new("mount").arg(&ex.path).arg(&mnt));
        let _m = Mounted(mnt.clone());
        run(Cmd::new("fallocate")
            .args(["-l", "5G"])
            .arg(mnt.join("filler")));
        for d in 0..4u64 {
            std::fs::create_dir_all(mnt.join(format!("srv/d{d}"))).unwrap();
            for i in 0..5u64 {
                let name = format!("srv/d{d}/f{i}.bin");
                let (sz, seed) = (100 * MIB + i * 12345 + d, 1000 + d * 10 + i);
                random_file(&mnt.join(&name), sz, seed);
                ext_files.push((name, sz, seed));
            }
        }
        for i in 0..200u64 {
            let name = format!("etc/conf{i}");
            std::fs::create_dir_all(mnt.join("etc")).unwrap();
            random_file(&mnt.join(&name), 100 + i * 37, 5000 + i);
            ext_files.push((name, 100 + i * 37, 5000 + i));
        }
        std::fs::remove_file(mnt.join("filler")).unwrap();
    }
    drop(ex);

    // NTFS: the same trick with a 3 GiB filler, under 1 GiB of files.
    let nt = part(&image, ntfs);
    run(Cmd::new("mkntfs")
        .args(["-F", "-Q", "-q", "-L", "Data", "-c", "4096", "-p"])
        .arg((ntfs.0 / 512).to_string())
        .arg(&nt.path));
    let mut ntfs_files = Vec::new();
    {
        // The filler is allocated by ntfsfallocate (writing it through FUSE takes a minute).
        run(Cmd::new("ntfs-3g").arg(&nt.path).arg(&mnt));
        std::fs::write(mnt.join("filler"), b"").unwrap();
        run(Cmd::new("umount").arg(&mnt));
        run(Cmd::new("ntfsfallocate")
            .args(["-l", "3G"])
            .arg(&nt.path)
            .arg("filler"));
        run(Cmd::new("ntfs-3g")
            .args(["-o", "big_writes"])
            .arg(&nt.path)
            .arg(&mnt));
        let _m = Mounted(mnt.clone());
        std::fs::create_dir_all(mnt.join("Users/Public")).unwrap();
        for i in 0..4u64 {
            let name = format!("Users/Public/Archive {i}.bin");
            let (sz, seed) = (250 * MIB + i * 4099, 7000 + i);
            random_file(&mnt.join(&name), sz, seed);
            ntfs_files.push((name, sz, seed));
        }
        for i in 0..100u64 {
            let name = format!("Users/Public/note {i}.txt");
            random_file(&mnt.join(&name), 50 + i * 91, 8000 + i);
            ntfs_files.push((name, 50 + i * 91, 8000 + i));
        }
        std::fs::remove_file(mnt.join("filler")).unwrap();
    }
    drop(nt);
    Source {
        image,
        esp,
        ext,
        ntfs,
        ext_files,
        ntfs_files,
    }
}

/// The content `random_file` wrote for (size, seed).
fn expected(size: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let mut rng = Prng::new(seed);
    for c in v.chunks_mut(4 << 20) {
        rng.fill(c);
    }
    v
}

fn same(dir: &Path, files: &[(String, u64, u64)], what: &str) {
    for (name, size, seed) in files {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{what} {name}: {e}"));
        assert!(
            got == expected(*size, *seed),
            "{what} {name} differs after the restore"
        );
    }
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn restores_onto_a_smaller_disk_by_shrinking_ext4_and_ntfs() {
    let env = Env::new("shrink");
    let t0 = std::time::Instant::now();
    let s = source_disk(&env);
    eprintln!("fixture built in {:.1}s", t0.elapsed().as_secs_f64());
    let id = env.ingest("small", &[&s.image]);
    let srv = env.serve();
    let scratch = env.dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let sarg = scratch.display().to_string();

    // Too small even shrunk: refused before anything is written, with the size needed.
    let tiny = env.file("tiny.img", 2 * GIB);
    let mark = vec![0xA5u8; 1 << 20];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tiny)
        .unwrap()
        .write_all_at(&mark, 0)
        .unwrap();
    let (out, _) = restore(&srv.url, "small", &[&tiny], &["--scratch", &sarg]);
    assert!(
        !out.success(),
        "a 2 GiB target was accepted: {}",
        out.describe()
    );
    let err = out.stderr.trim();
    assert!(
        err.contains("too small") && err.contains("needs at least"),
        "{err}"
    );
    let needed: u64 = err
        .split("needs at least ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size needed in: {err}"));
    let data: u64 = s.ext_files.iter().chain(&s.ntfs_files).map(|f| f.1).sum();
    assert!(
        needed > data + s.esp.1 && needed < data + s.esp.1 + GIB,
        "{needed} for {data} bytes of files: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(&tiny)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(head == mark, "the refused target was written");
    assert_eq!(std::fs::metadata(&tiny).unwrap().len(), 2 * GIB);

    // The plan shows the sizes.
    let target = env.file("target.img", 8 * GIB);
    let t = target.display().to_string();
    let dry = restorer()
        .args([
            "restore",
            "--dry-run",
            "--from",
            &srv.url,
            "--host",
            "small",
        ])
        .args(["--target", &t, "--scratch", &sarg])
        .ok();
    assert!(dry.stdout.contains("shrink to"), "{}", dry.stdout);
    assert!(
        dry.stdout.contains("resize2fs") && dry.stdout.contains("ntfsresize"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("move to"), "{}", dry.stdout);

    let t1 = std::time::Instant::now();
    let (out, v) = restore(&srv.url, "small", &[&target], &["--scratch", &sarg]);
    assert!(out.success(), "{}", out.describe());
    eprintln!("restored in {:.1}s", t1.elapsed().as_secs_f64());
    eprintln!("{}", out.stderr);
    let plan = &v["plan"]["disks"][0];
    assert_eq!(plan["fit"], "smaller", "{plan}");
    let lines = v["disks"][0]["resized"].to_string();
    eprintln!("{lines}");
    eprintln!("{}", serde_json::to_string_pretty(plan).unwrap_or_default());
    assert!(
        lines.contains("resize2fs") && lines.contains("ntfsresize"),
        "{lines}"
    );
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "the scratch rebuilds are removed"
    );
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 8 * GIB);

    let (label, parts) = target_table(&target).expect("sfdisk reads the table");
    assert_eq!(label, "gpt");
    assert_eq!(parts.len(), 3);
    assert_eq!((parts[0].offset, parts[0].size), s.esp, "the ESP is kept");
    assert_eq!(
        parts[1].offset, s.ext.0,
        "the ext4 partition keeps its start"
    );
    assert!(
        parts[1].size < 7 * GIB && parts[1].size > 2 * GIB,
        "ext4 shrinks below its files (which sat from 5 GiB to 7.1 GiB)"
    );
    assert!(
        parts[2].offset < s.ntfs.0 && parts[2].size < 4 * GIB && parts[2].size > GIB,
        "NTFS shrinks below its files"
    );
    assert!(parts[2].offset + parts[2].size <= 8 * GIB - 34 * 512);
    run(Cmd::new("sgdisk").arg("-v").arg(&target));

    // ESP.
    let esp = env.dir.join("r-esp.img");
    extract(&target, parts[0].offset, parts[0].size, &esp).unwrap();
    run(Cmd::new("fsck.fat").arg("-n").arg(&esp));
    let got = env.dir.join("r-loader.efi");
    run(Cmd::new("mcopy")
        .arg("-i")
        .arg(&esp)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .arg(&got));
    assert!(std::fs::read(&got).unwrap() == expected(300_000, 1));

    // ext4: clean, its size the partition's, the files identical.
    let ex = env.dir.join("r-ext.img");
    extract(&target, parts[1].offset, parts[1].size, &ex).unwrap();
    run(Cmd::new("e2fsck").arg("-fn").arg(&ex));
    let sb = run(Cmd::new("dumpe2fs").arg("-h").arg(&ex));
    let field = |k: &str| -> u64 {
        sb.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{k} in {sb}"))
    };
    assert_eq!(field("Block count") * field("Block size"), parts[1].size);
    let mnt = env.dir.join("mnt");
    {
        run(Cmd::new("mount").args(["-o", "loop,ro"]).arg(&ex).arg(&mnt));
        let _m = Mounted(mnt.clone());
        same(&mnt, &s.ext_files, "ext4");
    }
    std::fs::remove_file(&ex).unwrap();

    // NTFS: clean, told its new start, the files identical.
    let nt = env.dir.join("r-ntfs.img");
    extract(&target, parts[2].offset, parts[2].size, &nt).unwrap();
    let fix = run(Cmd::new("ntfsfix").arg("-n").arg(&nt));
    assert!(fix.contains("processed successfully"), "{fix}");
    let mut boot = [0u8; 512];
    std::fs::File::open(&nt)
        .unwrap()
        .read_exact_at(&mut boot, 0)
        .unwrap();
    let hidden = u32::from_le_bytes(boot[0x1C..0x20].try_into().unwrap()) as u64;
    assert_eq!(
        hidden * 512,
        parts[2].offset,
        "NTFS hidden sectors name the new start"
    );
    let total = u64::from_le_bytes(boot[0x28..0x30].try_into().unwrap());
    assert!(total * 512 < parts[2].size);
    let mut backup = [0u8; 512];
    std::fs::File::open(&nt)
        .unwrap()
        .read_exact_at(&mut backup, parts[2].size - 512)
        .unwrap();
    assert_eq!(
        backup[..0x54],
        boot[..0x54],
        "the backup boot sector (last sector) matches"
    );
    {
        run(Cmd::new("ntfs-3g").args(["-o", "ro"]).arg(&nt).arg(&mnt));
        let _m = Mounted(mnt.clone());
        same(&mnt, &s.ntfs_files, "NTFS");
    }
    std::fs::remove_file(&nt).unwrap();

    // verify compares what was not rebuilt and says what was.
    let ver = restorer()
        .args([
            "verify", "--from", &srv.url, "--host", "small", "--target", &t,
        ])
        .run();
    assert!(ver.success(), "{}", ver.describe());
    assert!(ver.stderr.contains("not compared"), "{}", ver.stderr);
    let _ = id;
}

/// The sample server (ESP, ext4 root, swap: 320 MiB) onto 240 MiB: the root shrinks in place,
/// the swap moves down whole; every filesystem is clean and every file identical.
#[test]
fn sample_server_onto_a_smaller_disk() {
    let env = Env::new("shrink-sample");
    let fx = bmr_tests::fixtures::gpt_server().unwrap();
    env.ingest("sample", &[&fx.image]);
    let srv = env.serve();
    let scratch = env.dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let target = env.file("target.img", 240 * MIB);
    let (out, v) = restore(
        &srv.url,
        "sample",
        &[&target],
        &["--scratch", scratch.to_str().unwrap()],
    );
    assert!(out.success(), "{}", out.describe());
    assert_eq!(v["plan"]["disks"][0]["fit"], "smaller");
    let (_, parts) = target_table(&target).expect("sfdisk reads the table");
    let at = |n: u32| parts.iter().find(|p| p.number == n).expect("partition");
    for p in &fx.partitions {
        let t = at(p.number);
        match p.number {
            1 => assert_eq!((t.offset, t.size), (p.offset, p.size), "the ESP is kept"),
            2 => assert!(t.offset == p.offset && t.size < p.size, "the root shrinks"),
            _ => assert!(
                t.offset < p.offset && t.size == p.size,
                "the swap moves whole"
            ),
        }
        let Some(kind) = p.fs else { continue };
        let img = env.dir.join(format!("part{}.img", p.number));
        extract(&target, t.offset, t.size, &img).unwrap();
        bmr_tests::oracle::fsck(kind, &img)
            .unwrap_or_else(|e| panic!("partition {}: {e:#}", p.number));
        let problems = bmr_tests::oracle::check_files(kind, &img, &p.files, &scratch).unwrap();
        assert!(
            problems.is_empty(),
            "partition {}: {}",
            p.number,
            problems.join("\n")
        );
    }
    let swap = run(Cmd::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID", "-O"])
        .arg(at(3).offset.to_string())
        .arg(&target));
    assert_eq!(
        swap.trim(),
        "5b1f0c2d-5a5a-4e11-9d44-000000000003",
        "the swap keeps its UUID"
    );
    let ver = restorer()
        .args(["verify", "--from", &srv.url, "--host", "sample", "--target"])
        .arg(&target)
        .run();
    assert!(ver.success(), "{}", ver.describe());
}
