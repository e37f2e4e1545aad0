//! `demo`: the README's first command, end to end on a built-in default.
//!
//! A sample server (UEFI, its disk on a SATA controller, an e1000 NIC) is built and snapshotted into
//! an appliance store; the appliance serves it and the PXE boot files. A blank "replacement server"
//! with other hardware (a bigger NVMe disk, a virtio NIC) PXE-boots our image through iPXE, restores
//! the snapshot unattended, reboots, and the restored system boots from its new disk and prints
//! `BOOT-OK`. Everything runs in QEMU (TCG) on this machine; artifacts stay in `target/e2e/demo/`.

use anyhow::{bail, Context, Result};
use bmr_tests::boot::{self, appliance::Appliance, Firmware as SampleFw, BOOT_OK};
use bmr_tests::qemu::{Bus, Disk, Firmware, Nic, Vm, VmSpec};
use bmr_tests::util::Workspace;
use std::time::{Duration, Instant};

const HOST: &str = "web1";
/// The relay's port: the boot image names it, so it stays fixed (and differs from the tests').
const PORT: u16 = 47841;

struct Steps(Vec<(String, Duration)>, Instant);

impl Steps {
    fn step<T>(&mut self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("==> {what}");
        let t = Instant::now();
        let v = f().with_context(|| what.to_string())?;
        let d = t.elapsed();
        println!("    done in {:.1} s", d.as_secs_f64());
        self.0.push((what.to_string(), d));
        Ok(v)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("demo: FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    // The demo keeps its directory: its logs and images are for the user to read.
    let dir = Workspace::artifacts("demo").keep();
    let mut s = Steps(Vec::new(), Instant::now());
    let src = s.step(
        "build the sample server's disk (GPT, ESP + ext4 root with a mini Linux)",
        || boot::sample_server(HOST, SampleFw::Uefi),
    )?;
    println!("    {} ({} MiB)", src.image.display(), src.size >> 20);
    let url = format!("http://10.0.2.2:{PORT}/store");
    let image = s.step(
        "build the boot image (signed Debian kernel, modules, restorer as PID 1)",
        || boot::boot_image(Some(&url), &format!("restorer.host={HOST}"), "pxe"),
    )?;
    let initrd = image.summary["initrd"]["bytes"].as_u64().unwrap_or(0);
    let kernel = image.summary["vmlinuz_bytes"].as_u64().unwrap_or(0);
    println!(
        "    kernel {:.1} MiB + initrd {:.1} MiB",
        kernel as f64 / 1048576.0,
        initrd as f64 / 1048576.0
    );
    let app = s.step(
        "snapshot the server into the appliance and serve it (store + PXE files)",
        || Appliance::start(&dir, HOST, &src.image, Some(&image.dir), PORT),
    )?;
    if app.watch.port != PORT {
        bail!("port {PORT} is taken: the boot image's URL would be wrong");
    }
    for line in app.ingest_summary.lines() {
        println!("    {line}");
    }

    let target = dir.join("replacement-nvme.img");
    let _ = std::fs::remove_file(&target);
    std::fs::File::create(&target)
        .and_then(|f| f.set_len(2 * src.size))
        .with_context(|| format!("creating {}", target.display()))?;
    let mut spec = VmSpec::new("replacement", Firmware::Uefi);
    spec.memory_mib = 1536;
    spec.disks.push(Disk::new(&target, Bus::Nvme));
    spec.nics.push(Nic::pxe(
        "virtio-net-pci",
        &image.pxe(),
        &format!("http://10.0.2.2:{PORT}/boot/pxe/boot.ipxe"),
    ));
    let power_on = Instant::now();
    let mut vm = None;
    s.step(
        &format!(
            "PXE-boot a blank replacement server (UEFI, {} MiB NVMe disk, virtio NIC) and restore",
            (2 * src.size) >> 20
        ),
        || {
            let v = vm.insert(Vm::start(spec, &dir)?);
            v.wait_for(
                "restorer: starting `restorer restore",
                Duration::from_secs(300),
            )?;
            let (which, _) = v.wait_for_any(
                &["restorer: rebooting", "restorer: FAILED"],
                Duration::from_secs(900),
            )?;
            if which != 0 {
                bail!("the restore failed: see {}", v.log.display());
            }
            v.wait_exit(Duration::from_secs(120))?;
            Ok(())
        },
    )?;
    let first_chunk = app
        .watch
        .first_chunk()
        .map(|t| t.saturating_duration_since(power_on));
    let restore_log = vm.map(|v| v.output()).unwrap_or_default();
    for line in restore_log.lines().filter(|l| {
        [
            "disk 0 ->",
            "grew",
            "resize",
            "UEFI boot entry",
            "adapt: restored",
            "adapt: no ",
            "adapt: changed",
            "adapt: this machine: disk",
        ]
        .iter()
        .any(|w| l.contains(w))
    }) {
        println!("    {}", line.trim());
    }
    s.step("boot the replacement server from its new disk", || {
        // The same machine: its NVRAM, where the restorer wrote the boot entry.
        let mut spec = VmSpec::new("replacement-restored", Firmware::Uefi);
        spec.vars = Some(dir.join("replacement.vars.fd"));
        spec.disks.push(Disk::new(&target, Bus::Nvme));
        let mut v = Vm::start(spec, &dir)?;
        v.wait_for(&format!("{BOOT_OK}{HOST}"), Duration::from_secs(300))?;
        println!("    serial: {BOOT_OK}{HOST}");
        Ok(())
    })?;

    println!();
    println!("Summary");
    for (what, d) in &s.0 {
        println!("  {:>6.1} s  {what}", d.as_secs_f64());
    }
    if let Some(t) = first_chunk {
        println!(
            "  power-on to first chunk request: {:.1} s",
            t.as_secs_f64()
        );
    }
    println!(
        "  total {:.1} s; serial logs and disks in {}",
        s.1.elapsed().as_secs_f64(),
        dir.display()
    );
    println!("demo: OK (the restored server printed {BOOT_OK}{HOST})");
    Ok(())
}
