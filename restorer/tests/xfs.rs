//! XFS end to end (issue 10): a GPT disk whose last partition holds an XFS filled through the
//! kernel is ingested (only its used blocks stored), restored over HTTP onto a bigger target, and
//! the filesystem grown with `xfs_growfs`: `xfs_repair -n` clean, every file identical.

mod common;

use bmr_tests::util::{extract, Cmd};
use common::*;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn run(c: Cmd) -> String {
    c.timeout(Duration::from_secs(600)).ok().stdout
}

/// A loop device over `img`, detached on drop; a mount over it, unmounted on drop.
struct Mounted {
    dir: std::path::PathBuf,
    _dev: LoopDev,
}

impl Mounted {
    fn new(img: &Path, dir: &Path, opts: &str) -> Mounted {
        let dev = LoopDev::attach(img, 512);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        run(Cmd::new("mount")
            .args(["-t", "xfs", "-o", opts])
            .arg(&dev.path)
            .arg(dir));
        Mounted {
            dir: dir.to_path_buf(),
            _dev: dev,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

fn dblocks(img: &Path) -> u64 {
    let out = run(Cmd::new("xfs_db")
        .args(["-r", "-c", "sb 0", "-c", "print dblocks"])
        .arg(img));
    out.trim()
        .strip_prefix("dblocks = ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("xfs_db: {out}"))
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn xfs_restored_onto_a_bigger_disk_is_grown_and_exact() {
    let env = Env::new("xfs");
    let part = (MIB, 400 * MIB);
    let size = part.0 + part.1 + MIB;
    let disk = env.file("disk.img", size);
    let table = format!(
        "label: gpt\nstart={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        part.0 / 512,
        part.1 / 512
    );
    run(Cmd::new("sfdisk").arg("-q").arg(&disk).stdin(table));
    let fs = env.file("fs.img", part.1);
    run(Cmd::new("mkfs.xfs")
        .args(["-q", "-f", "-L", "data"])
        .arg(&fs));
    {
        let m = Mounted::new(&fs, &env.dir.join("mnt"), "rw");
        for i in 0..200u64 {
            let body: Vec<u8> = (0..(1000 + i * 997)).map(|k| (k * 31 + i) as u8).collect();
            std::fs::write(m.dir.join(format!("f{i:03}")), body).unwrap();
        }
    }
    let want = {
        let m = Mounted::new(&fs, &env.dir.join("mnt"), "ro");
        files(&m.dir)
    };
    run(Cmd::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"]));
    std::fs::remove_file(&fs).unwrap();
    let source_blocks = {
        let p = env.dir.join("source-part.img");
        extract(&disk, part.0, part.1, &p).unwrap();
        let b = dblocks(&p);
        std::fs::remove_file(&p).unwrap();
        b
    };

    let out = appliance()
        .args(["ingest", "--json", "--host", "xfs1", "--store"])
        .arg(&env.store)
        .arg(&disk)
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let used = v["used_bytes"].as_u64().unwrap();
    assert!(
        used < 100 * MIB,
        "only the XFS's used blocks are kept: {used}"
    );

    let srv = env.serve();
    let t = env.file("target.img", size + 600 * MIB);
    let (out, v) = restore(&srv.url, "xfs1", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        v["disks"][0]["resized"].to_string().contains("xfs_growfs"),
        "{v}"
    );
    let (_, parts) = target_table(&t).unwrap();
    let p = parts.iter().find(|p| p.number == 1).unwrap();
    assert!(p.size > part.1 + 500 * MIB, "{parts:?}");
    let img = env.dir.join("restored.img");
    extract(&t, p.offset, p.size, &img).unwrap();
    {
        let dev = LoopDev::attach(&img, 512);
        run(Cmd::new("xfs_repair").arg("-n").arg(&dev.path));
    }
    assert!(
        dblocks(&img) > source_blocks + (500 * MIB) / 4096,
        "the filesystem grew"
    );
    let m = Mounted::new(&img, &env.dir.join("mnt-restored"), "ro");
    assert!(files(&m.dir) == want, "files differ after the restore");
}
