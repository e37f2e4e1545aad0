//! The job the kernel command line asks for, run as a child `restorer` process (the same binary,
//! /proc/self/exe) so that its output can be relayed to every console and its failure reason
//! read from its one-line error.

use super::cmdline::{Mode, Params};
use super::report::Reporter;
use crate::say;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::target::EXCLUDE_ENV;

const PUBKEY: &str = "/etc/bmr/appliance.pub";
/// The HTTPS appliance's CA, when the image was built with `bootimg build --ca`.
pub const CA: &str = "/etc/bmr/appliance-ca.pem";

/// How often a running job is reported alive on the console.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `restorer` arguments for the job.
pub fn args(p: &Params, disks: &[String]) -> Result<Vec<String>> {
    let need = |v: &Option<String>, what: &str| -> Result<String> {
        v.clone()
            .with_context(|| format!("{what}= missing on the kernel command line"))
    };
    let mut a: Vec<String> = Vec::new();
    let net = |a: &mut Vec<String>| {
        if std::path::Path::new(CA).exists() {
            a.extend(["--ca".into(), CA.into()]);
        }
        if let Some(t) = &p.token {
            a.extend(["--token".into(), t.clone()]);
        }
    };
    let trust = |a: &mut Vec<String>| {
        if std::path::Path::new(PUBKEY).exists() {
            a.extend(["--pubkey".into(), PUBKEY.into()]);
        }
        net(a);
    };
    match p.mode {
        Mode::Restore => {
            a.extend([
                "restore".into(),
                "--from".into(),
                need(&p.url, "restorer.url")?,
            ]);
            a.extend(["--host".into(), need(&p.host, "restorer.host")?]);
            if let Some(s) = &p.snapshot {
                a.extend(["--snapshot".into(), s.clone()]);
            }
            trust(&mut a);
            a.extend(["--target".into(), p.target.join(",")]);
            if let Some(g) = &p.grow {
                a.extend(["--grow".into(), g.clone()]);
            }
            if let Some(lv) = &p.grow_lv {
                a.extend(["--grow-lv".into(), lv.clone()]);
            }
            if let Some(d) = &p.scratch {
                a.extend(["--scratch".into(), d.clone()]);
            }
            if !p.no_boot_entry && crate::bootentry::uefi_booted() {
                a.push("--efi-boot-entry".into());
            }
            if p.no_adapt {
                a.push("--no-adapt".into());
            }
            for m in &p.nic_map {
                a.extend(["--nic-map".into(), m.clone()]);
            }
            if let Some(d) = &p.drivers {
                a.extend(["--drivers".into(), d.clone()]);
            }
            if p.windows_force {
                a.push("--windows-force".into());
            }
        }
        Mode::Failback => {
            a.extend([
                "failback".into(),
                "--from".into(),
                need(&p.url, "restorer.url")?,
            ]);
            a.extend(["--vm".into(), need(&p.vm, "restorer.vm")?]);
            trust(&mut a);
            a.extend(["--target".into(), p.target.join(",")]);
        }
        Mode::Capture => {
            a.extend([
                "capture".into(),
                "--to".into(),
                need(&p.url, "restorer.url")?,
            ]);
            a.extend(["--host".into(), need(&p.host, "restorer.host")?]);
            net(&mut a);
            if p.target.iter().any(|t| t == "auto") {
                if disks.is_empty() {
                    bail!("capture: no disks found");
                }
                a.extend(disks.iter().cloned());
            } else {
                a.extend(p.target.iter().cloned());
            }
        }
        Mode::Shell => bail!("restorer.mode=shell has no job"),
    }
    Ok(a)
}

/// Refuses explicit targets that are the boot medium (or a partition of it).
pub fn check_targets(p: &Params, boot: &[String]) -> Result<()> {
    for t in &p.target {
        let disk = super::bootdev::whole_disk(t).unwrap_or_else(|| t.clone());
        if let Some(b) = boot.iter().find(|b| **b == disk) {
            bail!("restorer.target={t} is the boot medium {b}: refusing to write it");
        }
    }
    Ok(())
}

