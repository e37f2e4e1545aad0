//! PID 1 of the boot image: pseudo filesystems, consoles, drivers for the devices present,
//! network, then the job the kernel command line asks for (DESIGN.md §4), then
//! `restorer.after`. Any failure prints one line with the reason on every console and leaves a
//! shell there: never a reboot loop, never a write to the boot medium.

pub mod bootdev;
pub mod cmdline;
pub mod console;
mod job;
mod modules;
mod mounts;
mod net;
mod report;

use crate::say;
use anyhow::{bail, Context, Result};
use cmdline::{After, Mode};
use std::time::{Duration, Instant};

pub fn run() -> anyhow::Result<()> {
    if std::process::id() != 1 {
        bail!("`restorer init` is PID 1 of the boot image (the kernel starts it from /init)");
    }
    std::env::set_var("PATH", "/sbin:/bin:/usr/sbin:/usr/bin");
    std::env::set_var("HOME", "/root");
    let t0 = Instant::now();
    let outcome = std::panic::catch_unwind(|| boot(t0)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(anyhow::anyhow!("internal error: {msg}"))
    });
    let after = match outcome {
        Ok(after) => after,
        Err(e) => {
            // The one line an operator (or a test) reads on the console.
            let reason = format!("{e:#}").replace('\n', "; ");
            say!("restorer: FAILED: {reason}");
            say!("restorer: nothing more will be done; rescue shell on the console (log: /run/bmr/init.log)");
            After::Shell
        }
    };
    match after {
        After::Reboot | After::Poweroff => power(after),
        After::Shell => {}
    }
    shells()
}

/// Everything up to and including the job; returns what to do next.
fn boot(t0: Instant) -> Result<After> {
    mounts::pseudo()?;
    console::open();
    let _ = std::fs::write("/proc/sys/kernel/hostname", "bmr-restore");
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    say!("restorer: boot image started (kernel {})", release());
    let params = cmdline::parse(&cmdline)?;

    let mut mods = modules::Modules::open()?;
    if let Ok(list) = std::fs::read_to_string("/etc/bmr/modules-load") {
        for m in list
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
        {
            if !m.is_empty() {
                mods.load(m);
            }
        }
    }
    let n = mods.load_for_devices(Duration::from_secs(20));
    console::open(); // a serial or VT driver may have just appeared
    say!(
        "restorer: {n} drivers loaded for the devices present ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    let log: String = mods
        .failed
        .iter()
        .map(|(m, e)| format!("{m}: {e}\n"))
        .collect();
    let _ = std::fs::write("/run/bmr/modules-failed.log", log);

    let boot = bootdev::find();
    if !boot.is_empty() {
        say!("restorer: boot medium {} (never a target)", boot.join(", "));
    }
    let disks = disks(&boot);
    say!(
        "restorer: disks: {}",
        if disks.is_empty() {
            "none".into()
        } else {
            disks.join(", ")
        }
    );

    if params.mode == Mode::Shell {
        say!("restorer: restorer.mode=shell");
        return Ok(After::Shell);
    }
    job::check_targets(&params, &boot)?;
    let args = job::args(&params, &disks)?;

    let links = net::up(&params.ip)?;
    if links.is_empty() {
        bail!("no network: no NIC got an address (DHCP on every NIC with link, or ip=)");
    }
    for l in &links {
        say!("restorer: network {l}");
    }
    say!(
        "restorer: starting `restorer {}` ({:.1} s after boot)",
        redact(&args).join(" "),
        t0.elapsed().as_secs_f64()
    );
    // A failback reports under its VM's host (asked of the appliance) unless one is given.
    let host = params
        .host
        .clone()
        .or_else(|| match (&params.mode, &params.url, &params.vm) {
            (Mode::Failback, Some(url), Some(vm)) => {
                report::Reporter::vm_host(url, vm, params.token.as_deref())
            }
            _ => None,
        });
    let reporter = report::Reporter::new(
        params.url.as_deref(),
        host.as_deref(),
        params.token.as_deref(),
    );
    if let Some(r) = &reporter {
        // The appliance learns what this machine is (what a restore will adapt to).
        let inventory = drivers_inject::Inventory::scan(std::path::Path::new("/sys")).lines();
        r.send(
            "starting",
            &format!(
                "{} s after boot; this machine: {}",
                t0.elapsed().as_secs(),
                inventory.join("; ")
            ),
        );
    }
    let result = job::run(&args, &boot, reporter.as_ref());
    if let Some(r) = &reporter {
        match &result {
            Ok(()) => r.send("done", "the job finished"),
            Err(e) => r.send("failed", &format!("{e:#}")),
        }
    }
    result?;
    say!(
        "restorer: job done in {:.1} s since boot",
        t0.elapsed().as_secs_f64()
    );
    Ok(params.after)
}

/// Hides the token in what is printed.
fn redact(args: &[String]) -> Vec<String> {
    let mut out = args.to_vec();
    for i in 1..out.len() {
        if out[i - 1] == "--token" {
            out[i] = "***".into();
        }
    }
    out
}

fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whole disks other than the boot medium, by name.
fn disks(boot: &[String]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    !["loop", "ram", "zram", "sr", "fd", "dm-", "md"]
                        .iter()
                        .any(|p| n.starts_with(p))
                })
                .filter(|n| {
                    std::fs::read_to_string(format!("/sys/block/{n}/size"))
                        .is_ok_and(|s| s.trim().parse::<u64>().unwrap_or(0) > 0)
                })
                .map(|n| format!("/dev/{n}"))
                .filter(|d| !boot.contains(d))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn power(after: After) {
    say!(
        "restorer: {}",
        if after == After::Poweroff {
            "powering off"
        } else {
            "rebooting"
        }
    );
    rustix::fs::sync();
    let cmd = if after == After::Poweroff {
        rustix::system::RebootCommand::PowerOff
    } else {
        rustix::system::RebootCommand::Restart
    };
    // Returns only on failure.
    if let Err(e) = rustix::system::reboot(cmd) {
        say!("restorer: FAILED: reboot: {}", std::io::Error::from(e));
    }
}

