//! Partition tables against the real tools: tables made by sgdisk/sfdisk are read, laid out for a
//! target and written back; sgdisk -v / sfdisk check what we wrote.

mod common;

use common::*;
use snapshot::ptable::gpt::Gpt;
use snapshot::ptable::mbr::Mbr;
use snapshot::ptable::PartitionTable;
use snapshot::DiskSource;
use std::path::Path;

fn open(p: &Path) -> DiskSource {
    DiskSource::open(p).expect("open image")
}

fn read_table(p: &Path) -> (PartitionTable, u32) {
    PartitionTable::read(&open(p), None).expect("read table")
}

/// Write `table` for a fresh zeroed disk of `size` bytes at `path`, like a restorer would.
fn write_fresh(path: &Path, table: &PartitionTable, size: u64, sector: u32) {
    sparse(path, size);
    let patches = table.to_disk(size, sector).expect("to_disk");
    apply(path, &patches);
}

/// A new sparse image of `size` bytes at `path`, partitioned by sfdisk from `script`.
fn sfdisk_image(path: &Path, size: u64, script: &[u8]) {
    sparse(path, size);
    run_input(cmd("sfdisk").arg("-q").arg(path), Some(script));
}

fn sgdisk_verify(dev: &str) {
    let out = run(cmd("sgdisk").arg("-v").arg(dev));
    assert!(
        out.contains("No problems found"),
        "sgdisk -v {dev} found problems:\n{out}"
    );
}

fn gpt_sgdisk_image(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("sgdisk.img");
    sparse(&img, size);
    run(cmd("sgdisk")
        .args([
            "-n1:2048:+10M",
            "-t1:ef00",
            "-c1:EFI system",
            "-n2:0:+20M",
            "-t2:8300",
            "-c2:root ü ∑ 日本",
            "-A2:set:60",
            "-A2:set:2",
            "-n5:0:+5M",
            "-t5:8200",
            "-c5:swap",
            "-n3:0:0",
            "-t3:0700",
            "-c3:data partition with a name that is thirty-six",
            "-U",
            "11111111-2222-3333-4444-555555555555",
        ])
        .arg(&img));
    sgdisk_verify(img.to_str().unwrap());
    img
}

fn gpt_sfdisk_image(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("sfdisk.img");
    let script = b"label: gpt\nsize=10M, type=U, name=esp\nsize=20M, type=L, attrs=\"RequiredPartition LegacyBIOSBootable GUID:63\"\ntype=L, name=\"last one\"\n";
    sfdisk_image(&img, size, script);
    img
}

#[test]
fn gpt_exact_roundtrip_sgdisk_and_sfdisk() {
    let d = tmp();
    for img in [
        gpt_sgdisk_image(d.path(), 64 * MIB),
        gpt_sfdisk_image(d.path(), 64 * MIB + 3 * 512),
    ] {
        let size = std::fs::metadata(&img).unwrap().len();
        let (t, sector) = read_table(&img);
        assert_eq!(sector, 512);
        let PartitionTable::Gpt(g) = &t else {
            panic!("not a GPT: {t:?}")
        };
        assert!(g.notes.is_empty(), "{:?}", g.notes);
        assert!(g.partitions.len() >= 3);
        // The manifest form survives serde unchanged.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<PartitionTable>(&json).unwrap(), t);

        let t2 = t.for_target(512, size, 512, false).expect("for_target");
        assert_eq!(t2, t, "same disk, no grow: the table is unchanged");
        let out = d.path().join("out.img");
        write_fresh(&out, &t2, size, 512);
        let a = std::fs::read(&img).unwrap();
        let b = std::fs::read(&out).unwrap();
        assert_eq!(a.len(), b.len());
        let diff = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(diff, None, "{}: first differing byte", img.display());
        sgdisk_verify(out.to_str().unwrap());
    }
}

