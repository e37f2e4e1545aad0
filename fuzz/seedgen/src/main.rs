//! Seed corpora for the fuzz targets (docs/fuzzing.md), written to `fuzz/corpus/<target>/`:
//!
//! - partition tables and filesystems: the bytes the parsers actually read from the test
//!   fixtures (`bmr_tests::fixtures`, built or taken from their cache) and from small filesystems
//!   made here with mkfs, recorded through a `ReadAt` that logs every read and stored in the
//!   targets' sparse image format (fuzz/src/lib.rs), so a 200 MiB ext4 is a few KiB;
//! - qcow2: small images from `qemu-img`/`qemu-io` (512-byte clusters, v2 and v3);
//! - manifest, round, index, chunk: written by the library's own serialisers;
//! - HTTP: hand-written request heads; initramfs: newc archives, plain and compressed by the
//!   system's gzip, xz, zstd and lz4.
//!
//! Deterministic apart from what the tools put in (mkfs UUIDs are fixed where a flag allows).

use anyhow::{bail, Context, Result};
use snapshot::format::index::ChunkIndex;
use snapshot::format::{Digest, StoreInfo};
use snapshot::ptable::PartitionTable;
use snapshot::{ReadAt, Slot};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Seeds above this are skipped (the big FAT of a fixture): corpora stay small.
const MAX_SEED: usize = 80 << 10;

struct Recorder {
    file: File,
    base: u64,
    size: u64,
    reads: Mutex<Vec<(u64, u64)>>,
}

impl Recorder {
    fn new(path: &Path, base: u64, size: Option<u64>) -> Result<Recorder> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = match size {
            Some(s) => s,
            None => file.metadata()?.len(),
        };
        Ok(Recorder {
            file,
            base,
            size,
            reads: Mutex::new(Vec::new()),
        })
    }

    /// The recorded reads as a sparse seed: only the 512-byte blocks that are not all zeros.
    fn seed(&self) -> Result<Vec<u8>> {
        let mut r = self.reads.lock().unwrap().clone();
        r.sort_unstable();
        let mut blocks: Vec<u64> = Vec::new();
        for (s, e) in r {
            let mut b = s / 512;
            while b * 512 < e {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
                b += 1;
            }
        }
        blocks.sort_unstable();
        blocks.dedup();
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for b in blocks {
            let off = b * 512;
            let n = 512.min(self.size - off) as usize;
            let mut buf = vec![0u8; n];
            self.file.read_exact_at(&mut buf, self.base + off)?;
            if buf.iter().all(|&x| x == 0) {
                continue;
            }
            match runs.last_mut() {
                Some((o, v)) if *o + v.len() as u64 == off => v.extend_from_slice(&buf),
                _ => runs.push((off, buf)),
            }
        }
        Ok(encode(self.size, &runs))
    }
}

