//! Growing an LVM2 physical volume into its bigger partition, then one logical volume into the
//! new extents, then that LV's filesystem: `pvresize`, `lvextend -l +100%FREE`, and `resize2fs`,
//! `xfs_growfs` or `ntfsresize` on the activated LV. The VG and PV UUIDs are kept (the tools
//! change only sizes and the metadata's sequence number).
//!
//! lvm2 sees only the loop device over the restored partition (`--devices`, no devices file, no
//! udev), so a VG of the same name on the restoring machine is never touched, and writes no
//! backup or archive of the restored VG into the restoring machine's `/etc/lvm`. Without
//! device-mapper (a kernel without `dm_mod`) the PV and LV still grow, their metadata being all
//! that changes, and the filesystem is left for the restored system to grow.

use crate::plan::ResizeKind;
use crate::resize::{run, Loop};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use snapshot::fs::FsKind;
use snapshot::manifest::{LvmLv, LvmPv};
use std::path::Path;
use std::process::{Command, Stdio};

/// The LV that takes a grown PV's new extents, and how its filesystem grows.
#[derive(Debug, Clone, Serialize)]
pub struct LvGrow {
    pub vg: String,
    pub lv: String,
    pub fs: ResizeKind,
    /// The filesystem's UUID and label (kept by `mkswap`).
    #[serde(skip)]
    pub uuid: Option<String>,
    #[serde(skip)]
    pub label: Option<String>,
}

impl LvGrow {
    pub fn name(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }
}

/// Why `lv` cannot take new extents, or how its filesystem grows.
fn growable(lv: &LvmLv) -> Result<ResizeKind, String> {
    if let Some(w) = &lv.whole {
        return Err(format!("it is copied whole ({w})"));
    }
    if let Some(s) = lv
        .segments
        .iter()
        .find(|s| s.kind != "striped" || s.stripes.len() != 1)
    {
        return Err(format!(
            "it has a {} segment: only linear LVs are grown",
            if s.kind == "striped" {
                format!("{}-stripe", s.stripes.len())
            } else {
                format!("{:?}", s.kind)
            }
        ));
    }
    match lv.fs.as_ref().map(|f| f.kind) {
        Some(FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4) => Ok(ResizeKind::Ext),
        Some(FsKind::Xfs) => Ok(ResizeKind::Xfs),
        Some(FsKind::Ntfs) => Ok(ResizeKind::Ntfs),
        Some(FsKind::Swap) => Ok(ResizeKind::Swap),
        Some(k) => Err(format!("its {k:?} filesystem cannot be grown").to_lowercase()),
        None => Err("it holds no filesystem we know".into()),
    }
}

