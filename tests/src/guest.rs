//! A throwaway Linux guest for the fixtures and checks that need kernel drivers this host does
//! not have (MD RAID, device-mapper): Debian's kernel (the boot image's) boots under QEMU with a
//! busybox initramfs that carries host tools (mdadm, mke2fs, e2fsck...) with their libraries,
//! the named modules and an optional directory tree, runs a script as PID 1 with the disks on
//! virtio (`/dev/vda`, `/dev/vdb`...), prints its exit status and powers off.

use crate::boot::{self, Kernel};
use crate::qemu::{self, Bus, Vm, VmSpec};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /etc
for m in $(cat /etc/modules); do modprobe -q "$m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done
echo GUEST-START
sh -e /script
echo "GUEST-RC=$?"
sync
poweroff -f
"#;

/// What a guest runs with.
pub struct Guest<'a> {
    /// Host programs, by name on `PATH` or by path; copied with the libraries `ldd` names.
    pub tools: &'a [&'a str],
    /// Kernel modules (with their dependencies), loaded in order.
    pub modules: &'a [&'a str],
    /// A directory copied to `/data` of the guest.
    pub tree: Option<&'a Path>,
}

impl Guest<'_> {
    /// Run `script` (POSIX sh, `-e`) with `disks` attached; the console log is returned when the
    /// script exits 0, an error with the log's tail otherwise. `dir` keeps the initramfs and log.
    pub fn run(&self, name: &str, script: &str, disks: &[&Path], dir: &Path) -> Result<String> {
        let k = boot::kernel()?;
        std::fs::create_dir_all(dir)?;
        let initrd = dir.join(format!("{name}-initrd.img"));
        self.initrd(&k, script, &dir.join(format!("{name}-root")), &initrd)?;
        let mut spec = VmSpec::new(name, qemu::Firmware::Bios);
        spec.memory_mib = 1536;
        spec.kernel = Some((
            k.vmlinuz.clone(),
            initrd,
            "console=ttyS0 panic=-1 quiet loglevel=3".into(),
        ));
        spec.disks = disks
            .iter()
            .map(|d| qemu::Disk::new(d.to_path_buf(), Bus::Virtio))
            .collect();
        let mut vm = Vm::start(spec, dir)?;
        let waited = vm.wait_for("GUEST-RC=", Duration::from_secs(600));
        let _ = vm.wait_exit(Duration::from_secs(30));
        vm.kill();
        let log = qemu::strip_ansi(&vm.output());
        waited
            .with_context(|| format!("guest {name}: no exit status; console:\n{}", tail(&log)))?;
        let rc = log
            .split("GUEST-RC=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?");
        if rc != "0" {
            bail!(
                "guest {name}: the script exited {rc}; console:\n{}",
                tail(&log)
            );
        }
        Ok(log)
    }

    fn initrd(&self, k: &Kernel, script: &str, root: &Path, out: &Path) -> Result<()> {
        let _ = std::fs::remove_dir_all(root);
        for d in ["bin", "usr/bin", "proc", "sys", "dev", "etc", "lib/modules"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let busybox = Path::new("/bin/busybox");
        std::fs::copy(busybox, root.join("bin/busybox")).context("copying /bin/busybox")?;
        let list = Command::new(busybox).arg("--list").output()?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
            }
        }
        // Busybox's sh runs its own applet for a name it has (mke2fs, for one) whatever PATH
        // says: each tool is called through a function naming its path.
        let mut prologue = String::new();
        for t in self.tools {
            let src = which(t)?;
            let name = src.file_name().context("tool name")?.to_string_lossy();
            prologue.push_str(&format!("{name}() {{ /usr/bin/{name} \"$@\"; }}\n"));
            let dst = root.join("usr/bin").join(&*name);
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
            for lib in libraries(&src)? {
                let d = root.join(lib.strip_prefix("/").unwrap_or(&lib));
                std::fs::create_dir_all(d.parent().context("library dir")?)?;
                std::fs::copy(&lib, &d).with_context(|| format!("copying {}", lib.display()))?;
            }
        }
        if let Some(t) = self.tree {
            let st = Command::new("cp")
                .arg("-a")
                .arg(t)
                .arg(root.join("data"))
                .status()?;
            if !st.success() {
                bail!("copying {} into the guest", t.display());
            }
        }
        let mut mods: Vec<&str> = vec!["virtio_blk", "virtio_pci"];
        mods.extend(self.modules);
        boot::copy_modules(k, &mods, root)?;
        std::fs::write(root.join("etc/modules"), mods.join("\n") + "\n")?;
        let st = Command::new("depmod")
            .arg("-b")
            .arg(root)
            .arg(&k.release)
            .status()?;
        if !st.success() {
            bail!("depmod for the guest failed");
        }
        let script = prologue + script;
        for (f, body) in [("init", INIT), ("script", script.as_str())] {
            std::fs::write(root.join(f), body)?;
            std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(0o755))?;
        }
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd '{}' && find . | cpio --quiet -o -H newc -R 0:0 | gzip -1 > '{}'",
                root.display(),
                out.display()
            ))
            .status()?;
        if !st.success() {
            bail!("packing the guest's initramfs failed");
        }
        Ok(())
    }
}

fn which(tool: &str) -> Result<PathBuf> {
    if tool.contains('/') {
        return Ok(PathBuf::from(tool));
    }
    for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(d).join(tool);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{tool} is not installed on this host")
}

/// The shared libraries `ldd` lists for `bin` (none for a static program).
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let p = l.split("=>").last()?.split_whitespace().next()?;
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
