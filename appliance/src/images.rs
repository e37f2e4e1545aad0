//! Opening a SOURCE for ingest: raw image files and block devices directly; qcow2 and VMDK images
//! converted to a sparse raw file in the store's `tmp/` with `qemu-img` (the standard tool; its
//! output is removed when the ingest ends).
//!
//! Images come from others, and a qcow2 or VMDK can name other files that qemu would open and
//! read as disk data: a backing file (qcow2, a VMDK's `parentFileNameHint`), a qcow2 external data
//! file, a VMDK descriptor's extents (`FLAT "/etc/passwd"`). Before qemu sees an image, its
//! header or descriptor is read here and refused, in one line, when it names a backing file or an
//! external data file at all, or an extent that does not resolve (symlinks followed) inside the
//! image's own directory, or whose name qemu would read as a protocol (`nbd:`, `json:`). qemu then
//! opens the image through an explicit `json:` description with `"backing": null` and the
//! `file` driver, so nothing is opened implicitly; `qemu-img info` double-checks what it opened.

use anyhow::{anyhow, bail, Context, Result};
use snapshot::DiskSource;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Largest VMDK descriptor read (real ones are a few hundred bytes).
const MAX_DESCRIPTOR: u64 = 1 << 20;

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
    let spec = contained(path, format)?;
    let temp = TempFile(raw.clone());
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw", "-S", "64k"])
        .arg(&spec)
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

/// Check that the `format` image at `path` names no file qemu would read besides itself (and a
/// VMDK's extents beside it), and return the `json:` description qemu is to open it by.
fn contained(path: &Path, format: &str) -> Result<String> {
    let shown = path.display();
    let canon = path
        .canonicalize()
        .with_context(|| format!("{shown}: resolving its path"))?;
    let dir = canon
        .parent()
        .ok_or_else(|| anyhow!("{shown}: has no directory"))?
        .to_path_buf();
    let f = std::fs::File::open(&canon).with_context(|| format!("opening {shown}"))?;
    match format {
        "qcow2" => check_qcow2(&f)
            .map_err(|e| anyhow!("{shown}: {e} (images from others are opened alone)"))?,
        _ => {
            if let Some(desc) = vmdk_descriptor(&f)
                .with_context(|| format!("{shown}: reading its VMDK descriptor"))?
            {
                check_vmdk_descriptor(&desc, &dir)
                    .map_err(|e| anyhow!("{shown}: {e} (images from others may name only files in their own directory, {})", dir.display()))?;
            }
        }
    }
    let spec = format!(
        "json:{}",
        serde_json::json!({
            "driver": format,
            "backing": null,
            "file": { "driver": "file", "filename": canon.to_string_lossy() },
        })
    );
    // What qemu opened, as it reports it (without opening any backing file).
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&spec)
        .output()
        .context("running qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "{shown}: qemu-img info failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{shown}: reading qemu-img info's output"))?;
    if let Some(b) = info.get("backing-filename").and_then(|b| b.as_str()) {
        bail!("{shown}: has a backing file ({b:?}): refused (images from others are opened alone; flatten it first with qemu-img convert where it is trusted)");
    }
    let data = &info["format-specific"]["data"];
    if let Some(d) = data.get("data-file").and_then(|d| d.as_str()) {
        bail!("{shown}: keeps its data in an external data file ({d:?}): refused (images from others are opened alone)");
    }
    for e in data
        .get("extents")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
    {
        // (qemu names the image itself by its json: description.)
        if let Some(name) = e.get("filename").and_then(|n| n.as_str()) {
            if !name.starts_with("json:") {
                inside(Path::new(name), &dir).map_err(|e| anyhow!("{shown}: {e}"))?;
            }
        }
    }
    Ok(spec)
}

/// A qcow2 header naming a backing file or an external data file is refused.
fn check_qcow2(f: &std::fs::File) -> Result<()> {
    // Version 2 headers are 72 bytes, version 3 ones longer; every qcow2 file holds at least a
    // whole header cluster.
    let mut h = [0u8; 80];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| anyhow!("reading the qcow2 header: {e}"))?;
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let be64 = |o: usize| (u64::from(be32(o)) << 32) | u64::from(be32(o + 4));
    if be64(8) != 0 {
        bail!(
            "has a backing file (named at header byte {}): refused",
            be64(8)
        );
    }
    // Incompatible feature bit 2 (version 3): the guest data lives in an external data file.
    if be32(4) >= 3 && be64(72) & 4 != 0 {
        bail!("keeps its data in an external data file: refused");
    }
    Ok(())
}

/// The text descriptor of a VMDK: the whole file when it is a descriptor file, the embedded one
/// of a sparse extent (`KDMV`), `None` when there is none.
fn vmdk_descriptor(f: &std::fs::File) -> Result<Option<String>> {
    let mut head = [0u8; 512];
    let n = f.read_at(&mut head, 0)?;
    let head = &head[..n];
    let (off, len) = if head.starts_with(b"KDMV") && head.len() >= 44 {
        let le64 = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let (off, len) = (le64(28), le64(36));
        if off == 0 || len == 0 {
            return Ok(None);
        }
        (off.saturating_mul(512), len.saturating_mul(512))
    } else {
        (0, f.metadata()?.len())
    };
    if len > MAX_DESCRIPTOR {
        bail!("the descriptor is {len} bytes, more than a VMDK descriptor holds");
    }
    let mut buf = vec![0u8; len as usize];
    let n = f.read_at(&mut buf, off)?;
    buf.truncate(n);
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    buf.truncate(end);
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Every extent of a VMDK descriptor must be a file inside `dir`; a parent (backing file) is
/// refused.
fn check_vmdk_descriptor(desc: &str, dir: &Path) -> Result<()> {
    for line in desc.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        if !matches!(words.next(), Some("RW" | "RDONLY" | "NOACCESS")) {
            if let Some((key, value)) = line.split_once('=') {
                let value = value.trim().trim_matches('"');
                if key.trim().eq_ignore_ascii_case("parentFileNameHint") && !value.is_empty() {
                    bail!("has a backing file ({value:?}, its parentFileNameHint): refused");
                }
            }
            continue;
        }
        let kind = words.nth(1).unwrap_or("");
        let Some(name) = line.split('"').nth(1) else {
            if kind.eq_ignore_ascii_case("ZERO") {
                continue;
            }
            bail!("VMDK extent line {line:?} names no file");
        };
        inside(Path::new(name), dir)?;
    }
    Ok(())
}

/// `name` (relative to `dir`, or absolute) must be a plain path that resolves, symlinks
/// followed, inside `dir`.
fn inside(name: &Path, dir: &Path) -> Result<()> {
    let text = name.to_string_lossy();
    if text.contains(':') {
        bail!("VMDK extent {text:?}: qemu would read this name as a protocol, not a file: refused");
    }
    let full = if name.is_absolute() {
        name.to_path_buf()
    } else {
        dir.join(name)
    };
    let canon = full
        .canonicalize()
        .map_err(|e| anyhow!("VMDK extent {text:?}: {e}"))?;
    if !canon.starts_with(dir) || canon == dir {
        bail!(
            "VMDK extent {text:?} resolves to {}, outside the image's directory: refused",
            canon.display()
        );
    }
    Ok(())
}
