//! Acceptance of exclusions (issue 10): a GPT disk with an NTFS volume holding a 1 GiB
//! `pagefile.sys` and an ext4 root holding a 512 MiB swap file is ingested with the default
//! exclusions and without them: the excluded contents are not stored (stored bytes measured),
//! the manifest records them, and the restored volumes are clean (`ntfsfix -n`, `e2fsck -fn`)
//! with every other file identical and the excluded files in place (size, first page).

mod common;

use bmr_tests::util::{extract, Cmd};
use common::*;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const KEEP: usize = 4096;

/// Incompressible bytes (xorshift), fast enough for a GiB.
fn random_file(path: &Path, size: u64, mut seed: u64) {
    let mut v = Vec::with_capacity(size as usize);
    while (v.len() as u64) < size {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(size as usize);
    std::fs::write(path, v).unwrap();
}

fn run(c: Cmd) -> String {
    c.timeout(Duration::from_secs(600)).ok().stdout
}

/// Write `fsimg` into `disk` at byte `offset`, sparse.
fn place(fsimg: &Path, disk: &Path, offset: u64) {
    run(Cmd::new("dd")
        .arg(format!("if={}", fsimg.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={}", offset / MIB)));
}

struct Disk {
    image: std::path::PathBuf,
    size: u64,
    ntfs: (u64, u64),
    ext: (u64, u64),
    /// (source file, name in the NTFS root) of the small files.
    ntfs_files: Vec<(std::path::PathBuf, String)>,
    tree: std::path::PathBuf,
}

fn windows_and_linux_disk(dir: &Path) -> Disk {
    let ntfs = (MIB, 1400 * MIB);
    let ext = (ntfs.0 + ntfs.1, 900 * MIB);
    let size = ext.0 + ext.1 + MIB;
    let image = dir.join("disk.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(size).unwrap();
    let table = format!(
        "label: gpt\nstart={}, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\nstart={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        ntfs.0 / 512,
        ntfs.1 / 512,
        ext.0 / 512,
        ext.1 / 512
    );
    run(Cmd::new("sfdisk").arg("-q").arg(&image).stdin(table));

    let nt = dir.join("ntfs.img");
    std::fs::File::create(&nt).unwrap().set_len(ntfs.1).unwrap();
    run(Cmd::new("mkntfs")
        .args(["-F", "-Q", "-q", "-c", "4096"])
        .arg(&nt));
    let page = dir.join("pagefile.sys");
    random_file(&page, GIB, 11);
    run(Cmd::new("ntfscp")
        .arg("-f")
        .arg(&nt)
        .arg(&page)
        .arg("pagefile.sys"));
    let mut ntfs_files = Vec::new();
    for i in 0..40u64 {
        let src = dir.join(format!("doc{i}.bin"));
        random_file(&src, 1000 + i * 7919, 100 + i);
        let name = format!("Document number {i:02}.bin");
        run(Cmd::new("ntfscp").arg("-f").arg(&nt).arg(&src).arg(&name));
        ntfs_files.push((src, name));
    }
    place(&nt, &image, ntfs.0);
    std::fs::remove_file(&page).unwrap();
    std::fs::remove_file(&nt).unwrap();

    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("srv/data")).unwrap();
    std::fs::write(
        tree.join("etc/fstab"),
        "UUID=x / ext4 errors=remount-ro 0 1\n/swapfile none swap sw 0 0\n",
    )
    .unwrap();
    random_file(&tree.join("swapfile"), 512 * MIB, 5);
    run(Cmd::new("mkswap").arg("-f").arg(tree.join("swapfile")));
    for i in 0..50u64 {
        random_file(
            &tree.join(format!("srv/data/f{i}")),
            5000 + i * 3571,
            900 + i,
        );
    }
    let ex = dir.join("ext.img");
    std::fs::File::create(&ex).unwrap().set_len(ext.1).unwrap();
    run(Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&ex));
    place(&ex, &image, ext.0);
    std::fs::remove_file(&ex).unwrap();
    Disk {
        image,
        size,
        ntfs,
        ext,
        ntfs_files,
        tree,
    }
}

fn ingest(env: &Env, host: &str, img: &Path, extra: &[&str]) -> serde_json::Value {
    let out = appliance()
        .args(["ingest", "--json", "--host", host, "--store"])
        .arg(&env.store)
        .args(extra)
        .arg(img)
        .timeout(Duration::from_secs(900))
        .ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()))
}

#[test]
#[ignore = "system test (root or GiB fixtures): scripts/test runs it"]
fn pagefile_and_swap_file_are_not_stored_and_restore_clean() {
    let env = Env::new("exclude");
    let d = windows_and_linux_disk(&env.dir);

    let with = ingest(&env, "ex-default", &d.image, &[]);
    let without = ingest(&env, "ex-all", &d.image, &["--no-default-excludes"]);
    let stored = |v: &serde_json::Value| v["referenced_bytes"].as_u64().unwrap();
    eprintln!(
        "stored: {} bytes with the default exclusions, {} without",
        stored(&with),
        stored(&without)
    );
    let excluded: Vec<(String, u64)> = with["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        excluded,
        vec![
            ("/pagefile.sys".to_string(), GIB - KEEP as u64),
            ("/swapfile".to_string(), 512 * MIB - KEEP as u64)
        ]
    );
    assert!(without["excluded"].as_array().unwrap().is_empty());
    // The random contents (1.5 GiB) are stored only without the exclusions; what is left with
    // them is the small files and the metadata.
    assert!(
        stored(&without) > stored(&with) + GIB + 500 * MIB,
        "{} vs {}",
        stored(&without),
        stored(&with)
    );
    assert!(stored(&with) < 64 * MIB, "{}", stored(&with));
    let id = with["snapshot"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            env.store
                .join(format!("hosts/ex-default/snapshots/{id}/manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let parts = &manifest["disks"][0]["partitions"];
    assert_eq!(parts[0]["excluded"][0]["path"], "/pagefile.sys", "{parts}");
    assert_eq!(parts[1]["excluded"][0]["path"], "/swapfile", "{parts}");

    let srv = env.serve();
    let t = env.file("target.img", d.size);
    let (out, _) = restore(&srv.url, "ex-default", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());

    let nt = env.dir.join("restored-ntfs.img");
    extract(&t, d.ntfs.0, d.ntfs.1, &nt).unwrap();
    let fix = run(Cmd::new("ntfsfix").arg("-n").arg(&nt));
    assert!(fix.contains("processed successfully"), "{fix}");
    for (src, name) in &d.ntfs_files {
        let got = std::process::Command::new("ntfscat")
            .arg(&nt)
            .arg(name)
            .output()
            .unwrap();
        assert!(
            got.status.success() && got.stdout == std::fs::read(src).unwrap(),
            "{name} differs after the restore"
        );
    }
    let info = run(Cmd::new("ntfsinfo").args(["-F", "pagefile.sys"]).arg(&nt));
    assert!(
        info.contains(&format!("{}", GIB)),
        "pagefile.sys keeps its size: {info}"
    );

    let ex = env.dir.join("restored-ext.img");
    extract(&t, d.ext.0, d.ext.1, &ex).unwrap();
    run(Cmd::new("e2fsck").arg("-fn").arg(&ex));
    let dump = env.dir.join("dump");
    let _ = std::fs::remove_dir_all(&dump);
    std::fs::create_dir_all(&dump).unwrap();
    run(Cmd::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dump.display()))
        .arg(&ex));
    for i in 0..50 {
        let f = format!("srv/data/f{i}");
        assert!(
            std::fs::read(dump.join(&f)).unwrap() == std::fs::read(d.tree.join(&f)).unwrap(),
            "{f} differs after the restore"
        );
    }
    let swap = std::fs::read(dump.join("swapfile")).unwrap();
    assert_eq!(swap.len() as u64, 512 * MIB);
    assert_eq!(
        swap[..KEEP],
        std::fs::read(d.tree.join("swapfile")).unwrap()[..KEEP],
        "the swap header is restored"
    );
}
