//! The Windows half of the adaptation: every NTFS volume of the restored disks that holds a
//! Windows is mounted with ntfs-3g, the drivers for this machine's boot controllers and NICs
//! are chosen from the repository `--drivers` names (a folder, a tarball or a tarball's URL)
//! and injected offline (drivers-inject's `windows`), and the plan, with every original, goes
//! into the report.

use crate::cli::AdaptOptions;
use anyhow::{bail, Context, Result};
use drivers_inject::windows::hive::Data;
use drivers_inject::windows::inject::{self, Plan, Source};
use drivers_inject::windows::offline::{find_ci, WindowsVolume};
use drivers_inject::windows::{choose, repo::Repo};
use drivers_inject::{Inventory, Volume};
use serde::Serialize;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What was done (or planned) to one Windows volume.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// `/dev/nvme0n1p3`
    pub volume: String,
    pub plan: Plan,
    /// What drives each device.
    pub drivers: Vec<String>,
    /// Boot controllers with no driver.
    pub missing: Vec<String>,
}

/// Everything the Windows adaptation needs besides the volumes.
pub struct Request<'a> {
    pub inventory: &'a Inventory,
    /// PCI addresses of the restored disks' controllers; empty: every storage controller.
    pub boot: Vec<String>,
    pub options: &'a AdaptOptions,
    pub net: snapshot::store::http::Options,
    pub dry_run: bool,
    pub work: &'a Path,
}

/// A FUSE mount, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn ntfs(device: &str, dir: &Path, read_only: bool, force: bool) -> Result<Mount> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut o = vec![if read_only { "ro" } else { "rw" }, "noatime"];
        if force && !read_only {
            o.push("remove_hiberfile");
        }
        let out = Command::new("ntfs-3g")
            .arg("-o")
            .arg(o.join(","))
            .arg(device)
            .arg(dir)
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    anyhow::anyhow!("ntfs-3g not found (Debian: ntfs-3g; the boot image has it)")
                }
                _ => anyhow::Error::new(e).context("running ntfs-3g"),
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed");
            let hint = if err.contains("hibernat") || err.contains("unclean") {
                ": Windows was hibernated or shut down with Fast Startup; boot it and shut it \
                 down fully, or --windows-force (the hibernated session is lost)"
            } else {
                ""
            };
            bail!("ntfs-3g {device}: {first}{hint}");
        }
        Ok(Mount(dir.to_path_buf()))
    }

    fn unmount(self) -> Result<()> {
        let dir = self.0.clone();
        std::mem::forget(self);
        umount(&dir)
    }
}

fn umount(dir: &Path) -> Result<()> {
    // fuseblk: umount returns once ntfs-3g has written everything back.
    let out = Command::new("umount")
        .arg(dir)
        .output()
        .context("running umount")?;
    if !out.status.success() {
        bail!(
            "umount {}: {} (the Windows edits may not all be on disk)",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = umount(&self.0);
    }
}

/// Adapts every Windows found on `volumes`; none found is an empty list. NTFS volumes that
/// cannot be looked into are added to `warnings`.
pub fn adapt(volumes: &[Volume], r: &Request, warnings: &mut Vec<String>) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    let mut repo: Option<Repo> = None;
    let force = r.options.windows_force;
    for (i, v) in volumes.iter().enumerate() {
        match v.fstype.as_deref() {
            Some("ntfs") => {}
            Some("BitLocker") => {
                warnings.push(format!(
                    "{}: BitLocker-encrypted, not looked into: a Windows on it keeps its old \
                     drivers (suspend BitLocker on the source before the backup to adapt it)",
                    v.device
                ));
                continue;
            }
            _ => continue,
        }
        let dir = r.work.join(format!("ntfs-{i}"));
        // Look and plan on a read-only mount: most NTFS volumes (data, recovery) hold no
        // Windows, and a Windows that already has what this machine needs is not written
        // at all (a read-write mount alone changes bytes).
        let probe = match Mount::ntfs(&v.device, &dir, true, false) {
            Ok(m) => m,
            Err(e) => {
                warnings.push(format!("{}: not looked into: {e:#}", v.device));
                continue;
            }
        };
        if find_ci(&dir, "Windows/System32/config/SYSTEM")?.is_none() {
            probe.unmount()?;
            continue;
        }
        if let (None, Some(spec)) = (&repo, &r.options.drivers) {
            repo = Some(load(spec, &r.net, r.work)?);
        }
        let what = || format!("the Windows on {}", v.device);
        let vol = WindowsVolume::open(&dir, force).with_context(what)?;
        let choice = choose::choose(r.inventory, &r.boot, repo.as_ref(), &vol.target)?;
        let opts = inject::Options {
            dry_run: true,
            ..Default::default()
        };
        let mut plan = inject::plan(&vol, &choice.devices, &opts).with_context(what)?;
        drop(vol);
        probe.unmount()?;
        if !r.dry_run && !plan.is_empty() {
            let mount = Mount::ntfs(&v.device, &dir, false, force)
                .with_context(|| format!("mounting the Windows volume {} to write", v.device))?;
            let vol = WindowsVolume::open(&dir, force).with_context(what)?;
            let opts = inject::Options {
                dry_run: false,
                ..Default::default()
            };
            plan = inject::inject(&vol, &choice.devices, &opts)
                .with_context(|| format!("injecting drivers into {}", what()))?;
            drop(vol);
            mount.unmount()?;
        }
        out.push(Outcome {
            volume: v.device.clone(),
            plan,
            drivers: choice.lines,
            missing: choice.missing,
        });
    }
    Ok(out)
}

