//! An appliance for end-to-end runs: a store holding one host, `appliance serve` (with the boot
//! files), behind a relay that notes the first chunk request. Used by the QEMU tests and the demo.
//!
//! With [`Options::tls`] it serves the store over HTTPS (`serve --tls --tls-listen`), with a
//! server certificate for 10.0.2.2 (the host as a QEMU guest on user networking sees it) signed
//! by a [`TestCa`] that stays the same across runs, so that a boot image carrying it
//! (`bootimg build --ca`) stays cached; the boot files are then also on a plain HTTP port that
//! serves nothing else, as iPXE fetches them.

use super::watch::ChunkWatch;
use crate::util::Background;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A store CA made once (by `appliance init`) under the fixtures cache and kept there.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate (what `bootimg build --ca` takes).
    pub pem: PathBuf,
    pub key: PathBuf,
}

/// The CA named `name` (`target/fixtures/tls-ca-<name>/`), made on first use.
pub fn test_ca(name: &str) -> Result<TestCa> {
    let cache = crate::fixtures::cache_dir();
    std::fs::create_dir_all(&cache)?;
    let dir = cache.join(format!("tls-ca-{name}"));
    let tls = dir.join("store/private/tls");
    let ca = TestCa {
        pem: tls.join("ca.pem"),
        key: tls.join("ca.key"),
    };
    let lock = std::fs::File::create(cache.join(format!("tls-ca-{name}.lock")))?;
    // SAFETY: flock on an open descriptor; released when `lock` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!(
            "locking {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    if ca.pem.exists() && ca.key.exists() {
        return Ok(ca);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let out = Command::new(super::bin("appliance")?)
        .arg("init")
        .arg("--store")
        .arg(dir.join("store"))
        .output()
        .context("running appliance init")?;
    if !out.status.success() || !ca.pem.exists() || !ca.key.exists() {
        bail!(
            "appliance init made no CA in {}: {}",
            tls.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ca)
}

/// How [`Appliance::start_with`] serves.
#[derive(Default, Clone, Copy)]
pub struct Options<'a> {
    /// `--boot DIR` (bootimg's output).
    pub boot: Option<&'a Path>,
    /// The relay's port (any free port when it is taken or 0).
    pub port: u16,
    /// HTTPS with a server certificate for 10.0.2.2 and 127.0.0.1 signed by this CA.
    pub tls: Option<&'a TestCa>,
}

pub struct Appliance {
    _serve: Background,
    /// The relay in front of the store (HTTPS under TLS).
    pub watch: ChunkWatch,
    /// The store URL as a QEMU guest on user networking sees it.
    pub url: String,
    /// What `appliance ingest` printed.
    pub ingest_summary: String,
    /// The store directory.
    pub store: PathBuf,
    /// Under TLS: the relay in front of the plain HTTP port that serves only `/boot/`.
    pub boot_watch: Option<ChunkWatch>,
    /// Where a guest fetches the boot files (`http://10.0.2.2:PORT/boot`): the plain port
    /// under TLS, else the store's port.
    pub boot_url: String,
    /// `appliance serve`'s stderr (its request log).
    pub log: PathBuf,
}

impl Appliance {
    /// Init a store in `dir/store`, ingest `source` as `host`, serve it (and `boot`) and put the
    /// relay on `port` (any free port when it is taken), plain HTTP.
    pub fn start(
        dir: &Path,
        host: &str,
        source: &Path,
        boot: Option<&Path>,
        port: u16,
    ) -> Result<Appliance> {
        Self::start_with(
            dir,
            host,
            source,
            Options {
                boot,
                port,
                tls: None,
            },
        )
    }

    /// As [`Appliance::start`], as `o` says.
    pub fn start_with(dir: &Path, host: &str, source: &Path, o: Options) -> Result<Appliance> {
        let bin = super::bin("appliance")?;
        let store = dir.join("store");
        let _ = std::fs::remove_dir_all(&store);
        let run = |args: &[&std::ffi::OsStr]| -> Result<String> {
            let out = Command::new(&bin)
                .args(args)
                .output()
                .context("running appliance")?;
            if !out.status.success() {
                bail!(
                    "appliance {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        run(&["init".as_ref(), "--store".as_ref(), store.as_os_str()])?;
        if let Some(ca) = o.tls {
            // The test CA instead of the one init made; `appliance tls` keeps an existing CA.
            let tls = store.join("private/tls");
            std::fs::copy(&ca.pem, tls.join("ca.pem"))?;
            std::fs::copy(&ca.key, tls.join("ca.key"))?;
            let said = run(&[
                "tls".as_ref(),
                "--store".as_ref(),
                store.as_os_str(),
                "--name".as_ref(),
                "10.0.2.2".as_ref(),
                "--name".as_ref(),
                "127.0.0.1".as_ref(),
            ])?;
            if !said.contains("(kept;") {
                bail!("appliance tls made a new CA instead of keeping the test CA: {said}");
            }
            if std::fs::read(&ca.pem)? != std::fs::read(tls.join("ca.pem"))? {
                bail!("appliance tls rewrote {}", tls.join("ca.pem").display());
            }
        }
        let ingest_summary = run(&[
            "ingest".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            "--host".as_ref(),
            host.as_ref(),
            source.as_os_str(),
        ])?;
        let upstream = crate::util::free_port();
        let plain = crate::util::free_port();
        let mut cmd = Command::new(&bin);
        cmd.arg("serve").arg("--store").arg(&store);
        if o.tls.is_some() {
            cmd.arg("--tls")
                .arg("--tls-listen")
                .arg(format!("127.0.0.1:{upstream}"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{plain}"));
        } else {
            cmd.arg("--listen").arg(format!("127.0.0.1:{upstream}"));
        }
        if let Some(b) = o.boot {
            cmd.arg("--boot").arg(b);
        }
        let mut serve = Background::start(&mut cmd, dir, "appliance-serve")?;
        let log = serve.stderr_path.clone();
        let ports = if o.tls.is_some() {
            vec![upstream, plain]
        } else {
            vec![upstream]
        };
        let t0 = Instant::now();
        while ports
            .iter()
            .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
        {
            if let Some(st) = serve.try_status() {
                bail!("appliance serve exited ({st}): {}", serve.describe());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("appliance serve not listening: {}", serve.describe());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let watch = if o.tls.is_some() {
            ChunkWatch::start_tls(o.port, upstream, &log)
                .or_else(|_| ChunkWatch::start_tls(0, upstream, &log))?
        } else {
            ChunkWatch::start(o.port, upstream).or_else(|_| ChunkWatch::start(0, upstream))?
        };
        let scheme = if o.tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://10.0.2.2:{}/store", watch.port);
        let (boot_watch, boot_url) = if o.tls.is_some() {
            let w = ChunkWatch::start(0, plain)?;
            let u = format!("http://10.0.2.2:{}/boot", w.port);
            (Some(w), u)
        } else {
            (None, format!("http://10.0.2.2:{}/boot", watch.port))
        };
        Ok(Appliance {
            _serve: serve,
            watch,
            url,
            ingest_summary,
            store,
            boot_watch,
            boot_url,
            log,
        })
    }
}
