//! Helpers for tests: child processes with timeouts, free ports, static and appliance HTTP
//! servers, the workspace's binaries, sparse file copies.
//!
//! Functions named `must_*` and the [`Cmd`] runners panic with a message naming the command, its
//! exit status and output (tests may panic); the others return errors.

use crate::artifacts::Artifacts;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished (or killed) child left.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// stdout as bytes (binary output such as `ntfscat`).
    pub stdout_bytes: Vec<u8>,
    /// The child ran past its timeout and was killed.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success() && !self.timed_out
    }

    /// Exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout and stderr together, for searching.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// A description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}{} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.status,
            if self.timed_out {
                " (KILLED: timed out)"
            } else {
                ""
            },
            self.elapsed,
            tail(&self.stdout, 6000),
            tail(&self.stderr, 6000)
        )
    }

    /// Panic unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Output {
        if !self.success() {
            panic!("command failed\n{}", self.describe());
        }
        self
    }

    /// Panic if a Rust panic shows in the output.
    #[track_caller]
    pub fn no_panic(self) -> Output {
        if self.all().contains("panicked") || self.status.code() == Some(101) {
            panic!("the program panicked\n{}", self.describe());
        }
        self
    }
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Render a command line for messages.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Run `cmd` to completion or `timeout`, capturing its output. The child runs in its own process
/// group, which is killed (SIGKILL) on timeout, so grandchildren cannot keep the pipes open.
/// Errors only when the program cannot be started.
pub fn exec(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    exec_with_stdin(cmd, timeout, None)
}

/// [`exec`] with bytes written to the child's stdin.
pub fn exec_with_stdin(
    cmd: &mut Command,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
) -> Result<Output> {
    let line = cmdline(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "{}: program not found ({line})",
                cmd.get_program().to_string_lossy()
            )
        } else {
            anyhow::Error::new(e).context(format!("starting {line}"))
        }
    })?;
    let writer = stdin.map(|data| {
        let mut w = child.stdin.take().expect("piped stdin");
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&data);
        })
    });
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let (status, timed_out) = wait_timeout(&mut child, timeout)?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout_bytes = out.join().unwrap_or_default();
    Ok(Output {
        cmdline: line,
        status,
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
        stdout_bytes,
        timed_out,
        elapsed: start.elapsed(),
    })
}