impl ReadAt for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        self.reads
            .lock()
            .unwrap()
            .push((offset, offset + buf.len() as u64));
        self.file.read_exact_at(buf, self.base + offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// The sparse image format of fuzz/src/lib.rs.
fn encode(size: u64, runs: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = size.to_le_bytes().to_vec();
    for (off, bytes) in runs {
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

struct Out {
    root: PathBuf,
    written: usize,
}

impl Out {
    fn put(&mut self, target: &str, name: &str, data: &[u8]) -> Result<()> {
        if data.len() > MAX_SEED {
            eprintln!(
                "seedgen: {target}/{name}: {} bytes, over {MAX_SEED}: skipped",
                data.len()
            );
            return Ok(());
        }
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), data)?;
        self.written += 1;
        eprintln!("seedgen: {target}/{name}: {} bytes", data.len());
        Ok(())
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn fs_target(kind: snapshot::fs::FsKind) -> &'static str {
    use snapshot::fs::FsKind::*;
    match kind {
        Ext2 | Ext3 | Ext4 => "ext",
        Ntfs => "ntfs",
        Fat12 | Fat16 | Fat32 => "fat",
        Swap => "swap",
        Xfs => "xfs",
    }
}

/// Record what `fs::probe` reads of the partition at `base`/`len` of `img`.
fn fs_seed(out: &mut Out, img: &Path, base: u64, len: u64, name: &str) -> Result<()> {
    let rec = Recorder::new(img, base, Some(len))?;
    let (kind, note) = match snapshot::fs::probe(&rec, 0, len) {
        snapshot::fs::Found::Known(p) => (p.fs.kind, String::new()),
        snapshot::fs::Found::Damaged { kind, reason } => (kind, format!(" (damaged: {reason})")),
        snapshot::fs::Found::Unknown => {
            eprintln!("seedgen: {name}: no filesystem recognised");
            return Ok(());
        }
    };
    if !note.is_empty() {
        eprintln!("seedgen: {name}{note}");
    }
    out.put(fs_target(kind), name, &rec.seed()?)
}

fn fixtures(out: &mut Out) -> Result<Vec<snapshot::Manifest>> {
    let mut manifests = Vec::new();
    for name in ["gpt_server", "mbr_mixed", "gpt_4k"] {
        let fx = bmr_tests::fixtures::by_name(name)?;
        let rec = Recorder::new(&fx.image, 0, None)?;
        let (table, sector) = PartitionTable::read(&rec, None)?;
        let target = match table {
            PartitionTable::Gpt(_) => "gpt",
            PartitionTable::Mbr(_) => "mbr",
            PartitionTable::None => bail!("{name}: no partition table"),
        };
        out.put(target, &format!("fixture-{name}"), &rec.seed()?)?;
        let mut partitions = table.partitions(sector);
        for p in &mut partitions {
            fs_seed(
                out,
                &fx.image,
                p.offset,
                p.size,
                &format!("fixture-{name}-p{}", p.number),
            )?;
            if let snapshot::fs::Found::Known(probe) = snapshot::fs::probe(&rec, p.offset, p.size) {
                p.fs = Some(probe.fs);
            }
        }
        let size = rec.size();
        manifests.push(snapshot::Manifest {
            version: snapshot::manifest::MANIFEST_VERSION,
            host: name.replace('_', "-"),
            snapshot: "20231114T221320Z".into(),
            created: "2023-11-14T22:13:20Z".into(),
            sequence: Some(manifests.len() as u64 + 1),
            firmware: if target == "gpt" {
                snapshot::manifest::Firmware::Uefi
            } else {
                snapshot::manifest::Firmware::Bios
            },
            hardware: snapshot::manifest::Hardware {
                storage: vec![snapshot::manifest::PciDevice {
                    pci_id: "1af4:1001".into(),
                    driver: Some("virtio_blk".into()),
                }],
                nics: vec![snapshot::manifest::Nic {
                    name: "enp0s3".into(),
                    mac: "52:54:00:12:34:56".into(),
                    pci_id: Some("8086:100e".into()),
                    driver: Some("e1000".into()),
                }],
            },
            chunk_size: snapshot::CHUNK_SIZE,
            disks: vec![snapshot::manifest::Disk {
                number: 0,
                size,
                logical_sector: sector,
                physical_sector: sector,
                table,
                partitions,
                index_sha256: hex(&Digest::of(b"index").0),
                totals: snapshot::manifest::DiskTotals {
                    used_bytes: size / 3,
                    data_chunks: 20,
                    zero_chunks: 3,
                    unused_chunks: size.div_ceil(snapshot::CHUNK_SIZE) - 23,
                    stored_bytes: 50 << 20,
                },
            }],
        });
    }
    Ok(manifests)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Small filesystems made here: each kind and layout the probes distinguish.
fn small_filesystems(out: &mut Out, dir: &Path) -> Result<()> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::write(tree.join("etc/hostname"), "fuzz\n")?;
    std::fs::write(tree.join("data.bin"), vec![0x5au8; 70_000])?;
    let mk = |name: &str, mib: u64| -> Result<PathBuf> {
        let p = dir.join(name);
        let f = File::create(&p)?;
        f.set_len(mib << 20)?;
        Ok(p)
    };
    let uuid = "0b4a3c1e-5a5a-4d22-8e33-00000000f022";
    let env = [("E2FSPROGS_FAKE_TIME", "1700000000")];
    for (name, mib, args) in [
        ("ext2-1k", 2, vec!["-t", "ext2", "-b", "1024"]),
        (
            "ext3-1k",
            4,
            vec!["-t", "ext3", "-b", "1024", "-J", "size=1"],
        ),
        (
            "ext4-1k",
            4,
            vec!["-t", "ext4", "-b", "1024", "-J", "size=1"],
        ),
        (
            "ext4-4k-flexbg",
            16,
            vec!["-t", "ext4", "-b", "4096", "-G", "4"],
        ),
        (
            "ext4-64bit-nocsum",
            8,
            vec![
                "-t",
                "ext4",
                "-b",
                "1024",
                "-O",
                "64bit,^metadata_csum",
                "-J",
                "size=1",
            ],
        ),
        (
            "ext4-sparse2-nojournal",
            8,
            vec![
                "-t",
                "ext4",
                "-b",
                "1024",
                "-O",
                "sparse_super2,^has_journal",
            ],
        ),
    ] {
        let p = mk(name, mib)?;
        let mut c = Command::new("mkfs.ext4");
        c.args([
            "-q",
            "-F",
            "-U",
            uuid,
            "-L",
            "fuzz",
            "-E",
            &format!("hash_seed={uuid}"),
        ]);
        c.args(&args).arg("-d").arg(&tree).arg(&p).envs(env);
        run(&mut c)?;
        let len = std::fs::metadata(&p)?.len();
        fs_seed(out, &p, 0, len, name)?;
    }
    for (name, mib, bits) in [("fat12", 1, "12"), ("fat16", 16, "16"), ("fat32", 36, "32")] {
        let p = mk(name, mib)?;
        let mut c = Command::new("mkfs.fat");
        c.args(["-F", bits, "-i", "1A2B3C4D", "-n", "FUZZ"]);
        if bits == "32" {
            c.args(["-s", "1"]);
        }
        run(c.arg(&p))?;
        run(Command::new("mmd").arg("-i").arg(&p).arg("::/EFI"))?;
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&p)
            .arg(tree.join("data.bin"))
            .arg("::/EFI/data.bin"))?;
        let len = std::fs::metadata(&p)?.len();
        fs_seed(out, &p, 0, len, name)?;
    }
    {
        let p = mk("ntfs", 4)?;
        run(Command::new("mkntfs")
            .args(["-q", "-F", "-f", "-L", "fuzz", "-s", "512", "-c", "4096"])
            .arg(&p))?;
        let _ = run(Command::new("ntfscp")
            .arg("-f")
            .arg(&p)
            .arg(tree.join("data.bin"))
            .arg("data.bin"));
        fs_seed(out, &p, 0, 4 << 20, "ntfs-4k")?;
        let p = mk("ntfs-c512", 2)?;
        run(Command::new("mkntfs")
            .args(["-q", "-F", "-f", "-s", "512", "-c", "512"])
            .arg(&p))?;
        fs_seed(out, &p, 0, 2 << 20, "ntfs-c512")?;
    }
    for (name, args) in [("swap-v1", vec![]), ("swap-label", vec!["-L", "fuzzswap"])] {
        let p = mk(name, 1)?;
        run(Command::new("mkswap")
            .args(["-q", "-U", uuid])
            .args(&args)
            .arg(&p))?;
        fs_seed(out, &p, 0, 1 << 20, name)?;
    }
    Ok(())
}