#[test]
fn gpt_names_attributes_guids() {
    let d = tmp();
    let img = gpt_sgdisk_image(d.path(), 64 * MIB);
    let g = Gpt::read(&open(&img), 512).unwrap().unwrap();
    assert_eq!(
        g.disk_guid.to_string(),
        "11111111-2222-3333-4444-555555555555"
    );
    let p2 = g.partitions.iter().find(|p| p.number == 2).unwrap();
    assert_eq!(p2.name, "root ü ∑ 日本");
    assert_eq!(p2.attributes, (1 << 60) | (1 << 2));
    assert_eq!(
        p2.type_guid.to_string(),
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    );
    let p5 = g.partitions.iter().find(|p| p.number == 5).unwrap();
    assert_eq!(p5.name, "swap");
    // sgdisk -i agrees on the unique GUID and the LBAs.
    let info = run(cmd("sgdisk").arg("-i2").arg(&img));
    assert!(
        info.contains(&format!("Partition unique GUID: {}", p2.unique_guid)),
        "{info}"
    );
    assert!(
        info.contains(&format!("First sector: {} ", p2.first_lba)),
        "{info}"
    );
    assert!(
        info.contains(&format!("Last sector: {} ", p2.last_lba)),
        "{info}"
    );
}

#[test]
fn gpt_grow_to_bigger_disk() {
    let d = tmp();
    let img = gpt_sfdisk_image(d.path(), 64 * MIB);
    let (t, _) = read_table(&img);
    let size = 200 * MIB + 7 * 512;
    let t2 = t.for_target(512, size, 512, true).unwrap();
    let out = d.path().join("grown.img");
    write_fresh(&out, &t2, size, 512);
    sgdisk_verify(out.to_str().unwrap());
    let (t3, _) = read_table(&out);
    assert_eq!(t3, t2);
    let PartitionTable::Gpt(g) = t3 else { panic!() };
    let last = g.partitions.iter().max_by_key(|p| p.last_lba).unwrap();
    assert_eq!((last.last_lba + 1) * 512 % MIB, 0, "end aligned to 1 MiB");
    assert!(last.last_lba <= g.last_usable_lba);
    assert!((g.last_usable_lba + 1) * 512 - (last.last_lba + 1) * 512 < MIB);
    assert_eq!(g.backup_lba, size / 512 - 1);
    // Other partitions did not move.
    let PartitionTable::Gpt(orig) = &t else {
        panic!()
    };
    for (a, b) in orig.partitions.iter().zip(&g.partitions) {
        assert_eq!(a.first_lba, b.first_lba);
        if a.number != last.number {
            assert_eq!(a.last_lba, b.last_lba);
        }
    }
    let dump = run(cmd("sfdisk").arg("-d").arg(&out));
    assert!(dump.contains("last-lba:"), "{dump}");
}

