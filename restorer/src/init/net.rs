//! Network: dracut-style `ip=` (static or DHCP on named interfaces), else DHCP on every NIC with
//! link. Uses busybox `ip` and `udhcpc` (with the image's /usr/share/udhcpc/default.script).

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq)]
pub enum IpConfig {
    /// `ip=dhcp`, `ip=IF:dhcp`.
    Dhcp { iface: Option<String> },
    /// `ip=off`, `ip=none`: no network.
    Off,
    /// `ip=CLIENT:[PEER]:GATEWAY:NETMASK:HOSTNAME:IFACE:none[:DNS1[:DNS2]]`.
    Static {
        addr: String,
        prefix: u8,
        gateway: Option<String>,
        iface: Option<String>,
        dns: Vec<String>,
    },
}

fn prefix_len(mask: &str) -> Result<u8> {
    if let Ok(n) = mask.parse::<u8>() {
        if n <= 32 {
            return Ok(n);
        }
    }
    let ip: std::net::Ipv4Addr = mask
        .parse()
        .with_context(|| format!("bad netmask {mask}"))?;
    let bits = u32::from(ip);
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        bail!("netmask {mask} is not contiguous");
    }
    Ok(bits.leading_ones() as u8)
}

pub fn parse_ip(v: &str) -> Result<IpConfig> {
    let f: Vec<&str> = v.split(':').collect();
    let method = |m: &str, iface: Option<&str>| -> Result<IpConfig> {
        Ok(match m {
            "dhcp" | "on" | "any" => IpConfig::Dhcp {
                iface: iface.map(String::from),
            },
            "off" | "none" => IpConfig::Off,
            _ => bail!("ip={v}: method {m} not supported (dhcp, off or a static address)"),
        })
    };
    match f.len() {
        1 => method(f[0], None),
        2..=4 if f[0].parse::<std::net::IpAddr>().is_err() => method(f[1], Some(f[0])),
        n if n >= 7 => {
            if !matches!(f[6], "none" | "off" | "") {
                bail!("ip={v}: only `none`/`off` autoconf is supported with a static address");
            }
            let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
            Ok(IpConfig::Static {
                addr: f[0].to_string(),
                prefix: if f[3].is_empty() {
                    24
                } else {
                    prefix_len(f[3])?
                },
                gateway: opt(f[2]),
                iface: opt(f[5]),
                dns: f[7..]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| s.to_string())
                    .collect(),
            })
        }
        _ => {
            bail!("ip={v}: expected dracut syntax CLIENT:PEER:GATEWAY:NETMASK:HOSTNAME:IFACE:none")
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let st = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .context("running ip")?;
    if !st.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

/// Ethernet interfaces (type 1), by name.
pub fn nics() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    std::fs::read_to_string(format!("/sys/class/net/{n}/type"))
                        .is_ok_and(|t| t.trim() == "1")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn carrier(iface: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/carrier"))
        .is_ok_and(|c| c.trim() == "1")
}

/// Configures the network; returns one line per configured interface.
pub fn up(ip_params: &[String]) -> Result<Vec<String>> {
    let _ = ip(&["link", "set", "lo", "up"]);
    let configs = ip_params
        .iter()
        .map(|v| parse_ip(v))
        .collect::<Result<Vec<_>>>()?;
    if configs.contains(&IpConfig::Off) {
        return Ok(vec![]);
    }
    let mut done = Vec::new();
    let mut dhcp_ifaces: Vec<String> = Vec::new();
    let mut dhcp_all = configs.is_empty();
    for c in &configs {
        match c {
            IpConfig::Static {
                addr,
                prefix,
                gateway,
                iface,
                dns,
            } => {
                let iface = match iface {
                    Some(i) => i.clone(),
                    None => first_with_link(Duration::from_secs(10))?
                        .context("ip=: no interface named and none has link")?,
                };
                ip(&["link", "set", &iface, "up"])?;
                ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", &iface])?;
                if let Some(gw) = gateway {
                    ip(&["route", "replace", "default", "via", gw, "dev", &iface])?;
                }
                if !dns.is_empty() {
                    let conf: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
                    std::fs::write("/etc/resolv.conf", conf)?;
                }
                done.push(format!("{iface} {addr}/{prefix} (static)"));
            }
            IpConfig::Dhcp { iface: Some(i) } => dhcp_ifaces.push(i.clone()),
            IpConfig::Dhcp { iface: None } => dhcp_all = true,
            IpConfig::Off => {}
        }
    }
    if dhcp_all {
        dhcp_ifaces.extend(with_link(Duration::from_secs(10)));
    }
    dhcp_ifaces.dedup();
    done.extend(dhcp(&dhcp_ifaces));
    Ok(done)
}

fn first_with_link(wait: Duration) -> Result<Option<String>> {
    Ok(with_link(wait).into_iter().next())
}

/// Brings every NIC up and returns those with carrier once the link has had `wait` to come up
/// (returns as soon as all have it, or some have it and a short grace period passed).
fn with_link(wait: Duration) -> Vec<String> {
    let all = nics();
    for n in &all {
        let _ = ip(&["link", "set", n, "up"]);
    }
    let t0 = Instant::now();
    let mut first_seen: Option<Instant> = None;
    loop {
        let up: Vec<String> = all.iter().filter(|n| carrier(n)).cloned().collect();
        if up.len() == all.len() && !all.is_empty() {
            return up;
        }
        if !up.is_empty()
            && first_seen.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2)
        {
            return up;
        }
        if t0.elapsed() > wait {
            return up;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// DHCP on the interfaces in parallel; one line per lease.
fn dhcp(ifaces: &[String]) -> Vec<String> {
    let children: Vec<_> = ifaces
        .iter()
        .filter_map(|i| {
            Command::new("udhcpc")
                .args(["-i", i, "-s", "/usr/share/udhcpc/default.script"])
                .args(["-f", "-q", "-n", "-t", "5", "-T", "2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
                .map(|c| (i.clone(), c))
        })
        .collect();
    let mut out = Vec::new();
    for (i, mut c) in children {
        if c.wait().is_ok_and(|s| s.success()) {
            let lease = std::fs::read_to_string(format!("/run/bmr/dhcp-{i}")).unwrap_or_default();
            out.push(format!("{} (dhcp)", lease.trim()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dracut_ip_forms() {
        assert_eq!(parse_ip("dhcp").unwrap(), IpConfig::Dhcp { iface: None });
        assert_eq!(
            parse_ip("eth1:dhcp").unwrap(),
            IpConfig::Dhcp {
                iface: Some("eth1".into())
            }
        );
        assert_eq!(parse_ip("off").unwrap(), IpConfig::Off);
        assert_eq!(
            parse_ip("10.0.0.5::10.0.0.1:255.255.255.0:web1:eth0:none:10.0.0.53").unwrap(),
            IpConfig::Static {
                addr: "10.0.0.5".into(),
                prefix: 24,
                gateway: Some("10.0.0.1".into()),
                iface: Some("eth0".into()),
                dns: vec!["10.0.0.53".into()],
            }
        );
        assert!(parse_ip("10.0.0.5::10.0.0.1:255.0.255.0:web1:eth0:none").is_err());
        assert!(parse_ip("eth0:dhcp6").is_err());
    }
}