/// A shell on every console, respawned when it exits; PID 1 also reaps orphans. Never returns.
fn shells() -> ! {
    use std::collections::HashMap;
    let ttys: Vec<String> = console::active()
        .into_iter()
        .map(|c| if c == "tty0" { "tty1".into() } else { c })
        .collect();
    let mut running: HashMap<u32, String> = HashMap::new();
    loop {
        for t in &ttys {
            if !running.values().any(|r| r == t) {
                match spawn_shell(t) {
                    Ok(pid) => {
                        running.insert(pid, t.clone());
                    }
                    Err(e) => say!("restorer: shell on {t}: {e:#}"),
                }
            }
        }
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(Some((pid, _))) => {
                running.remove(&(pid.as_raw_nonzero().get() as u32));
            }
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

fn spawn_shell(tty: &str) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let dev = format!("/dev/{tty}");
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .with_context(|| format!("opening {dev}"))
    };
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-l")
        .env(
            "TERM",
            if tty.starts_with("ttyS") {
                "vt100"
            } else {
                "linux"
            },
        )
        .stdin(open()?)
        .stdout(open()?)
        .stderr(open()?);
    // SAFETY: between fork and exec only two raw system calls run (setsid and the TIOCSCTTY
    // ioctl), both async-signal-safe; nothing allocates or takes a lock. This is the restorer's
    // only unsafe block: `pre_exec` itself is unsafe.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            // Steal the terminal (arg 1) should an old session still hold it; rustix's
            // wrapper passes 0.
            libc::ioctl(0, libc::TIOCSCTTY, 1);
            Ok(())
        });
    }
    Ok(cmd.spawn().context("starting /bin/sh")?.id())
}
