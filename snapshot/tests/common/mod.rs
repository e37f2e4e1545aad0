//! Helpers shared by the integration tests: run the real tools (failing loudly, naming the tool,
//! when one is missing), scratch images, loop devices, byte patches.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