/// The driver repository `spec` names: a folder, a tarball (plain, gzip or zstd), or the
/// URL of one (http or https, with the restore's token and CA).
pub fn load(spec: &str, net: &snapshot::store::http::Options, work: &Path) -> Result<Repo> {
    let dir = if spec.starts_with("http://") || spec.starts_with("https://") {
        let agent = snapshot::store::http::agent(net)?;
        let mut req = agent.get(spec);
        if let Some(t) = &net.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = req
            .call()
            .map_err(|e| anyhow::anyhow!("fetching the drivers {spec}: {e}"))?;
        let into = work.join("drivers");
        unpack(resp.into_reader(), &into).with_context(|| format!("unpacking {spec}"))?;
        into
    } else {
        let p = Path::new(spec);
        let meta = std::fs::metadata(p).with_context(|| format!("--drivers {spec}"))?;
        if meta.is_dir() {
            p.to_path_buf()
        } else {
            let f = std::fs::File::open(p).with_context(|| format!("opening {spec}"))?;
            let into = work.join("drivers");
            unpack(f, &into).with_context(|| format!("unpacking {spec}"))?;
            into
        }
    };
    let repo = Repo::scan(&dir).with_context(|| format!("indexing the drivers in {spec}"))?;
    if repo.packages.is_empty() {
        bail!("--drivers {spec}: no driver package (.inf) in it");
    }
    Ok(repo)
}

/// The most a driver tarball may unpack to (virtio-win is about 1 GiB for every Windows).
const UNPACKED_MAX: u64 = 4 << 30;

/// Unpacks the regular files and folders of a tar stream (plain, gzip or zstd, by its first
/// bytes) below `into`; links and devices are skipped (a driver package has none), paths that
/// would leave `into` are refused by `tar`.
fn unpack(r: impl Read, into: &Path) -> Result<()> {
    let mut r = BufReader::new(r);
    let head = r.fill_buf().context("reading")?.to_vec();
    let stream: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(r).context("zstd")?)
    } else {
        Box::new(r)
    };
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let mut archive = tar::Archive::new(stream);
    let mut total = 0u64;
    for e in archive.entries().context("not a tar archive")? {
        let mut e = e.context("a damaged tar entry")?;
        let kind = e.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        total += e.size();
        if total > UNPACKED_MAX {
            bail!("more than {} GiB unpacked", UNPACKED_MAX >> 30);
        }
        let name = e
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if !e
            .unpack_in(into)
            .with_context(|| format!("unpacking {name}"))?
        {
            bail!("{name}: a path outside the archive's folder");
        }
    }
    Ok(())
}

fn show(d: &Data) -> String {
    match d {
        Data::Sz(s) | Data::ExpandSz(s) => format!("{s:?}"),
        Data::MultiSz(v) => format!("{v:?}"),
        Data::Dword(n) => format!("{n:#x}"),
        Data::Binary(b) | Data::Raw { bytes: b, .. } if b.len() > 16 => {
            format!("{} bytes", b.len())
        }
        Data::Binary(b) | Data::Raw { bytes: b, .. } => hex::encode(b),
    }
}

/// The report's lines for one volume: what drives each device, then every file and value
/// written with what was there before.
pub fn lines(o: &Outcome, dry_run: bool) -> Vec<String> {
    let (file_verb, reg_verb) = if dry_run {
        ("would write", "would set")
    } else {
        ("wrote", "set")
    };
    let mut v = vec![format!(
        "windows: {} on {}, control set {}",
        o.plan.windows, o.volume, o.plan.control_set
    )];
    v.extend(o.drivers.iter().map(|l| format!("windows: {l}")));
    for f in &o.plan.files {
        let from = match &f.source {
            Source::Copy(p) => format!(" from {}", p.display()),
            Source::Text(_) => String::new(),
        };
        let kept = f
            .original
            .as_ref()
            .map(|o| format!("; original kept as {o}"))
            .unwrap_or_default();
        v.push(format!(
            "windows: {file_verb} {}{from} ({}){kept}",
            f.path, f.why
        ));
    }
    for w in &o.plan.registry {
        let was = w.original.as_ref().map_or("none".to_string(), show);
        let name = if w.name.is_empty() { "@" } else { &w.name };
        v.push(format!(
            "windows: {reg_verb} HKLM\\{}\\{}\\{name} = {} (was {was}; {})",
            w.hive.file(),
            w.key,
            show(&w.data),
            w.why
        ));
    }
    v.extend(o.plan.notes.iter().map(|n| format!("windows: note: {n}")));
    if o.plan.is_empty() {
        v.push(
            "windows: nothing to change: the restored Windows already has what this machine needs"
                .into(),
        );
    }
    v
}