#[test]
fn gpt_smaller_target_is_refused_with_size() {
    let d = tmp();
    let img = gpt_sfdisk_image(d.path(), 64 * MIB);
    let (t, _) = read_table(&img);
    let err = t.for_target(512, 32 * MIB, 512, false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("too small") && msg.contains("bytes are needed"),
        "{msg}"
    );
    // Shrinking works exactly as far as the partitions plus the backup table still fit.
    let PartitionTable::Gpt(g) = &t else { panic!() };
    let end = g.partitions.iter().map(|p| p.last_lba + 1).max().unwrap() * 512;
    let needed = end + 33 * 512;
    assert!(needed < 64 * MIB);
    let small = t.for_target(512, needed, 512, false).unwrap();
    let out = d.path().join("small.img");
    write_fresh(&out, &small, needed, 512);
    sgdisk_verify(out.to_str().unwrap());
    let msg = format!(
        "{:#}",
        t.for_target(512, needed - 512, 512, false).unwrap_err()
    );
    assert!(msg.contains(&format!("at least {needed} bytes")), "{msg}");
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn gpt_512_to_4kn_and_back() {
    let d = tmp();
    let img = gpt_sfdisk_image(d.path(), 64 * MIB);
    let (t, _) = read_table(&img);
    let size = 96 * MIB;
    let t4 = t.for_target(512, size, 4096, true).unwrap();
    let out = d.path().join("4k.img");
    write_fresh(&out, &t4, size, 4096);
    // Our parser finds it at 4096 when told nothing.
    let (r, sector) = read_table(&out);
    assert_eq!(sector, 4096);
    assert_eq!(r, t4);
    {
        let lo = Loop::new(&out, 4096);
        sgdisk_verify(&lo.0);
        let dump = run(cmd("sfdisk").arg("-d").arg(&lo.0));
        assert!(dump.contains("sector-size: 4096"), "{dump}");
        let PartitionTable::Gpt(g) = &t4 else {
            panic!()
        };
        for p in &g.partitions {
            assert!(
                dump.contains(&format!("start={:>12}", p.first_lba)),
                "partition {} start {} not in\n{dump}",
                p.number,
                p.first_lba
            );
        }
    }
    // And back to 512-byte sectors: the byte layout is the same as the 4Kn one.
    let t5 = t4.for_target(4096, size, 512, false).unwrap();
    let back = d.path().join("512.img");
    write_fresh(&back, &t5, size, 512);
    sgdisk_verify(back.to_str().unwrap());
    let s4 = t4.partitions(4096);
    let s5 = t5.partitions(512);
    assert_eq!(
        s4.iter()
            .map(|p| (p.number, p.offset, p.size))
            .collect::<Vec<_>>(),
        s5.iter()
            .map(|p| (p.number, p.offset, p.size))
            .collect::<Vec<_>>()
    );
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn gpt_made_on_4kn_roundtrips_exactly() {
    let d = tmp();
    let img = d.path().join("k.img");
    sparse(&img, 64 * MIB);
    {
        let lo = Loop::new(&img, 4096);
        run_input(
            cmd("sfdisk").arg("-q").arg(&lo.0),
            Some(b"label: gpt\n,10M,U\n,,L\n"),
        );
    }
    let (t, sector) = read_table(&img);
    assert_eq!(sector, 4096);
    let t2 = t.for_target(4096, 64 * MIB, 4096, false).unwrap();
    let out = d.path().join("out.img");
    write_fresh(&out, &t2, 64 * MIB, 4096);
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&out).unwrap());
    // 4Kn -> 512 works (1 MiB alignment converts).
    let t5 = t.for_target(4096, 64 * MIB, 512, false).unwrap();
    let o5 = d.path().join("o5.img");
    write_fresh(&o5, &t5, 64 * MIB, 512);
    sgdisk_verify(o5.to_str().unwrap());
}

#[test]
fn gpt_unaligned_partition_does_not_convert_to_4k() {
    let d = tmp();
    let img = d.path().join("u.img");
    sparse(&img, 64 * MIB);
    run(cmd("sgdisk")
        .args(["-a1", "-n1:35:+1M", "-n2:4096:+1M"])
        .arg(&img));
    let (t, _) = read_table(&img);
    let e = format!(
        "{:#}",
        t.for_target(512, 64 * MIB, 4096, false).unwrap_err()
    );
    assert!(e.contains("partition 1") && e.contains("4096"), "{e}");
}

/// Recompute both CRCs of the header at `lba` (512-byte sectors) after editing the image.
fn fix_crcs(img: &Path, lba: u64) {
    let mut h = read_range(img, lba * 512, 512);
    let entries_lba = u64::from_le_bytes(h[72..80].try_into().unwrap());
    let n = u32::from_le_bytes(h[80..84].try_into().unwrap()) as usize;
    let sz = u32::from_le_bytes(h[84..88].try_into().unwrap()) as usize;
    let e = read_range(img, entries_lba * 512, n * sz);
    h[88..92].copy_from_slice(&crc32fast::hash(&e).to_le_bytes());
    h[16..20].fill(0);
    let c = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    apply(img, &[(lba * 512, h)]);
}