/// Wait for `child` up to `timeout`; on timeout SIGKILL its process group (it must have been
/// started with `process_group(0)`) and reap it.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<(ExitStatus, bool)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().context("waiting for a child")? {
            return Ok((st, false));
        }
        if Instant::now() >= deadline {
            kill_group(child.id(), libc::SIGKILL);
            let st = child.wait().context("reaping a killed child")?;
            return Ok((st, true));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Send `sig` to the process group led by `pid` (a child we started with `process_group(0)`).
pub fn kill_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a negative pid addresses exactly the group our child leads.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// A command builder with a timeout that panics with a full description on failure.
pub struct Cmd {
    cmd: Command,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        let mut cmd = Command::new(program);
        cmd.env("LC_ALL", "C");
        Cmd {
            cmd,
            timeout: Duration::from_secs(120),
            stdin: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.cmd.arg(a);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, a: I) -> Cmd {
        self.cmd.args(a);
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.cmd.env(k, v);
        self
    }

    pub fn current_dir(mut self, d: impl AsRef<Path>) -> Cmd {
        self.cmd.current_dir(d);
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Cmd {
        self.timeout = t;
        self
    }

    pub fn command(&mut self) -> &mut Command {
        &mut self.cmd
    }

    /// Run to completion (or timeout); panics only if the program cannot be started.
    #[track_caller]
    pub fn run(mut self) -> Output {
        match exec_with_stdin(&mut self.cmd, self.timeout, self.stdin.take()) {
            Ok(o) => o,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Run and panic unless it succeeded.
    #[track_caller]
    pub fn ok(self) -> Output {
        self.run().ok()
    }

    /// Start it in the background (own process group, output to files under `logs`).
    pub fn spawn(mut self, logs: &Path, name: &str) -> Result<Background> {
        Background::start(&mut self.cmd, logs, name)
    }
}

/// A background child (a server, an ingest to kill). Killed and reaped on drop.
pub struct Background {
    pub child: Child,
    pub cmdline: String,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Background {
    pub fn start(cmd: &mut Command, logs: &Path, name: &str) -> Result<Background> {
        std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
        let stdout_path = logs.join(format!("{name}.stdout"));
        let stderr_path = logs.join(format!("{name}.stderr"));
        let line = cmdline(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {line}"))?;
        Ok(Background {
            child,
            cmdline: line,
            stdout_path,
            stderr_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Send `sig` to the child's process group.
    pub fn signal(&self, sig: i32) {
        kill_group(self.child.id(), sig);
    }

    /// Wait up to `timeout` (SIGKILL after it); returns the status and whether it timed out.
    pub fn wait(&mut self, timeout: Duration) -> Result<(ExitStatus, bool)> {
        wait_timeout(&mut self.child, timeout)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.try_status() {
            return Some(st);
        }
        self.signal(libc::SIGTERM);
        self.wait(grace).ok().map(|(st, _)| st)
    }

    pub fn describe(&self) -> String {
        format!(
            "command: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            tail(&self.stdout(), 4000),
            tail(&self.stderr(), 4000)
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// An HTTP server child process listening on 127.0.0.1:port; killed on drop.
pub struct HttpServer {
    pub proc: Background,
    pub port: u16,
    /// Base URL of the store it serves (`http://127.0.0.1:PORT` or `.../store`).
    pub url: String,
}

impl HttpServer {
    /// `python3 -m http.server` over `dir`: the store as any static server would serve it.
    pub fn python(dir: &Path, logs: &Path) -> Result<HttpServer> {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir);
        let proc = Background::start(&mut cmd, logs, &format!("python-http-{port}"))?;
        HttpServer::ready(proc, port, format!("http://127.0.0.1:{port}"))
    }

    /// As [`HttpServer::python`] over HTTPS with `cert` and `key` (PEM): `https://127.0.0.1:PORT`.
    pub fn python_tls(dir: &Path, logs: &Path, cert: &Path, key: &Path) -> Result<HttpServer> {
        const SERVER: &str = "import functools, http.server, ssl, sys\n\
            port, root, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]\n\
            h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)\n\
            s = http.server.ThreadingHTTPServer(('127.0.0.1', port), h)\n\
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            c.load_cert_chain(cert, key)\n\
            s.socket = c.wrap_socket(s.socket, server_side=True)\n\
            s.serve_forever()\n";
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args(["-c", SERVER])
            .arg(port.to_string())
            .arg(dir)
            .arg(cert)
            .arg(key);
        let proc = Background::start(&mut cmd, logs, &format!("python-https-{port}"))?;
        HttpServer::ready(proc, port, format!("https://127.0.0.1:{port}"))
    }

    /// `appliance serve --store STORE --listen 127.0.0.1:PORT`; the store is under `/store`.
    pub fn appliance(bin: &Path, store: &Path, logs: &Path) -> Result<HttpServer> {
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--store")
            .arg(store)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        let proc = Background::start(&mut cmd, logs, &format!("appliance-serve-{port}"))?;
        HttpServer::ready(proc, port, format!("http://127.0.0.1:{port}/store"))
    }

    /// `appliance serve --tls` with the store's own certificate (made by `appliance init` for
    /// this machine's names, 127.0.0.1 among them): `https://127.0.0.1:PORT/store`.
    pub fn appliance_tls(bin: &Path, store: &Path, logs: &Path) -> Result<HttpServer> {
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--tls")
            .arg("--store")
            .arg(store)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        let proc = Background::start(&mut cmd, logs, &format!("appliance-serve-tls-{port}"))?;
        HttpServer::ready(proc, port, format!("https://127.0.0.1:{port}/store"))
    }

    /// Wait until the port accepts connections (10 s), failing early if the process exits.
    fn ready(mut proc: Background, port: u16, url: String) -> Result<HttpServer> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = proc.try_status() {
                bail!(
                    "server exited ({st}) before listening on port {port}\n{}",
                    proc.describe()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(HttpServer { proc, port, url });
            }
            if Instant::now() > deadline {
                bail!(
                    "server not listening on port {port} after 10 s\n{}",
                    proc.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Paths of the workspace and its built binaries, from the running test executable.
pub struct Workspace;

impl Workspace {
    /// The workspace root (the directory of the top `Cargo.toml`).
    pub fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ has a parent")
            .to_path_buf()
    }

    /// `target/<profile>` of the running test binary (`.../target/debug/deps/x-hash` -> `.../target/debug`).
    pub fn profile_dir() -> PathBuf {
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe.parent().expect("exe dir");
        if dir.file_name() == Some(OsStr::new("deps")) {
            dir.parent().expect("profile dir").to_path_buf()
        } else {
            dir.to_path_buf()
        }
    }

    /// A binary of the workspace built next to the running test (`cargo build` builds it).
    #[track_caller]
    pub fn bin(name: &str) -> PathBuf {
        let p = Self::profile_dir().join(name);
        if !p.exists() {
            panic!(
                "{} not found: build it first (cargo build -p {name}) with the same target dir and profile",
                p.display()
            );
        }
        p
    }

    /// Where a test keeps its artifacts: `<workspace>/target/e2e/<test>/`, emptied first, removed
    /// when the test passes and kept when it fails ([`Artifacts`]).
    pub fn artifacts(test: &str) -> Artifacts {
        Artifacts::fresh(Self::root().join("target").join("e2e").join(test))
    }
}

/// Copy `len` bytes from `src` at `src_off` to `dst` at `dst_off`, leaving holes where the source
/// reads as zeros (the destination should be a new or sparse file).
pub fn copy_range_sparse(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> std::io::Result<()> {
    const BUF: usize = 1 << 20;
    let mut buf = vec![0u8; BUF];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(BUF as u64) as usize;
        src.read_exact_at(&mut buf[..n], src_off + done)?;
        for (k, piece) in buf[..n].chunks(64 << 10).enumerate() {
            if !is_zero(piece) {
                dst.write_all_at(piece, dst_off + done + (k * (64 << 10)) as u64)?;
            }
        }
        done += n as u64;
    }
    Ok(())
}

/// Whether `b` is all zeros (fast in unoptimised test builds too: it compares with memcmp).
pub fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Offset of the first occurrence of `needle` in `hay` (libc `memmem`: fast in debug builds).
pub fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    // SAFETY: both pointers and lengths come from live slices; memmem only reads them.
    let p = unsafe {
        libc::memmem(
            hay.as_ptr().cast(),
            hay.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    if p.is_null() {
        None
    } else {
        Some(p as usize - hay.as_ptr() as usize)
    }
}

/// Copy a file to a new sparse file of the same size.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<()> {
    let s = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = s.metadata()?.len();
    let d = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    d.set_len(len)?;
    copy_range_sparse(&s, 0, &d, 0, len)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))
}

/// Copy `len` bytes at `offset` of `src` into a new sparse file `dst` (a partition, say).
pub fn extract(src: &Path, offset: u64, len: u64, dst: &Path) -> Result<()> {
    let s = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let d = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    d.set_len(len)?;
    copy_range_sparse(&s, offset, &d, 0, len)
        .with_context(|| format!("extracting {} from {}", dst.display(), src.display()))
}

/// Offset of the first occurrence of `needle` in the file, read in pieces.
pub fn find_in_file(path: &Path, needle: &[u8]) -> Result<Option<u64>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    const BUF: usize = 4 << 20;
    let mut buf = vec![0u8; BUF + needle.len()];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off)?;
        if let Some(p) = find_bytes(&buf[..n], needle) {
            return Ok(Some(off + p as u64));
        }
        if n < buf.len() {
            break;
        }
        off += BUF as u64;
    }
    Ok(None)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Run `f` on a thread and wait at most `timeout` for it; panics (naming `what`) if it takes
/// longer, so an in-process call that hangs fails the test instead of blocking it forever.
#[track_caller]
pub fn with_timeout<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("{what}: still running after {timeout:?}"),
    }
}
