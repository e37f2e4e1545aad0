//! MD RAID end to end (issue 10, item 3). Two GPT disks, each with a member of a RAID1 with
//! metadata 1.2 (ext4) and one with metadata 0.90 (superblock at the end; ext4), made by the real
//! mdadm and mke2fs inside a throwaway guest (this host has no md driver). Ingest keeps only the
//! filesystems' used blocks and stores the mirrored data once; restored over HTTP onto two bigger
//! disks, the members read back as the source's (`mdadm --examine`), the arrays assemble clean in
//! a guest, `e2fsck -fn` is clean and every file is identical; onto one disk, the plan says the
//! second disk is left out and the arrays assemble degraded.

mod common;

use bmr_tests::guest::Guest;
use bmr_tests::util::{extract, Cmd};
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const RAID: &str = "A19D880F-05FC-4D3B-A006-743F0F84911E";
/// (start, size) of the two member partitions on each disk.
const P1: (u64, u64) = (MIB, 96 * MIB);
const P2: (u64, u64) = (97 * MIB, 40 * MIB);
const DISK: u64 = 140 * MIB;
const MODULES: &[&str] = &["md_mod", "raid1", "crc32c_generic"];

fn run(c: Cmd) -> String {
    c.timeout(Duration::from_secs(600)).ok().stdout
}

/// Files of known, incompressible content: 24 MiB under `/`, 3 MiB under `small/` (which goes
/// to the 0.90 array).
fn make_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("small")).unwrap();
    std::fs::create_dir_all(dir.join("etc/deep/er")).unwrap();
    let mut want = BTreeMap::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    for i in 0..24 {
        let rel = if i % 5 == 0 {
            format!("etc/deep/er/f{i}")
        } else {
            format!("f{i}")
        };
        want.insert(rel, bytes(1 << 20));
    }
    for i in 0..3 {
        want.insert(format!("small/s{i}"), bytes(1 << 20));
    }
    for (rel, body) in &want {
        std::fs::write(dir.join(rel), body).unwrap();
    }
    want
}

fn gpt(disk: &Path) {
    let table = format!(
        "label: gpt\nstart={}, size={}, type={RAID}\nstart={}, size={}, type={RAID}\n",
        P1.0 / 512,
        P1.1 / 512,
        P2.0 / 512,
        P2.1 / 512
    );
    run(Cmd::new("sfdisk").arg("-q").arg(disk).stdin(table));
}

/// `mdadm --examine` of partition `part` of `disk`, as `key: value` lines.
fn examine(env: &Env, disk: &Path, part: (u64, u64)) -> BTreeMap<String, String> {
    let img = env.dir.join("examine.img");
    extract(disk, part.0, part.1, &img).unwrap();
    let out = run(Cmd::new("mdadm").arg("--examine").arg(&img));
    std::fs::remove_file(&img).unwrap();
    out.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The ext4 in the data area of a member: `e2fsck -fn` clean, its files by `debugfs rdump`.
fn files_of(env: &Env, disk: &Path, at: u64, len: u64, name: &str) -> BTreeMap<String, Vec<u8>> {
    let img = env.dir.join(format!("{name}.ext4"));
    extract(disk, at, len, &img).unwrap();
    run(Cmd::new("e2fsck").args(["-fn"]).arg(&img));
    let out = env.dir.join(format!("{name}.tree"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    run(Cmd::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", out.display()))
        .arg(&img));
    std::fs::remove_file(&img).unwrap();
    let mut got = BTreeMap::new();
    walk(&out, &out, &mut got);
    got.remove("lost+found");
    got
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, std::fs::read(&p).unwrap());
        }
    }
}

struct Mirror {
    disks: [PathBuf; 2],
    want: BTreeMap<String, Vec<u8>>,
}

fn build(env: &Env) -> Mirror {
    let tree = env.dir.join("tree");
    let want = make_tree(&tree);
    let disks = [env.file("disk0.img", DISK), env.file("disk1.img", DISK)];
    for d in &disks {
        gpt(d);
    }
    // The 0.90 array gets small/ only; mke2fs -d takes a directory.
    let script = r#"
mdadm --create /dev/md0 --run --assume-clean --level=1 --raid-devices=2 --metadata=1.2 --homehost=web1 --name=data /dev/vda1 /dev/vdb1
mdadm --create /dev/md1 --run --assume-clean --level=1 --raid-devices=2 --metadata=0.90 /dev/vda2 /dev/vdb2
mv /data/small /small
mke2fs -q -F -t ext4 -L data -d /data /dev/md0
mke2fs -q -F -t ext4 -L small -d /small /dev/md1
sync
mdadm --stop /dev/md0
mdadm --stop /dev/md1
"#;
    let g = Guest {
        tools: &["mdadm", "mke2fs"],
        modules: MODULES,
        tree: Some(&tree),
    };
    g.run(
        "md-build",
        script,
        &[&disks[0], &disks[1]],
        &env.dir.join("guest"),
    )
    .unwrap();
    Mirror { disks, want }
}

/// Assemble the arrays from the partitions of `disks` in a guest: `e2fsck -fn` on each, and the
/// state `mdadm --detail` prints.
fn assemble(env: &Env, disks: &[&Path], name: &str) -> String {
    let parts = |n: u32| {
        (0..disks.len())
            .map(|i| format!("/dev/vd{}{n}", (b'a' + i as u8) as char))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let script = format!(
        "mdadm --assemble --run /dev/md0 {}\nmdadm --assemble --run /dev/md1 {}\n\
         for m in md0 md1; do mdadm --detail /dev/$m | sed -n 's/^ *State : /STATE-'$m'=/p'; e2fsck -fn /dev/$m; done\n\
         mdadm --stop /dev/md0\nmdadm --stop /dev/md1\n",
        parts(1),
        parts(2)
    );
    let g = Guest {
        tools: &["mdadm", "e2fsck"],
        modules: MODULES,
        tree: None,
    };
    g.run(name, &script, disks, &env.dir.join("guest")).unwrap()
}

fn state(log: &str, md: &str) -> String {
    log.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("STATE-{md}=")))
        .unwrap_or_else(|| panic!("no state for {md}: {log}"))
        .trim()
        .to_string()
}

