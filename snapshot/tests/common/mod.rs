//! Helpers shared by the integration tests: run the real tools (failing loudly, naming the tool,
//! when one is missing), scratch images, loop devices, byte patches, and the probes and checks
//! the filesystem tests share.
#![allow(dead_code)]

use snapshot::fs::{Found, Probe};
use snapshot::{DiskSource, ReadAt};
use std::collections::HashMap;
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const MIB: u64 = 1 << 20;

/// Path of a required tool; panics naming it when it is not installed.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("required tool `{name}` is not installed (these tests need it; they are never skipped)");
}

pub fn cmd(name: &str) -> Command {
    let mut c = Command::new(tool(name));
    c.env("LC_ALL", "C");
    c
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run, require success, return stdout.
pub fn run(c: &mut Command) -> String {
    run_input(c, None)
}

/// Run with `input` on stdin, require success, return stdout.
pub fn run_input(c: &mut Command, input: Option<&[u8]>) -> String {
    let (code, out, err) = run_status(c, input);
    assert!(
        code == Some(0),
        "`{}` failed ({code:?}):\n{out}\n{err}",
        describe(c)
    );
    out
}

/// Run and return (exit code, stdout, stderr) without judging.
pub fn run_status(c: &mut Command, input: Option<&[u8]>) -> (Option<i32>, String, String) {
    c.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(c)));
    if let Some(i) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(i).expect("write stdin");
    }
    let o = child.wait_with_output().expect("wait");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A sparse zero file of `size` bytes.
pub fn sparse(path: &Path, size: u64) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("snapshot-test-")
        .tempdir()
        .expect("tempdir")
}

/// A new sparse image of `size` bytes at `path`, formatted by `tool args… path` (mkfs.*,
/// mkntfs, mkswap).
pub fn mkfs_image(path: &Path, size: u64, tool: &str, args: &[&str]) {
    sparse(path, size);
    run(cmd(tool).args(args).arg(path));
}

/// A scratch directory holding a test tree ([`make_tree`] at `scale`), and the tree's path.
pub fn tmp_with_tree(scale: usize) -> (tempfile::TempDir, PathBuf) {
    let d = tmp();
    let tree = d.path().join("tree");
    make_tree(&tree, scale);
    (d, tree)
}

/// An empty directory at `path`, whatever was there before.
pub fn fresh_dir(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path).unwrap();
}

/// Apply byte patches to a file.
pub fn apply(path: &Path, patches: &[(u64, Vec<u8>)]) {
    let f = OpenOptions::new().write(true).open(path).expect("open");
    for (off, b) in patches {
        f.write_all_at(b, *off).expect("patch");
    }
}

pub fn read_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).expect("read");
    b
}

/// Copy `[start, end)` byte ranges of `src` into `dst` (same offsets).
pub fn copy_ranges(src: &Path, dst: &Path, ranges: &[(u64, u64)]) {
    let s = File::open(src).expect("open src");
    let d = OpenOptions::new().write(true).open(dst).expect("open dst");
    let mut buf = vec![0u8; 1 << 20];
    for &(a, b) in ranges {
        let mut off = a;
        while off < b {
            let n = ((b - off) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], off).expect("read src");
            d.write_all_at(&buf[..n], off).expect("write dst");
            off += n as u64;
        }
    }
}

/// A loop device over an image file, detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn new(image: &Path, sector: u32) -> Loop {
        let out = run(cmd("losetup")
            .args(["-f", "--show", "-b", &sector.to_string()])
            .arg(image));
        Loop(out.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(tool("losetup")).args(["-d", &self.0]).status();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A borrowed byte slice as a disk.
pub struct Bytes<'a>(pub &'a [u8]);

impl snapshot::ReadAt for Bytes<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

/// A directory tree of test files (deterministic contents): many small files, a few large ones,
/// nested directories, an empty file, a file of zeros.
pub fn make_tree(dir: &Path, scale: usize) {
    std::fs::create_dir_all(dir.join("sub/deeper/deepest")).unwrap();
    for i in 0..40 * scale {
        let n = (i * 7919) % 20_000;
        std::fs::write(
            dir.join(format!("small-{i:04}.dat")),
            pseudo_random(i as u64 + 1, n),
        )
        .unwrap();
    }
    std::fs::write(dir.join("big.bin"), pseudo_random(4242, 3_000_000 * scale)).unwrap();
    std::fs::write(
        dir.join("sub/deeper/medium.bin"),
        pseudo_random(77, 700_001),
    )
    .unwrap();
    std::fs::write(dir.join("sub/deeper/deepest/hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(dir.join("sub/empty"), b"").unwrap();
    std::fs::write(dir.join("zeros.bin"), vec![0u8; 200_000]).unwrap();
}

/// Every regular file under `dir`, as relative paths, sorted.
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(base, &e.path(), out);
            } else if t.is_file() {
                out.push(e.path().strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Copy only `used` (byte ranges relative to the partition at `offset`) of `src` into a zeroed
/// image of the same size at `dst`.
pub fn copy_used(src: &Path, dst: &Path, used: &snapshot::Extents, offset: u64) {
    let size = std::fs::metadata(src).unwrap().len();
    sparse(dst, size);
    let r: Vec<(u64, u64)> = used
        .ranges()
        .iter()
        .map(|&(a, b)| (a + offset, b + offset))
        .collect();
    copy_ranges(src, dst, &r);
}

/// Parse "a-b, c, d-e" (inclusive ranges) into half-open ranges.
pub fn parse_ranges(s: &str) -> Vec<(u64, u64)> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| match x.split_once('-') {
            Some((a, b)) => (a.parse().unwrap(), b.parse::<u64>().unwrap() + 1),
            None => {
                let a: u64 = x.parse().unwrap();
                (a, a + 1)
            }
        })
        .collect()
}

/// `[0, total)` minus `free` (sorted, non-overlapping).
pub fn complement(free: &[(u64, u64)], total: u64) -> Vec<(u64, u64)> {
    let mut f = free.to_vec();
    f.sort();
    let mut out = Vec::new();
    let mut at = 0;
    for (a, b) in f {
        if a > at {
            out.push((at, a));
        }
        at = at.max(b);
    }
    if at < total {
        out.push((at, total));
    }
    out
}

/// What blkid (`-p -o export`) says of an image: TYPE, UUID, LABEL, VERSION and the rest.
pub fn blkid(img: &Path) -> HashMap<String, String> {
    run(cmd("blkid").args(["-p", "-o", "export"]).arg(img))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("\\ ", " ")))
        .collect()
}