fn qcow2(out: &mut Out, dir: &Path) -> Result<()> {
    for (name, opts, io) in [
        (
            "v3-c512",
            "cluster_size=512",
            vec![
                "write -P 0xab 0 4k",
                "write -z 8k 4k",
                "write -P 0x11 900k 1k",
            ],
        ),
        (
            "v2-c512",
            "cluster_size=512,compat=0.10",
            vec!["write -P 0xcd 512 2k"],
        ),
        ("v3-c4k-empty", "cluster_size=4096", vec![]),
        (
            "v3-c1k-zeros",
            "cluster_size=1024",
            vec!["write -z 0 64k", "write -P 1 128k 1k"],
        ),
    ] {
        let p = dir.join(format!("{name}.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", opts])
            .arg(&p)
            .arg("1M"))?;
        for c in io {
            run(Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", c])
                .arg(&p))?;
        }
        let rec = Recorder::new(&p, 0, None)?;
        // Every block of the file: qcow2 images this small are their metadata.
        rec.reads.lock().unwrap().push((0, rec.size));
        out.put("qcow2", name, &rec.seed()?)?;
    }
    // With a backing file next to it (a name the fuzz target resolves in its scratch directory).
    let base = dir.join("base.raw");
    File::create(&base)?.set_len(1 << 20)?;
    let p = dir.join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-F",
            "raw",
            "-b",
            "base.raw",
        ])
        .arg(&p))?;
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 4k 1k"])
        .arg(&p))?;
    let rec = Recorder::new(&p, 0, None)?;
    rec.reads.lock().unwrap().push((0, rec.size));
    out.put("qcow2", "v3-backing-raw", &rec.seed()?)?;
    Ok(())
}

