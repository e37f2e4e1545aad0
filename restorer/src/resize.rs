//! Grow a filesystem into its bigger partition after the data is written and before the table is:
//! `resize2fs` for ext2/3/4 (after `e2fsck -fp`, which also replays a journal left by a live
//! snapshot), `ntfsresize` for NTFS, `mkswap` with the source's UUID and label for swap,
//! `xfs_growfs` for XFS (which grows only while mounted: mounted at a private directory for it).
//!
//! The tools run on a loop device over the partition's byte range of the target, so the same code
//! serves files and block devices and needs no partition table yet (the table is written last).

use crate::plan::{Resize, ResizeKind};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A loop device over part of a target, detached when dropped.
pub struct Loop(PathBuf);

impl Loop {
    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn attach(target: &Path, offset: u64, size: u64, sector: u32) -> Result<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--offset", &offset.to_string()])
            .args(["--sizelimit", &size.to_string()])
            .args(["--sector-size", &sector.to_string()])
            .arg(target)
            .stdin(Stdio::null())
            .output()
            .context("running losetup (util-linux)")?;
        if !out.status.success() {
            bail!(
                "losetup over {} at offset {offset}: {}",
                target.display(),
                last_line(&out.stderr)
            );
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Loop(PathBuf::from(dev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn last_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

/// Run a tool; `ok` decides which exit codes are success.
pub fn run(cmd: &mut Command, ok: impl Fn(i32) -> bool) -> Result<()> {
    let name = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {name}"))?;
    let code = out.status.code().unwrap_or(-1);
    if !ok(code) {
        let mut msg = last_line(&out.stderr);
        if msg.is_empty() {
            msg = last_line(&out.stdout);
        }
        bail!("{name} exited with {code}: {msg}");
    }
    Ok(())
}

/// Grow (or recreate) the filesystem of `r` on `target`; an LVM2 PV grows with the LV the plan
/// names. Returns a line for the summary, and a warning when only part of it could be done.
pub fn grow(target: &Path, sector: u32, r: &Resize) -> Result<(String, Option<String>)> {
    let lo = Loop::attach(target, r.offset, r.size, sector)?;
    let sizes = format!(
        "from {} to {}",
        crate::report::bytes(r.from_size),
        crate::report::bytes(r.size)
    );
    let what = match r.kind {
        ResizeKind::Ext => "ext filesystem",
        ResizeKind::Ntfs => "NTFS",
        ResizeKind::Swap => "swap",
        ResizeKind::Xfs => "XFS",
        ResizeKind::Lvm => {
            let (done, warning) = crate::lvm::grow(&lo, r.lv.as_ref())?;
            let line = format!("partition {}: {sizes}: {done}", r.partition);
            return Ok((line, warning));
        }
    };
    grow_fs(r.kind, lo.path(), r.uuid.as_deref(), r.label.as_deref())?;
    Ok((
        format!(
            "partition {}: {what} grown {sizes} ({})",
            r.partition,
            r.kind.tool()
        ),
        None,
    ))
}

/// Grow the filesystem on `dev` to the device's size (swap: recreate it with `uuid` and `label`).
pub fn grow_fs(
    kind: ResizeKind,
    dev: &Path,
    uuid: Option<&str>,
    label: Option<&str>,
) -> Result<()> {
    match kind {
        ResizeKind::Ext => {
            // 0: clean, 1: errors fixed, 2: fixed, reboot advised (not ours to reboot).
            run(Command::new("e2fsck").arg("-fp").arg(dev), |c| c <= 2)?;
            run(Command::new("resize2fs").arg(dev), |c| c == 0)
        }
        ResizeKind::Ntfs => run(
            Command::new("ntfsresize")
                .args(["--force", "--no-progress-bar"])
                .arg(dev),
            |c| c == 0,
        ),
        ResizeKind::Swap => {
            let mut c = Command::new("mkswap");
            if let Some(u) = uuid {
                c.args(["-U", u]);
            }
            if let Some(l) = label {
                c.args(["-L", l]);
            }
            run(c.arg(dev), |c| c == 0)
        }
        ResizeKind::Xfs => grow_xfs(dev),
        ResizeKind::Lvm => bail!("an LVM2 PV is not a filesystem"),
    }
}

/// XFS grows only while mounted: mount `dev` at a private directory (`nouuid`: the restoring
/// machine may have the source's filesystem mounted), `xfs_growfs`, unmount. Mounting replays a
/// log left by a crash, as the first boot would.
fn grow_xfs(dev: &Path) -> Result<()> {
    let supported = std::fs::read_to_string("/proc/filesystems")
        .map(|s| s.lines().any(|l| l.trim_end().ends_with("xfs")))
        .unwrap_or(false);
    if !supported
        && !Command::new("modprobe")
            .arg("xfs")
            .status()
            .is_ok_and(|s| s.success())
    {
        bail!("this kernel cannot mount XFS (no xfs module), and XFS grows only while mounted");
    }
    let dir = std::env::temp_dir().join(format!("bmr-xfs-grow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = (|| -> Result<()> {
        run(
            Command::new("mount")
                .args(["-t", "xfs", "-o", "nouuid"])
                .arg(dev)
                .arg(&dir),
            |c| c == 0,
        )?;
        let grown = run(Command::new("xfs_growfs").arg(&dir), |c| c == 0);
        let unmounted = run(Command::new("umount").arg(&dir), |c| c == 0);
        grown.and(unmounted)
    })();
    let _ = std::fs::remove_dir(&dir);
    r
}