#[test]
fn gpt_damaged_primary_falls_back_to_backup() {
    let d = tmp();
    let pristine = gpt_sgdisk_image(d.path(), 64 * MIB);
    let good = Gpt::read(&open(&pristine), 512).unwrap().unwrap();
    let last = 64 * MIB / 512 - 1;
    let img = d.path().join("work.img");
    let fresh = || {
        std::fs::copy(&pristine, &img).unwrap();
        img.clone()
    };

    // Header CRC broken.
    let img = fresh();
    apply(&img, &[(512 + 40, vec![0x99])]);
    let g = Gpt::read(&open(&img), 512).unwrap().unwrap();
    assert_eq!(g.partitions, good.partitions);
    assert_eq!(g.disk_guid, good.disk_guid);
    assert!(
        g.notes
            .iter()
            .any(|n| n.contains("backup") && n.contains("CRC")),
        "{:?}",
        g.notes
    );
    // Writing it back repairs the primary exactly.
    let fixed = g.for_target(512, 64 * MIB, 512, false).unwrap();
    let out = d.path().join("fixed.img");
    write_fresh(&out, &PartitionTable::Gpt(fixed), 64 * MIB, 512);
    assert!(std::fs::read(&pristine).unwrap() == std::fs::read(&out).unwrap());

    // Entry array broken in the primary only.
    let img = fresh();
    apply(&img, &[(2 * 512 + 3, vec![0x42])]);
    let g = Gpt::read(&open(&img), 512).unwrap().unwrap();
    assert_eq!(g.partitions, good.partitions);
    assert!(
        g.notes.iter().any(|n| n.contains("entry array CRC32")),
        "{:?}",
        g.notes
    );

    // Primary signature wiped, protective MBR present: the backup is used.
    let img = fresh();
    apply(&img, &[(512, vec![0; 512])]);
    let g = Gpt::read(&open(&img), 512).unwrap().unwrap();
    assert_eq!(g.partitions, good.partitions);

    // Both broken: a clear error naming both.
    let img = fresh();
    apply(
        &img,
        &[(512 + 40, vec![0x99]), (last * 512 + 40, vec![0x99])],
    );
    let e = format!("{:#}", PartitionTable::read(&open(&img), None).unwrap_err());
    assert!(
        e.contains("LBA 1") && e.contains(&format!("LBA {last}")),
        "{e}"
    );

    // Backup damaged only: the primary is used and the damage noted.
    let img = fresh();
    apply(&img, &[(last * 512 + 40, vec![0x99])]);
    let g = Gpt::read(&open(&img), 512).unwrap().unwrap();
    assert_eq!(g.partitions, good.partitions);
    assert!(
        g.notes.iter().any(|n| n.contains("backup")),
        "{:?}",
        g.notes
    );
}

#[test]
fn gpt_bad_tables_are_refused() {
    let d = tmp();
    // Overlap: move partition 2's start into partition 1, in both copies, CRCs fixed.
    let img = gpt_sgdisk_image(d.path(), 64 * MIB);
    let g = Gpt::read(&open(&img), 512).unwrap().unwrap();
    let p1 = g.partitions.iter().find(|p| p.number == 1).unwrap().clone();
    let last = 64 * MIB / 512 - 1;
    for (hdr, arr) in [(1u64, 2u64), (last, last - 32)] {
        apply(
            &img,
            &[(
                arr * 512 + 128 + 32,
                (p1.last_lba - 5).to_le_bytes().to_vec(),
            )],
        );
        fix_crcs(&img, hdr);
    }
    let e = format!("{:#}", PartitionTable::read(&open(&img), None).unwrap_err());
    assert!(
        e.contains("partitions 1") && e.contains(" and 2 ") && e.contains("overlap"),
        "{e}"
    );

    // A partition past the last usable LBA.
    let img = gpt_sgdisk_image(d.path(), 64 * MIB);
    for (hdr, arr) in [(1u64, 2u64), (last, last - 32)] {
        apply(
            &img,
            &[(arr * 512 + 2 * 128 + 40, (last - 2).to_le_bytes().to_vec())],
        );
        fix_crcs(&img, hdr);
    }
    let e = format!("{:#}", Gpt::read(&open(&img), 512).unwrap_err());
    assert!(
        e.contains("partition 3") && e.contains("usable range"),
        "{e}"
    );

    // An entry array said to lie beyond the disk, in both headers.
    let img = gpt_sgdisk_image(d.path(), 64 * MIB);
    for hdr in [1u64, last] {
        apply(
            &img,
            &[(hdr * 512 + 72, (last + 100).to_le_bytes().to_vec())],
        );
        let mut h = read_range(&img, hdr * 512, 92);
        h[16..20].fill(0);
        let c = crc32fast::hash(&h);
        apply(&img, &[(hdr * 512 + 16, c.to_le_bytes().to_vec())]);
    }
    let e = format!("{:#}", Gpt::read(&open(&img), 512).unwrap_err());
    assert!(e.contains("beyond the disk"), "{e}");

    // A protective MBR with no GPT at all.
    let img = gpt_sgdisk_image(d.path(), 64 * MIB);
    apply(&img, &[(512, vec![0; 512]), (last * 512, vec![0; 512])]);
    let e = format!("{:#}", PartitionTable::read(&open(&img), None).unwrap_err());
    assert!(e.contains("protective MBR but no valid GPT"), "{e}");
}