/// The examine fields that say which array and which member a device is.
const IDENTITY: &[&str] = &[
    "Magic",
    "Version",
    "Array UUID",
    "UUID",
    "Name",
    "Raid Level",
    "Raid Devices",
    "Device UUID",
    "Device Role",
    "Data Offset",
    "Events",
    "Checksum",
    "This",
];

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn raid1_members_are_stored_once_and_restored_exact() {
    let env = Env::new("md");
    let m = build(&env);
    let src_examine: Vec<_> = m
        .disks
        .iter()
        .flat_map(|d| [examine(&env, d, P1), examine(&env, d, P2)])
        .collect();
    assert_eq!(src_examine[0]["Version"], "1.2", "{:?}", src_examine[0]);
    assert_eq!(src_examine[1]["Version"], "0.90.00", "{:?}", src_examine[1]);

    let out = appliance()
        .args(["ingest", "--json", "--host", "web1", "--store"])
        .arg(&env.store)
        .args(&m.disks)
        .timeout(Duration::from_secs(600))
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    // Two mirrors of 27 MiB of random files: each disk keeps its arrays' used blocks (the files,
    // ext4's metadata and journal: about 51 MiB of its 140), the store keeps them once.
    let stored = v["new_bytes"].as_u64().unwrap();
    let used = v["used_bytes"].as_u64().unwrap();
    assert!(
        used < 2 * 60 * MIB,
        "only used blocks are kept: {used} ({v})"
    );
    assert!(
        stored < 40 * MIB,
        "the mirrored data is stored once: {stored} ({v})"
    );
    assert!(stored > 27 * MIB, "{v}");
    let manifest = std::fs::read_to_string(
        env.store
            .join("hosts/web1/snapshots")
            .join(v["snapshot"].as_str().unwrap())
            .join("manifest.json"),
    )
    .unwrap();
    assert!(manifest.contains("\"metadata\": \"0.90\""), "{manifest}");
    assert!(manifest.contains("\"name\": \"web1:data\""), "{manifest}");
    for (e, k) in [(&src_examine[0], "Array UUID"), (&src_examine[1], "UUID")] {
        assert!(
            manifest.contains(&format!("\"uuid\": \"{}\"", e[k])),
            "{k}: {manifest}"
        );
    }

    let srv = env.serve();
    let t = [
        env.file("t0.img", DISK + 64 * MIB),
        env.file("t1.img", DISK + 64 * MIB),
    ];
    let (out, v) = restore(&srv.url, "web1", &[&t[0], &t[1]], &[]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.contains("md raid1 member 0 of web1:data (1.2)"),
        "{}",
        out.stdout
    );
    let _ = v;
    for (i, d) in t.iter().enumerate() {
        for (k, part) in [P1, P2].into_iter().enumerate() {
            let got = examine(&env, d, part);
            let src = &src_examine[i * 2 + k];
            for f in IDENTITY {
                assert_eq!(
                    got.get(*f),
                    src.get(*f),
                    "disk {i} partition {}: {f}",
                    k + 1
                );
            }
        }
        // 1.2: data 2048 sectors in (what mdadm chose, as examine reported); 0.90: from 0.
        let off = src_examine[0]["Data Offset"]
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap()
            * 512;
        let mut got = files_of(&env, d, P1.0 + off, P1.1 - off, &format!("t{i}p1"));
        got.extend(
            files_of(&env, d, P2.0, P2.1, &format!("t{i}p2"))
                .into_iter()
                .map(|(k, v)| (format!("small/{k}"), v)),
        );
        assert!(
            got == m.want,
            "disk {i}: files differ after the restore: {:?}",
            got.keys()
        );
    }
    let log = assemble(&env, &[&t[0], &t[1]], "md-check");
    assert_eq!(state(&log, "md0"), "clean", "{log}");
    assert_eq!(state(&log, "md1"), "clean", "{log}");

    // One disk: the second is left out, the plan says so, the arrays run degraded.
    let one = env.file("one.img", DISK);
    let (out, _) = restore(&srv.url, "web1", &[&one], &[]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.contains("disk 1 (140 MiB) is not restored")
            && out.stdout.contains("runs degraded from disk 0 partition 1"),
        "{}",
        out.stdout
    );
    let log = assemble(&env, &[&one], "md-degraded");
    assert!(state(&log, "md0").contains("degraded"), "{log}");
    assert!(state(&log, "md1").contains("degraded"), "{log}");

    // A second disk that is not a mirror cannot be left out: refused before any write.
    let plain = env.file("plain.img", DISK);
    run(Cmd::new("sfdisk")
        .arg("-q")
        .arg(&plain)
        .stdin("label: gpt\nstart=2048, size=8192\n".to_string()));
    appliance()
        .args(["ingest", "--host", "mixed", "--store"])
        .arg(&env.store)
        .arg(&m.disks[0])
        .arg(&plain)
        .ok();
    let lone = env.file("lone.img", DISK);
    let (out, _) = restore(&srv.url, "mixed", &[&lone], &[]);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr
            .contains("disk 1 (140 MiB) cannot be left out: partition 1 is not a mirror member"),
        "{}",
        out.describe()
    );
    assert!(!has_table(&lone), "nothing written");
}
