//! Opening a SOURCE for ingest: raw image files and block devices directly; qcow2 and VMDK images
//! converted to a sparse raw file in the store's `tmp/` with `qemu-img` (the standard tool; its
//! output is removed when the ingest ends).

use anyhow::{bail, Context, Result};
use snapshot::DiskSource;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A source disk and, for converted images, the temporary raw file removed when it is dropped.
pub struct Opened {
    pub disk: DiskSource,
    _temp: Option<TempFile>,
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn container_format(path: &Path) -> Result<Option<&'static str>> {
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f
        .read(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    let head = &head[..n];
    Ok(if head.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        Some("vmdk")
    } else {
        None
    })
}

pub fn open(path: &Path, tmp_dir: &Path) -> Result<Opened> {
    let meta = std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
    let format = if meta.is_file() {
        container_format(path)?
    } else {
        None
    };
    let Some(format) = format else {
        return Ok(Opened {
            disk: DiskSource::open(path)?,
            _temp: None,
        });
    };
    let raw = tmp_dir.join(format!(
        "convert-{}-{}.raw",
        std::process::id(),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("disk")
    ));
    eprintln!(
        "{}: {format} image, converting to raw with qemu-img",
        path.display()
    );
    let temp = TempFile(raw.clone());
    let out = Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw", "-S", "64k"])
        .arg(path)
        .arg(&raw)
        .output()
        .context("running qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "{}: qemu-img convert failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Opened {
        disk: DiskSource::open(&raw)?,
        _temp: Some(temp),
    })
}