/// Which LV of `pv` grows: the one `want` (`VG/LV`) names, else the one holding the most used
/// data among those with a filesystem that grows (swap is never chosen by default). `Ok(None)`:
/// none qualifies, the new extents stay free. An error when `want` names an LV of this VG that
/// cannot grow.
pub fn choose(pv: &LvmPv, want: Option<&str>) -> Result<Option<LvGrow>> {
    let vg = &pv.vg;
    let pick = |lv: &LvmLv, fs| LvGrow {
        vg: vg.name.clone(),
        lv: lv.name.clone(),
        fs,
        uuid: lv.fs.as_ref().and_then(|f| f.uuid.clone()),
        label: lv.fs.as_ref().and_then(|f| f.label.clone()),
    };
    if let Some((wvg, wlv)) = want.and_then(|w| w.split_once('/')) {
        if wvg == vg.name {
            let lv = vg.lvs.iter().find(|l| l.name == wlv).with_context(|| {
                format!(
                    "--grow-lv {wvg}/{wlv}: VG {wvg} has no LV {wlv:?} (its LVs: {})",
                    vg.lvs
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            return match growable(lv) {
                Ok(fs) => Ok(Some(pick(lv, fs))),
                Err(why) => bail!("--grow-lv {wvg}/{wlv}: cannot grow it: {why}"),
            };
        }
    }
    Ok(vg
        .lvs
        .iter()
        .filter_map(|lv| match growable(lv) {
            Ok(ResizeKind::Swap) | Err(_) => None,
            Ok(fs) => Some((lv.fs.as_ref().map_or(0, |f| f.used), lv, fs)),
        })
        .max_by_key(|(used, lv, _)| (*used, std::cmp::Reverse(lv.name.clone())))
        .map(|(_, lv, fs)| pick(lv, fs)))
}

/// Bytes of free extents the PV will have once `pvresize` makes it `size` bytes (a second
/// metadata area at the end, if any, is ignored: the estimate is for the plan).
pub fn free_after(pv: &LvmPv, size: u64) -> u64 {
    let es = pv.extent_size.max(1);
    let extents = size.saturating_sub(pv.pe_start) / es;
    let allocated: u64 = pv
        .vg
        .lvs
        .iter()
        .flat_map(|l| &l.segments)
        // A thin LV's extents are virtual: its pool's data LV holds the physical ones.
        .filter(|s| s.kind != "thin")
        .map(|s| s.extent_count)
        .sum();
    extents.saturating_sub(allocated) * es
}

/// `lvm` restricted to the given devices (comma-separated), with no udev, devices file,
/// backups or archives.
struct Lvm {
    devices: String,
    activation: bool,
}

impl Lvm {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("lvm");
        c.args(args)
            .arg("--devices")
            .arg(&self.devices)
            .arg("--config")
            .arg(format!(
                "devices {{ use_devicesfile = 0 obtain_device_list_from_udev = 0 }} \
                 activation {{ udev_sync = 0 udev_rules = 0 }} \
                 backup {{ backup = 0 archive = 0 }} global {{ activation = {} }}",
                u8::from(self.activation)
            ))
            .env("LVM_SUPPRESS_FD_WARNINGS", "1");
        c
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        run(&mut self.cmd(args), |c| c == 0)
    }

    fn output(&self, args: &[&str]) -> Result<String> {
        let out = self
            .cmd(args)
            .stdin(Stdio::null())
            .output()
            .context("running lvm (lvm2)")?;
        if !out.status.success() {
            bail!(
                "lvm {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Whether this kernel has device-mapper (loading `dm_mod` if it must).
fn device_mapper() -> bool {
    let has = || {
        std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper"))
            || Path::new("/dev/mapper/control").exists()
    };
    has()
        || (Command::new("modprobe")
            .arg("dm_mod")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && has())
}

/// Grow the PV on `lo` (a loop device over the whole, already bigger, partition), then `lv` and
/// its filesystem. Returns what was done, and a warning when the filesystem could not be grown.
pub fn grow(lo: &Loop, lv: Option<&LvGrow>) -> Result<(String, Option<String>)> {
    let dm = device_mapper();
    let lvm = Lvm {
        devices: lo.path().to_string_lossy().into_owned(),
        activation: dm,
    };
    lvm.run(&["pvresize", "-q", &lo.path().to_string_lossy()])
        .context("pvresize")?;
    let Some(lv) = lv else {
        return Ok(("PV grown (pvresize); its new extents are free".into(), None));
    };
    let name = lv.name();
    lvm.run(&["lvextend", "-q", "-l", "+100%FREE", &name])
        .with_context(|| format!("lvextend {name}"))?;
    let done = format!("PV grown (pvresize), LV {name} takes its new extents (lvextend)");
    if !dm {
        return Ok((
            done,
            Some(format!(
                "LV {name}: its filesystem is not grown: this kernel has no device-mapper; grow it on the restored system ({})",
                lv.fs.tool()
            )),
        ));
    }
    if let Err(e) = lvm.run(&["lvchange", "-q", "-ay", &name]) {
        // The extents are the LV's already: only its filesystem is left at its size.
        return Ok((
            done,
            Some(format!(
                "LV {name}: its filesystem is not grown: activating it failed ({e:#}); grow it on the restored system ({})",
                lv.fs.tool()
            )),
        ));
    }
    let grown = lvm
        .output(&["lvs", "--noheadings", "-o", "lv_dm_path", &name])
        .and_then(|p| {
            crate::resize::grow_fs(
                lv.fs,
                Path::new(&p),
                lv.uuid.as_deref(),
                lv.label.as_deref(),
            )
        });
    let off = lvm.run(&["lvchange", "-q", "-an", &name]);
    match (grown, off) {
        (Ok(()), Ok(())) => Ok((
            format!("{done}, its filesystem grown ({})", lv.fs.tool()),
            None,
        )),
        (Err(e), _) => Ok((
            done,
            Some(format!("LV {name}: growing its filesystem failed ({e:#})")),
        )),
        (Ok(()), Err(e)) => Err(e).with_context(|| format!("deactivating {name}")),
    }
}

/// The logical volumes of the VGs on some restored partitions, activated (for the adaptation
/// to read the system on them); deactivated when dropped.
pub struct Active {
    lvm: Lvm,
    vgs: Vec<String>,
    /// `(VG/LV, /dev/mapper node, the PV it starts on)` of each active LV.
    pub lvs: Vec<(String, String, String)>,
    /// Why some VG was not activated.
    pub warnings: Vec<String>,
}

impl Drop for Active {
    fn drop(&mut self) {
        if !self.vgs.is_empty() {
            let mut args = vec!["vgchange", "-q", "-an"];
            args.extend(self.vgs.iter().map(String::as_str));
            if let Err(e) = self.lvm.run(&args) {
                eprintln!(
                    "restorer: warning: deactivating {}: {e:#}",
                    self.vgs.join(", ")
                );
            }
        }
    }
}

/// Activates the VGs whose PVs are among `pvs` (restored partitions), seeing no other device.
/// A VG whose LV names are taken on this machine (`/dev/mapper/VG-*` exists) is left inactive
/// and said, so that nothing of this machine's own is ever deactivated.
pub fn activate(pvs: &[String]) -> Result<Active> {
    let mut a = Active {
        lvm: Lvm {
            devices: pvs.join(","),
            activation: true,
        },
        vgs: Vec::new(),
        lvs: Vec::new(),
        warnings: Vec::new(),
    };
    if pvs.is_empty() {
        return Ok(a);
    }
    if !device_mapper() {
        a.warnings.push(format!(
            "LVM PVs on {}: not looked into (this kernel has no device-mapper)",
            pvs.join(", ")
        ));
        return Ok(a);
    }
    let list = a.lvm.output(&["vgs", "--noheadings", "-o", "vg_name"])?;
    let mapper = |vg: &str| {
        let prefix = format!("{}-", vg.replace('-', "--"));
        std::fs::read_dir("/dev/mapper")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    };
    for vg in list.split_whitespace() {
        if mapper(vg) {
            a.warnings.push(format!(
                "VG {vg}: not activated: this machine already has /dev/mapper/{vg}-* devices"
            ));
            continue;
        }
        match a.lvm.run(&["vgchange", "-q", "-ay", vg]) {
            Ok(()) => a.vgs.push(vg.to_string()),
            Err(e) => a
                .warnings
                .push(format!("VG {vg}: activating it failed: {e:#}")),
        }
    }
    if a.vgs.is_empty() {
        return Ok(a);
    }
    let mut args = vec![
        "lvs",
        "--noheadings",
        "--separator",
        "|",
        "-o",
        "vg_name,lv_name,lv_dm_path,devices",
    ];
    args.extend(a.vgs.iter().map(String::as_str));
    let out = a.lvm.output(&args)?;
    for line in out.lines() {
        let f: Vec<&str> = line.trim().split('|').collect();
        let [vg, lv, path, devices] = f[..] else {
            continue;
        };
        let pv = devices.split('(').next().unwrap_or("").to_string();
        let name = format!("{vg}/{lv}");
        if path.is_empty() || !Path::new(path).exists() || a.lvs.iter().any(|l| l.0 == name) {
            continue;
        }
        a.lvs.push((name, path.to_string(), pv));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::fs::Filesystem;
    use snapshot::manifest::{LvmSegment, LvmVg};

    const MIB: u64 = 1 << 20;

    fn lv(name: &str, kind: &str, fs: Option<(FsKind, u64)>, extents: u64) -> LvmLv {
        LvmLv {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            size: extents * 4 * MIB,
            segments: vec![LvmSegment {
                start_extent: 0,
                extent_count: extents,
                kind: kind.into(),
                stripe_size: None,
                stripes: if kind == "striped" { vec![0] } else { vec![] },
            }],
            fs: fs.map(|(kind, used)| Filesystem {
                kind,
                uuid: None,
                label: None,
                block_size: 4096,
                size: extents * 4 * MIB,
                used,
            }),
            whole: (kind != "striped").then(|| format!("segment type {kind:?} is not mapped")),
            excluded: Vec::new(),
        }
    }

    fn pv(lvs: Vec<LvmLv>) -> LvmPv {
        LvmPv {
            uuid: "pv".into(),
            pe_start: MIB,
            extent_size: 4 * MIB,
            pe_count: 100,
            vg: LvmVg {
                name: "rhel".into(),
                uuid: "vg".into(),
                seqno: 1,
                pv_count: 1,
                lvs,
            },
        }
    }

    #[test]
    fn the_lv_with_the_most_data_grows_unless_one_is_named() {
        let p = pv(vec![
            lv("swap", "striped", Some((FsKind::Swap, 4096)), 16),
            lv("root", "striped", Some((FsKind::Xfs, 900 * MIB)), 40),
            lv("home", "striped", Some((FsKind::Ext4, 20 * MIB)), 20),
            lv("pool", "thin-pool", None, 10),
        ]);
        let g = choose(&p, None).unwrap().unwrap();
        assert_eq!((g.name(), g.fs), ("rhel/root".into(), ResizeKind::Xfs));
        let g = choose(&p, Some("rhel/home")).unwrap().unwrap();
        assert_eq!((g.name(), g.fs), ("rhel/home".into(), ResizeKind::Ext));
        // Swap only when named; an LV of another VG leaves the default.
        assert_eq!(
            choose(&p, Some("rhel/swap")).unwrap().unwrap().fs,
            ResizeKind::Swap
        );
        assert_eq!(choose(&p, Some("data/x")).unwrap().unwrap().lv, "root");
        let e = choose(&p, Some("rhel/pool")).unwrap_err().to_string();
        assert!(e.contains("cannot grow it: it is copied whole"), "{e}");
        let e = choose(&p, Some("rhel/var")).unwrap_err().to_string();
        assert!(e.contains("its LVs: swap, root, home, pool"), "{e}");
        // Nothing that grows: the new extents stay free.
        let p = pv(vec![lv("swap", "striped", Some((FsKind::Swap, 4096)), 16)]);
        assert!(choose(&p, None).unwrap().is_none());
    }

    #[test]
    fn free_extents_after_pvresize() {
        let p = pv(vec![
            lv("root", "striped", None, 40),
            lv("t", "thin", None, 500),
        ]);
        // 201 MiB: 1 MiB before the first extent, 50 extents of 4 MiB, 40 allocated.
        assert_eq!(free_after(&p, 201 * MIB), 10 * 4 * MIB);
        assert_eq!(free_after(&p, 100 * MIB), 0);
    }
}
