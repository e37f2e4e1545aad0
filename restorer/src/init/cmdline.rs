//! The kernel command line contract (DESIGN.md §4): `restorer.*` parameters and dracut-style `ip=`.

use anyhow::{bail, Result};

#[derive(Debug, Default, PartialEq)]
pub struct Params {
    pub url: Option<String>,
    pub host: Option<String>,
    pub snapshot: Option<String>,
    /// `auto` or device paths.
    pub target: Vec<String>,
    pub mode: Mode,
    pub vm: Option<String>,
    pub after: After,
    pub token: Option<String>,
    /// `restorer.bootentry=0` keeps a UEFI-booted restore from writing a boot entry.
    pub no_boot_entry: bool,
    /// `restorer.adapt=0`: restore the bytes only, do not adapt the restored OS.
    pub no_adapt: bool,
    /// `restorer.nicmap=OLD=NEW,...`: NIC pairs for the adaptation.
    pub nic_map: Vec<String>,
    /// `restorer.drivers=DIR|TAR|URL` (`--drivers`): Windows driver packages.
    pub drivers: Option<String>,
    /// `restorer.windowsforce=1` (`--windows-force`).
    pub windows_force: bool,
    /// `ip=` values, in order.
    pub ip: Vec<String>,
    /// `restorer.grow=last|none` (`--grow`).
    pub grow: Option<String>,
    /// `restorer.growlv=VG/LV` (`--grow-lv`).
    pub grow_lv: Option<String>,
    /// `restorer.scratch=DIR` (`--scratch`): where partitions that shrink are rebuilt.
    pub scratch: Option<String>,
}

#[derive(Debug, Default, PartialEq, Clone, Copy)]
pub enum Mode {
    #[default]
    Restore,
    Failback,
    Capture,
    Shell,
}

#[derive(Debug, Default, PartialEq, Clone, Copy)]
pub enum After {
    #[default]
    Reboot,
    Poweroff,
    Shell,
}

/// Splits a command line into words, honouring double quotes as the kernel does.
fn words(cmdline: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

pub fn parse(cmdline: &str) -> Result<Params> {
    let mut p = Params::default();
    for w in words(cmdline) {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let v = v.to_string();
        match k {
            "restorer.url" => p.url = Some(v),
            "restorer.host" => p.host = Some(v),
            "restorer.snapshot" => p.snapshot = Some(v),
            "restorer.grow" => {
                if v != "last" && v != "none" {
                    bail!("restorer.grow={v}: expected last or none");
                }
                p.grow = Some(v)
            }
            "restorer.growlv" => p.grow_lv = Some(v),
            "restorer.scratch" => p.scratch = Some(v),
            "restorer.target" => {
                p.target = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "restorer.mode" => {
                p.mode = match v.as_str() {
                    "restore" => Mode::Restore,
                    "failback" => Mode::Failback,
                    "capture" => Mode::Capture,
                    "shell" => Mode::Shell,
                    _ => bail!("restorer.mode={v}: expected restore, failback, capture or shell"),
                }
            }
            "restorer.vm" => p.vm = Some(v),
            "restorer.after" => {
                p.after = match v.as_str() {
                    "reboot" => After::Reboot,
                    "poweroff" => After::Poweroff,
                    "shell" => After::Shell,
                    _ => bail!("restorer.after={v}: expected reboot, poweroff or shell"),
                }
            }
            "restorer.token" => p.token = Some(v),
            "restorer.bootentry" => {
                p.no_boot_entry = match v.as_str() {
                    "0" => true,
                    "1" => false,
                    _ => bail!("restorer.bootentry={v}: expected 0 or 1"),
                }
            }
            "restorer.adapt" => {
                p.no_adapt = match v.as_str() {
                    "0" => true,
                    "1" => false,
                    _ => bail!("restorer.adapt={v}: expected 0 or 1"),
                }
            }
            "restorer.nicmap" => {
                p.nic_map = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "restorer.drivers" => p.drivers = Some(v),
            "restorer.windowsforce" => {
                p.windows_force = match v.as_str() {
                    "0" => false,
                    "1" => true,
                    _ => bail!("restorer.windowsforce={v}: expected 0 or 1"),
                }
            }
            "ip" => p.ip.push(v),
            k if k.starts_with("restorer.") => bail!("unknown kernel parameter {k}="),
            _ => {}
        }
    }
    if p.target.is_empty() {
        p.target.push("auto".into());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_parameters_parse() {
        let p = parse(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 restorer.url=http://10.0.2.2:8080/store \
             restorer.host=web1 restorer.target=/dev/nvme0n1,/dev/sda restorer.after=poweroff \
             ip=10.0.0.5::10.0.0.1:255.255.255.0:web1:eth0:none quiet",
        )
        .unwrap();
        assert_eq!(p.url.as_deref(), Some("http://10.0.2.2:8080/store"));
        assert_eq!(p.host.as_deref(), Some("web1"));
        assert_eq!(p.target, ["/dev/nvme0n1", "/dev/sda"]);
        assert_eq!(p.mode, Mode::Restore);
        assert_eq!(p.after, After::Poweroff);
        assert_eq!(p.ip.len(), 1);
        let p =
            parse("restorer.adapt=0 restorer.nicmap=enp0s3=52:54:00:ab:cd:ef,eth1=0000:00:05.0")
                .unwrap();
        assert!(p.no_adapt);
        assert_eq!(p.nic_map, ["enp0s3=52:54:00:ab:cd:ef", "eth1=0000:00:05.0"]);
        assert!(parse("restorer.adapt=no").is_err());
        let p =
            parse("restorer.grow=none restorer.growlv=rhel/home restorer.scratch=/mnt/s").unwrap();
        assert_eq!(p.scratch.as_deref(), Some("/mnt/s"));
        assert_eq!(p.grow.as_deref(), Some("none"));
        assert_eq!(p.grow_lv.as_deref(), Some("rhel/home"));
        assert!(parse("restorer.grow=all").is_err());
        let p =
            parse("restorer.drivers=http://10.0.2.2/boot/win.tar restorer.windowsforce=1").unwrap();
        assert_eq!(p.drivers.as_deref(), Some("http://10.0.2.2/boot/win.tar"));
        assert!(p.windows_force);
        assert!(parse("restorer.windowsforce=yes").is_err());
    }

    #[test]
    fn defaults_and_errors() {
        let p = parse("console=tty0").unwrap();
        assert_eq!(p.target, ["auto"]);
        assert_eq!(p.after, After::Reboot);
        assert!(parse("restorer.mode=wipe").is_err());
        assert!(parse("restorer.hots=x").is_err());
        assert_eq!(
            parse("restorer.host=\"a b\"").unwrap().host.as_deref(),
            Some("a b")
        );
    }
}