fn mbr_image(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("mbr.img");
    sfdisk_image(
        &img,
        size,
        b"label: dos\nlabel-id: 0xdeadbeef\n,10M,c,*\n,9000M,83\n,,5\n,10M,7\n,20M,83\n,,82\n",
    );
    img
}

#[test]
fn mbr_exact_roundtrip_with_logicals() {
    let d = tmp();
    let size = 10 * 1024 * MIB;
    let img = mbr_image(d.path(), size);
    let (t, sector) = read_table(&img);
    assert_eq!(sector, 512);
    let PartitionTable::Mbr(m) = &t else {
        panic!("{t:?}")
    };
    assert_eq!(m.disk_signature, 0xdeadbeef);
    let nums: Vec<u32> = m.partitions.iter().map(|p| p.number).collect();
    assert_eq!(nums, vec![1, 2, 3, 5, 6, 7]);
    assert!(m.partitions[0].bootable);
    assert_eq!(m.partitions[0].kind, 0x0c);
    assert!(
        m.partitions.iter().all(|p| p.chs.is_none()),
        "sfdisk CHS is standard"
    );
    // sfdisk agrees on every start and size.
    let dump = run(cmd("sfdisk").arg("-d").arg(&img));
    for p in &m.partitions {
        let line = format!("start={:>12}, size={:>12}", p.first_lba, p.sectors);
        assert!(dump.contains(&line), "{line} not in\n{dump}");
    }
    let t2 = t.for_target(512, size, 512, false).unwrap();
    assert_eq!(t2, t);
    let out = d.path().join("out.img");
    write_fresh(&out, &t2, size, 512);
    for (a, b) in t.table_regions(size, 512) {
        assert_eq!(
            read_range(&img, a, (b - a) as usize),
            read_range(&out, a, (b - a) as usize),
            "table region {a}..{b}"
        );
    }
    let norm = |s: String, p: &Path| s.replace(p.to_str().unwrap(), "DEV");
    assert_eq!(
        norm(run(cmd("sfdisk").arg("-d").arg(&out)), &out),
        norm(dump, &img)
    );
    // table_regions: sector 0 past the boot code, and the three EBRs.
    let regions = t.table_regions(size, 512);
    assert_eq!(regions.len(), 4, "{regions:?}");
    assert_eq!(regions[0], (440, 512));
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn mbr_grow_logical_and_container_and_4kn() {
    let d = tmp();
    let img = d.path().join("m.img");
    sfdisk_image(
        &img,
        100 * MIB,
        b"label: dos\n,10M,83\n,,f\n,10M,7\n,20M,83\n",
    );
    let (t, _) = read_table(&img);
    let size = 300 * MIB + 4096;
    let g = t.for_target(512, size, 512, true).unwrap();
    let PartitionTable::Mbr(m) = &g else { panic!() };
    let ext = m.partitions.iter().find(|p| p.number == 2).unwrap();
    let l6 = m.partitions.iter().find(|p| p.number == 6).unwrap();
    assert_eq!((ext.first_lba + ext.sectors) * 512, 300 * MIB);
    assert_eq!(l6.first_lba + l6.sectors, ext.first_lba + ext.sectors);
    let out = d.path().join("g.img");
    write_fresh(&out, &g, size, 512);
    assert_eq!(read_table(&out).0, g);
    run(cmd("sfdisk").arg("-V").arg(&out));
    let dump = run(cmd("sfdisk").arg("-d").arg(&out));
    assert!(
        dump.contains(&format!(
            "start={:>12}, size={:>12}, type=83",
            l6.first_lba, l6.sectors
        )),
        "{dump}"
    );

    // 4Kn: sfdisk reads it back through a 4096-byte loop device.
    let k = t.for_target(512, size, 4096, true).unwrap();
    let out4 = d.path().join("k.img");
    write_fresh(&out4, &k, size, 4096);
    let PartitionTable::Mbr(m4) = &k else {
        panic!()
    };
    let lo = Loop::new(&out4, 4096);
    run(cmd("sfdisk").arg("-V").arg(&lo.0));
    let dump = run(cmd("sfdisk").arg("-d").arg(&lo.0));
    for p in &m4.partitions {
        let line = format!("start={:>12}, size={:>12}", p.first_lba, p.sectors);
        assert!(dump.contains(&line), "{line} not in\n{dump}");
    }
    assert_eq!(Mbr::read(&open(&out4), 4096).unwrap().as_ref(), Some(m4));
}

#[test]
fn mbr_grow_primary_and_refuse_small_or_huge() {
    let d = tmp();
    let img = d.path().join("p.img");
    sfdisk_image(&img, 64 * MIB, b"label: dos\n,10M,83\n,,7\n");
    let (t, _) = read_table(&img);
    let g = t.for_target(512, 128 * MIB, 512, true).unwrap();
    let PartitionTable::Mbr(m) = &g else { panic!() };
    assert_eq!(
        m.partitions[1].first_lba + m.partitions[1].sectors,
        128 * MIB / 512
    );
    let e = format!("{:#}", t.for_target(512, 32 * MIB, 512, false).unwrap_err());
    assert!(
        e.contains("too small") && e.contains(&(64 * MIB).to_string()),
        "{e}"
    );
    // Growing onto a 3 TiB disk stops at the 2^32-sector limit.
    let big = 3u64 << 40;
    let g = t.for_target(512, big, 512, true).unwrap();
    let PartitionTable::Mbr(m) = &g else { panic!() };
    let end = m.partitions[1].first_lba + m.partitions[1].sectors;
    assert!(end <= 1 << 32 && (1u64 << 32) - end < 2048, "{end}");
    assert!(g.to_disk(big, 512).is_ok());
}

fn entry(status: u8, kind: u8, start: u32, size: u32) -> Vec<u8> {
    let mut e = vec![status, 0, 0, 0, kind, 0, 0, 0];
    e.extend_from_slice(&start.to_le_bytes());
    e.extend_from_slice(&size.to_le_bytes());
    e
}

fn raw_mbr(path: &Path, entries: &[Vec<u8>]) {
    let mut s = vec![0u8; 512];
    for (i, e) in entries.iter().enumerate() {
        s[446 + 16 * i..462 + 16 * i].copy_from_slice(e);
    }
    s[510] = 0x55;
    s[511] = 0xAA;
    apply(path, &[(0, s)]);
}

#[test]
fn mbr_bad_tables_are_refused() {
    let d = tmp();
    let img = d.path().join("bad.img");
    sparse(&img, 64 * MIB);
    raw_mbr(
        &img,
        &[entry(0, 0x83, 2048, 20480), entry(0, 0x83, 10000, 20480)],
    );
    let e = format!("{:#}", PartitionTable::read(&open(&img), None).unwrap_err());
    assert!(
        e.contains("partition 1") && e.contains("partition 2") && e.contains("overlap"),
        "{e}"
    );

    raw_mbr(&img, &[entry(0, 0x83, 2048, 200_000)]);
    let e = format!("{:#}", Mbr::read(&open(&img), 512).unwrap_err());
    assert!(
        e.contains("partition 1") && e.contains("outside the disk"),
        "{e}"
    );

    // An EBR chain that loops back to itself.
    raw_mbr(&img, &[entry(0, 0x05, 4096, 100_000)]);
    let mut ebr = vec![0u8; 512];
    ebr[446..462].copy_from_slice(&entry(0, 0x83, 2048, 1000));
    ebr[462..478].copy_from_slice(&entry(0, 0x05, 0, 4000));
    ebr[510] = 0x55;
    ebr[511] = 0xAA;
    apply(&img, &[(4096 * 512, ebr.clone())]);
    let e = format!("{:#}", Mbr::read(&open(&img), 512).unwrap_err());
    assert!(e.contains("loops"), "{e}");

    // A logical partition outside its container.
    ebr[446..462].copy_from_slice(&entry(0, 0x83, 2048, 200_000));
    ebr[462..478].fill(0);
    apply(&img, &[(4096 * 512, ebr.clone())]);
    let e = format!("{:#}", Mbr::read(&open(&img), 512).unwrap_err());
    assert!(
        e.contains("logical partition 5") && e.contains("outside"),
        "{e}"
    );

    // An EBR without a signature.
    apply(&img, &[(4096 * 512 + 510, vec![0, 0])]);
    let e = format!("{:#}", Mbr::read(&open(&img), 512).unwrap_err());
    assert!(e.contains("0x55AA"), "{e}");

    // No signature at all: no table.
    apply(&img, &[(510, vec![0, 0])]);
    assert_eq!(read_table(&img).0, PartitionTable::None);
}

#[test]
fn filesystem_without_table_is_not_an_mbr() {
    let d = tmp();
    let img = d.path().join("fat.img");
    mkfs_image(&img, 64 * MIB, "mkfs.fat", &["-F", "32"]);
    assert_eq!(read_table(&img).0, PartitionTable::None);
    let img = d.path().join("ntfs.img");
    mkfs_image(&img, 64 * MIB, "mkntfs", &["-F", "-Q"]);
    assert_eq!(read_table(&img).0, PartitionTable::None);
}

#[test]
fn garbage_and_mutations_never_panic() {
    let d = tmp();
    let g = d.path().join("g.img");
    sparse(&g, 8 * MIB);
    run(cmd("sgdisk")
        .args(["-n1:2048:+1M", "-n2:0:+1M", "-c2:two", "-n3:0:0"])
        .arg(&g));
    let gbytes = std::fs::read(&g).unwrap();
    let m = d.path().join("m.img");
    sfdisk_image(
        &m,
        8 * MIB,
        b"label: dos\n,1M,83\n,,5\n,1M,83\n,1M,83\n,,83\n",
    );
    let mbytes = std::fs::read(&m).unwrap();
    let interesting: Vec<usize> = (0..34 * 512)
        .chain(gbytes.len() - 33 * 512..gbytes.len())
        .collect();
    let ebrs: Vec<usize> = (0..8 * MIB as usize / 512)
        .filter(|s| mbytes[s * 512 + 510..s * 512 + 512] == [0x55, 0xAA])
        .flat_map(|s| s * 512 + 440..s * 512 + 512)
        .collect();
    let rnd = pseudo_random(7, 3 * 4000);
    for i in 0..4000 {
        let (base, spots) = if i % 2 == 0 {
            (&gbytes, &interesting)
        } else {
            (&mbytes, &ebrs)
        };
        let mut b = base.clone();
        for k in 0..3 {
            let r = rnd[3 * i + k] as usize;
            let pos = spots[(r * 7919 + i * 104_729) % spots.len()];
            b[pos] ^= 1 << (r % 8);
        }
        for n in [b.len(), b.len() / 2, 4096, 1000, 0] {
            let slice = &b[..n];
            if let Ok((t, s)) = PartitionTable::read(&Bytes(slice), None) {
                let _ = t.table_regions(n as u64, s);
                if let Ok(t2) = t.for_target(s, n as u64, s, true) {
                    let _ = t2.to_disk(n as u64, s);
                }
                let _ = t.for_target(s, 16 * MIB, 4096, true);
            }
        }
    }
    let junk = pseudo_random(99, MIB as usize);
    for n in [0usize, 1, 511, 512, 4096, 70_000, MIB as usize] {
        let _ = PartitionTable::read(&Bytes(&junk[..n]), None);
    }
}

#[test]
fn gpt_regions_cover_what_to_disk_writes() {
    let d = tmp();
    let img = gpt_sgdisk_image(d.path(), 64 * MIB);
    let (t, s) = read_table(&img);
    let size = 64 * MIB;
    let regions = t.table_regions(size, s);
    // Sector 0's boot code (0..446) is data: a BIOS boot loader lives there.
    assert_eq!(regions, vec![(446, 34 * 512), (size - 33 * 512, size)]);
    for (off, b) in t.to_disk(size, s).unwrap() {
        let end = off + b.len() as u64;
        assert!(
            regions.iter().any(|&(a, z)| a <= off && end <= z),
            "patch {off}..{end} outside the regions"
        );
    }
}