fn store_formats(out: &mut Out, manifests: &[snapshot::Manifest]) -> Result<()> {
    for m in manifests {
        out.put("manifest", &format!("{}.json", m.host), &m.to_bytes())?;
    }
    let store = serde_json::to_vec_pretty(&StoreInfo::new())?;
    out.put("manifest", "store.json", &store)?;

    for (name, size) in [
        ("empty", 0u64),
        ("one-slot", 4 << 20),
        ("partial", (10 << 20) + 4096),
    ] {
        let mut idx = ChunkIndex::new(size);
        if !idx.is_empty() {
            idx.set(0, Slot::Data(Digest::of(b"first chunk")));
        }
        if idx.len() > 1 {
            idx.set(1, Slot::Zeros);
        }
        out.put("index", name, &idx.to_bytes())?;
    }

    let text: Vec<u8> = (0..8192u32)
        .map(|i| b"abcdefgh\n"[(i % 9) as usize])
        .collect();
    let random: Vec<u8> = (0..1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for (name, data) in [
        ("zstd-text", text),
        ("raw-random", random),
        ("zstd-zeros", vec![0u8; 65536]),
        ("empty", Vec::new()),
    ] {
        out.put("chunk", name, &snapshot::encode_chunk(&data, 4))?;
    }

    let round = snapshot::round::Round {
        version: snapshot::round::ROUND_VERSION,
        vm: "web1-failover".into(),
        host: "web1".into(),
        snapshot: "20231114T221320Z".into(),
        round: 2,
        is_final: false,
        created: "2023-11-15T08:00:00Z".into(),
        disks: vec![snapshot::round::RoundDisk {
            number: 0,
            size: 335_544_320,
            index_sha256: hex(&Digest::of(b"round index").0),
            changed: vec![(0, 2), (17, 1), (70, 10)],
            changed_slots: 13,
            changed_stored_bytes: 9_000_000,
        }],
    };
    out.put("round", "round-2.json", &round.to_bytes())?;
    let mut last = round.clone();
    last.round = 3;
    last.is_final = true;
    last.disks[0].changed.clear();
    last.disks[0].changed_slots = 0;
    last.disks[0].changed_stored_bytes = 0;
    out.put("round", "round-3-final.json", &last.to_bytes())?;
    Ok(())
}

fn http(out: &mut Out) -> Result<()> {
    let seeds: &[(&str, &str)] = &[
        ("get", "GET /api/v1/hosts/web1/snapshots HTTP/1.1\r\nHost: appliance\r\nAuthorization: Bearer abc\r\n\r\n"),
        ("get-range", "GET /store/hosts/web1/20231114T221320Z/disk0.idx HTTP/1.1\r\nHost: a\r\nRange: bytes=0-63\r\nIf-None-Match: \"x\"\r\n\r\n"),
        ("head-http10", "HEAD /store/chunks/ab/abcd HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        ("post-length", "POST /api/v1/progress HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"state\":\"run\"}\n"),
        ("put-chunked", "PUT /api/v1/uploads/1/chunks/ab HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"),
        ("expect-continue", "PUT /api/v1/uploads/1/index HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nabcd"),
        ("pipelined", "GET /a HTTP/1.1\r\n\r\nGET /b?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ("leading-crlf", "\r\nGET / HTTP/1.1\r\n\r\n"),
        ("lf-only", "GET /x HTTP/1.1\nHost: a\n\n"),
        ("cl-list", "POST /p HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc"),
        ("te-and-cl", "POST /p HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("http2", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ];
    for (name, s) in seeds {
        out.put("http_head", name, s.as_bytes())?;
    }
    Ok(())
}

fn newc(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut v = Vec::new();
    let trailer: (&str, &[u8]) = ("TRAILER!!!", b"");
    for (i, (name, body)) in files.iter().chain([&trailer]).enumerate() {
        let mode = if name.ends_with('/') {
            0o40755
        } else {
            0o100644
        };
        let name = name.trim_end_matches('/');
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            i,
            mode,
            0,
            0,
            1,
            1_700_000_000u32,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        v.extend_from_slice(hdr.as_bytes());
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(body);
        while v.len() % 4 != 0 {
            v.push(0);
        }
    }
    v
}

fn compress(dir: &Path, tool: &[&str], data: &[u8]) -> Result<Vec<u8>> {
    let p = dir.join("cpio");
    std::fs::write(&p, data)?;
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(&p)
        .output()
        .with_context(|| format!("running {}", tool[0]))?;
    if !out.status.success() {
        bail!("{} failed", tool[0]);
    }
    Ok(out.stdout)
}

fn initramfs(out: &mut Out, dir: &Path) -> Result<()> {
    let early = newc(&[
        ("kernel/", b""),
        (
            "kernel/x86/microcode/GenuineIntel.bin",
            b"\x01\x00\x00\x00ucode",
        ),
    ]);
    let main = newc(&[
        ("./init", b"#!/bin/sh\nexec /sbin/init\n"),
        (
            "usr/lib/modules/6.1.0-13-amd64/kernel/drivers/nvme/host/nvme.ko",
            b"\x7fELF",
        ),
        (
            "usr/lib/modules/6.1.0-13-amd64/kernel/drivers/net/e1000e.ko.xz",
            b"\xfd7zXZ\0",
        ),
        (
            "usr/lib/modules/6.1.0-13-amd64/modules.alias",
            b"alias pci:v00008086d* e1000e\n",
        ),
        ("etc/", b""),
    ]);
    out.put("initramfs", "cpio", &main)?;
    let mut v = early.clone();
    v.extend_from_slice(&main);
    out.put("initramfs", "early-then-main", &v)?;
    for (name, tool) in [
        ("gzip", &["gzip", "-9", "-n", "-c"][..]),
        ("xz", &["xz", "--check=crc32", "-c"][..]),
        ("zstd", &["zstd", "-q", "-c"][..]),
        ("lz4-legacy", &["lz4", "-l", "-q", "-c"][..]),
    ] {
        let mut v = early.clone();
        v.extend_from_slice(&compress(dir, tool, &main)?);
        out.put("initramfs", &format!("early-{name}"), &v)?;
    }
    // An extra segment appended after a compressed one, as drivers-inject writes.
    let mut v = compress(dir, &["gzip", "-n", "-c"], &main)?;
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v.extend_from_slice(&newc(&[(
        "usr/lib/modules/6.1.0-13-amd64/extra/igc.ko",
        b"ko",
    )]));
    out.put("initramfs", "gzip-then-cpio", &v)?;
    Ok(())
}

fn main() -> Result<()> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus"));
    let scratch = tempdir()?;
    let mut out = Out { root, written: 0 };
    let manifests = fixtures(&mut out)?;
    small_filesystems(&mut out, &scratch)?;
    qcow2(&mut out, &scratch)?;
    store_formats(&mut out, &manifests)?;
    http(&mut out)?;
    initramfs(&mut out, &scratch)?;
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "seedgen: {} seeds written under {}",
        out.written,
        out.root.display()
    );
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("bmr-seedgen-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
