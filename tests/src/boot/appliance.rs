//! An appliance for end-to-end runs: a store holding one host, `appliance serve` (with the boot
//! files), behind a relay that notes the first chunk request. Used by the QEMU tests and the demo.

use super::watch::ChunkWatch;
use crate::util::Background;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Appliance {
    _serve: Background,
    pub watch: ChunkWatch,
    /// The store URL as a QEMU guest on user networking sees it.
    pub url: String,
    /// What `appliance ingest` printed.
    pub ingest_summary: String,
}

impl Appliance {
    /// Init a store in `dir/store`, ingest `source` as `host`, serve it (and `boot`) and put the
    /// relay on `port` (any free port when it is taken).
    pub fn start(
        dir: &Path,
        host: &str,
        source: &Path,
        boot: Option<&Path>,
        port: u16,
    ) -> Result<Appliance> {
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
        let ingest_summary = run(&[
            "ingest".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            "--host".as_ref(),
            host.as_ref(),
            source.as_os_str(),
        ])?;
        let upstream = crate::util::free_port();
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--store")
            .arg(&store)
            .arg("--listen")
            .arg(format!("127.0.0.1:{upstream}"));
        if let Some(b) = boot {
            cmd.arg("--boot").arg(b);
        }
        let serve = Background::start(&mut cmd, dir, "appliance-serve")?;
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", upstream)).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("appliance serve not listening: {}", serve.describe());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let watch =
            ChunkWatch::start(port, upstream).or_else(|_| ChunkWatch::start(0, upstream))?;
        let url = format!("http://10.0.2.2:{}/store", watch.port);
        Ok(Appliance {
            _serve: serve,
            watch,
            url,
            ingest_summary,
        })
    }
}
