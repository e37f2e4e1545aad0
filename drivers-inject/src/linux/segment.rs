//! The fallback when the restored system's own generator cannot run (no chroot possible, an
//! unsupported generator, or a rebuild that fails): an uncompressed `newc` cpio segment
//! appended to the existing initramfs, carrying the missing modules from the restored
//! system's own `/lib/modules/VER` and that tree's module tables. The kernel unpacks
//! concatenated segments in order, later files replacing earlier ones, so the image's udev
//! finds the new modules through the new `modules.alias` and loads them by modalias, as it
//! loads every other driver.

use super::modules::KernelModules;
use super::system::Kernel;
use super::Ctx;
use crate::initramfs;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;

/// The module tables copied with the modules (modprobe reads the `.bin` indexes first).
const TABLES: &[&str] = &[
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.builtin.modinfo",
    "modules.devname",
    "modules.order",
];

/// A `newc` archive writer (regular files and directories, owner root, mtime 0).
#[derive(Default)]
pub struct Newc {
    buf: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(hdr.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, b"");
    }

    pub fn file(&mut self, name: &str, data: &[u8]) {
        self.entry(name, 0o100644, data);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.buf
    }
}

/// Appends `modules` (with what they need) of kernel `k` to its initramfs.
pub fn append(ctx: &mut Ctx, k: &Kernel, modules: &BTreeSet<String>, why: &str) -> Result<()> {
    let Some(image) = k.initramfs.clone() else {
        bail!("kernel {} has no initramfs to extend", k.version);
    };
    let moddir = ctx.changes.path(&k.modules);
    let km = KernelModules::open(&moddir)?;
    let listing = initramfs::read(&ctx.changes.path(&image))?;
    // Where the image keeps its modules (merged-/usr images use usr/lib/modules).
    let base = if listing
        .files
        .iter()
        .any(|f| f.starts_with("usr/lib/modules/"))
    {
        format!("usr/lib/modules/{}", k.version)
    } else {
        format!("lib/modules/{}", k.version)
    };
    let mut files: Vec<String> = Vec::new();
    for m in km.closure(modules) {
        files.push(
            km.path(&m)
                .with_context(|| format!("module {m} has no file"))?
                .to_string(),
        );
    }
    files.extend(
        TABLES
            .iter()
            .filter(|t| moddir.join(t).exists())
            .map(|t| t.to_string()),
    );
    let mut dirs = BTreeSet::new();
    for f in &files {
        let full = format!("{base}/{f}");
        let mut p = std::path::Path::new(&full).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut cpio = Newc::default();
    for d in &dirs {
        cpio.dir(d);
    }
    for f in &files {
        let data =
            std::fs::read(moddir.join(f)).with_context(|| format!("reading /{}/{f}", k.modules))?;
        cpio.file(&format!("{base}/{f}"), &data);
    }
    let segment = cpio.finish();
    ctx.changes.regenerated(&image, why)?;
    if ctx.dry_run {
        return Ok(());
    }
    let path = ctx.changes.path(&image);
    let mut img = std::fs::read(&path).with_context(|| format!("reading /{image}"))?;
    img.resize(img.len().div_ceil(4) * 4, 0);
    img.extend_from_slice(&segment);
    let tmp = path.with_extension("bmr-tmp");
    std::fs::write(&tmp, &img).with_context(|| format!("writing /{image}"))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing /{image}"))?;
    let have = initramfs::read(&path)?.modules();
    if let Some(m) = modules
        .iter()
        .find(|m| !have.contains(*m) && !km.is_builtin(m))
    {
        bail!("the extended /{image} still lacks {m}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_segment_carries_the_modules_and_tables() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let md = root.join("lib/modules/6.1.0-9-amd64");
        std::fs::create_dir_all(md.join("kernel/drivers/nvme/host")).unwrap();
        std::fs::write(
            md.join("modules.dep"),
            "kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko\nkernel/drivers/nvme/host/nvme-core.ko:\n",
        )
        .unwrap();
        std::fs::write(
            md.join("modules.alias"),
            "alias pci:v*d*sv*sd*bc01sc08i02* nvme\n",
        )
        .unwrap();
        std::fs::write(md.join("kernel/drivers/nvme/host/nvme.ko"), b"\x7fELF nvme").unwrap();
        std::fs::write(
            md.join("kernel/drivers/nvme/host/nvme-core.ko"),
            b"\x7fELF core",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        let mut main = Newc::default();
        main.file("init", b"#!/bin/sh\n");
        let original = zstd::encode_all(&main.finish()[..], 3).unwrap();
        std::fs::write(root.join("boot/initrd.img-6.1.0-9-amd64"), &original).unwrap();
        let inv = crate::linux::test_inventory(vec![]);
        let mut ctx = Ctx::for_test(root, &inv);
        let k = Kernel {
            version: "6.1.0-9-amd64".into(),
            modules: "lib/modules/6.1.0-9-amd64".into(),
            initramfs: Some("boot/initrd.img-6.1.0-9-amd64".into()),
        };
        let want: BTreeSet<String> = ["nvme".to_string()].into();
        append(&mut ctx, &k, &want, "test").unwrap();
        let l = initramfs::read(&root.join("boot/initrd.img-6.1.0-9-amd64")).unwrap();
        assert_eq!(l.segments, ["zstd", "cpio"]);
        let m = l.modules();
        assert!(m.contains("nvme") && m.contains("nvme_core"), "{m:?}");
        assert!(l
            .files
            .contains(&"lib/modules/6.1.0-9-amd64/modules.alias".to_string()));
        // The original is kept beside it, once.
        let kept = std::fs::read(root.join("boot/initrd.img-6.1.0-9-amd64.pre-restore")).unwrap();
        assert_eq!(kept, original);
        assert_eq!(ctx.changes.list.len(), 1);
    }
}