/// What our filesystem probe finds in the `len` bytes of `img` from `offset`.
pub fn probe_at(img: &Path, offset: u64, len: u64) -> Found {
    snapshot::fs::probe(&DiskSource::open(img).unwrap(), offset, len)
}

/// The filesystem our probe finds in the `len` bytes of `img` from `offset`; panics on anything
/// else.
pub fn known_at(img: &Path, offset: u64, len: u64) -> Probe {
    match probe_at(img, offset, len) {
        Found::Known(p) => p,
        other => panic!("{}: {other:?}", img.display()),
    }
}

/// The filesystem that fills the whole image `img`; panics when the probe finds none.
pub fn known(img: &Path) -> Probe {
    let len = std::fs::metadata(img).unwrap().len();
    known_at(img, 0, len)
}

/// Panics unless the probe of the first `len` bytes of `img` reports damage whose reason
/// mentions every one of `what`.
pub fn expect_damaged(img: &Path, len: u64, what: &[&str]) {
    match probe_at(img, 0, len) {
        Found::Damaged { reason, .. } => {
            for w in what {
                assert!(reason.contains(w), "{reason:?} should mention {w:?}");
            }
        }
        other => panic!("expected damage mentioning {what:?}, got {other:?}"),
    }
}

/// Put the filesystem image `fsimg` 1 MiB into a new `disk_size`-byte image `disk`, in a
/// partition of `part_len` bytes; returns the probes of the filesystem alone and of the partition.
pub fn probe_in_partition(
    fsimg: &Path,
    disk: &Path,
    disk_size: u64,
    part_len: u64,
) -> (Probe, Probe) {
    let whole = known(fsimg);
    sparse(disk, disk_size);
    apply(disk, &[(MIB, std::fs::read(fsimg).unwrap())]);
    (whole, known_at(disk, MIB, part_len))
}

/// Panics unless `p` maps as used exactly what `before` does plus `[from, to)`; `what` names the
/// case in the message.
pub fn assert_used_plus(p: &Probe, before: &Probe, (from, to): (u64, u64), what: impl Display) {
    let mut expect = before.used.clone();
    expect.add(from, to);
    assert_eq!(p.used, expect, "{what}");
}

/// Copy only the used ranges of the filesystem filling `img` to `work/copy.img`; returns its path.
pub fn used_copy(img: &Path, p: &Probe, work: &Path) -> PathBuf {
    let copy = work.join("copy.img");
    copy_used(img, &copy, &p.used, 0);
    copy
}

/// Panics unless every file of `tree` is under `copy` with the same bytes; `what` names the
/// image in messages.
pub fn assert_same_files(tree: &Path, copy: &Path, what: impl Display) {
    let files = list_files(tree);
    assert!(!files.is_empty(), "{what}: no files in {}", tree.display());
    for f in &files {
        let a = std::fs::read(tree.join(f)).unwrap();
        let b =
            std::fs::read(copy.join(f)).unwrap_or_else(|e| panic!("{what}: {}: {e}", f.display()));
        assert!(a == b, "{what}: file {} differs in the copy", f.display());
    }
}

/// Bit-flip fuzzing: `rounds` times, flip `flips` bits of a copy of `base`, run `probe` on it
/// (it must not panic, whatever it returns) and restore the bytes. Flip `k` of round `i` takes
/// `r = rnd[(flips * i + k) % rnd.len()]` and flips bit `r % 8` of byte
/// `spot(r * 7919 + i * 104_729)`.
pub fn flip_bits<T>(
    base: &[u8],
    rnd: &[u8],
    rounds: usize,
    flips: usize,
    spot: impl Fn(usize) -> usize,
    probe: impl Fn(&dyn ReadAt, u64, u64) -> T,
) {
    let mut b = base.to_vec();
    for i in 0..rounds {
        let mut flipped = Vec::new();
        for k in 0..flips {
            let r = rnd[(flips * i + k) % rnd.len()] as usize;
            let pos = spot(r * 7919 + i * 104_729);
            b[pos] ^= 1 << (r % 8);
            flipped.push(pos);
        }
        let _ = probe(&Bytes(&b), 0, b.len() as u64);
        for pos in flipped {
            b[pos] = base[pos];
        }
    }
}