/// Runs `restorer ARGS`, relaying its output line by line; on failure the error is its last
/// `restorer: error:` line.
pub fn run(args: &[String], boot: &[String], report: Option<&Reporter>) -> Result<()> {
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| "/bin/restorer".into());
    let mut child = Command::new(exe)
        .args(args)
        .env(EXCLUDE_ENV, boot.join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the restorer")?;
    let last_error = Arc::new(Mutex::new(None::<String>));
    let last_line = Arc::new(Mutex::new(String::new()));
    let relay = |r: Box<dyn std::io::Read + Send>| {
        let last_error = last_error.clone();
        let last_line = last_line.clone();
        snapshot::threads::start("output relay", move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                // Progress redraws come as \r-separated updates: show the last one.
                let line = line.rsplit('\r').next().unwrap_or("").to_string();
                if let Some(e) = line.strip_prefix("restorer: error: ") {
                    *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
                if !line.trim().is_empty() {
                    line.clone_into(&mut last_line.lock().unwrap_or_else(|p| p.into_inner()));
                }
                say!("{line}");
            }
        })
    };
    let relays = relay(Box::new(child.stdout.take().expect("piped")))
        .and_then(|t1| Ok((t1, relay(Box::new(child.stderr.take().expect("piped")))?)));
    let (t1, t2) = match relays {
        Ok(t) => t,
        Err(e) => {
            // Nobody would read its output: it must not run unseen.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    // The restorer draws its progress bar only on a terminal: say that it is alive meanwhile.
    let done = std::sync::atomic::AtomicBool::new(false);
    let status = std::thread::scope(|s| {
        // Without a heartbeat the job still runs; it only says less.
        let _ = snapshot::threads::start_one_scoped(s, "heartbeat", || {
            let t0 = std::time::Instant::now();
            let mut next = HEARTBEAT;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(250));
                if t0.elapsed() >= next {
                    say!("restorer: still working ({} s)", t0.elapsed().as_secs());
                    if let Some(r) = report {
                        let line = last_line.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        r.send("running", &line);
                    }
                    next += HEARTBEAT;
                }
            }
        });
        let status = child.wait().context("waiting for the restorer");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        status
    });
    let _ = (t1.join(), t2.join());
    let status = status?;
    if !status.success() {
        let reason = last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        bail!(
            "{}",
            reason.unwrap_or_else(|| format!("restorer exited with {status}"))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::cmdline::parse;

    #[test]
    fn restore_arguments_from_the_command_line() {
        let p = parse("restorer.url=http://a:8080/store restorer.host=web1 restorer.token=s3cret")
            .unwrap();
        let a = args(&p, &[]).unwrap();
        let expected = [
            "restore",
            "--from",
            "http://a:8080/store",
            "--host",
            "web1",
            "--token",
            "s3cret",
            "--target",
            "auto",
        ];
        // --pubkey only when the image carries a key
        let a: Vec<&str> = a
            .iter()
            .map(String::as_str)
            .filter(|s| !s.contains("pubkey") && !s.ends_with(".pub"))
            .collect();
        assert_eq!(a, expected);
        let e = args(&parse("restorer.host=web1").unwrap(), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "restorer.url= missing on the kernel command line"
        );
    }

    #[test]
    fn capture_takes_every_disk_but_the_boot_medium() {
        let p = parse("restorer.mode=capture restorer.url=http://a:8080 restorer.host=h").unwrap();
        let a = args(&p, &["/dev/nvme0n1".into(), "/dev/sdb".into()]).unwrap();
        assert_eq!(a[..5], ["capture", "--to", "http://a:8080", "--host", "h"]);
        assert_eq!(a[5..], ["/dev/nvme0n1", "/dev/sdb"]);
    }

    #[test]
    fn the_boot_medium_is_refused_as_a_target() {
        let boot = vec!["/dev/sda".to_string()];
        assert!(check_targets(&parse("restorer.target=/dev/nvme0n1").unwrap(), &boot).is_ok());
        assert!(check_targets(&parse("restorer.target=/dev/sda").unwrap(), &boot).is_err());
        assert!(check_targets(
            &parse("restorer.target=/dev/nvme0n1,/dev/sda2").unwrap(),
            &boot
        )
        .is_err());
        assert!(check_targets(&parse("restorer.target=auto").unwrap(), &boot).is_ok());
    }
}
