//! The one-shot first-boot script: pnputil for the staged packages, the old static IPv4 on
//! the new NIC, CrashControl back as it was.

use super::plan::*;
use super::*;
use crate::windows::hive::Data;
use anyhow::{Context, Result};

/// A static IPv4 configuration of the old NIC.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Ipv4 {
    pub(super) interface: String,
    pub(super) address: String,
    pub(super) mask: String,
    pub(super) gateway: Option<String>,
    pub(super) dns: Vec<String>,
}

/// The first interface of the Tcpip service with DHCP off and an address.
pub(super) fn static_ipv4(p: &mut Planner) -> Result<Option<Ipv4>> {
    let base = format!("{}\\Services\\Tcpip\\Parameters\\Interfaces", p.cs);
    let Some(snap) = p
        .vol
        .system
        .export(&base, Some(2))
        .with_context(|| format!("reading SYSTEM\\{base}"))?
    else {
        return Ok(None);
    };
    let mut found: Vec<Ipv4> = Vec::new();
    for k in snap.keys.values() {
        if k.path.eq_ignore_ascii_case(&base)
            || k.get("EnableDHCP").and_then(Data::as_dword) != Some(0)
        {
            continue;
        }
        let first = |n: &str| {
            k.get(n)
                .and_then(Data::as_list)
                .and_then(|l| l.into_iter().find(|s| !s.is_empty() && s != "0.0.0.0"))
        };
        let (Some(address), Some(mask)) = (first("IPAddress"), first("SubnetMask")) else {
            continue;
        };
        let dns = k
            .get("NameServer")
            .and_then(Data::as_str)
            .map(|s| {
                s.split([',', ' '])
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        found.push(Ipv4 {
            interface: k.path.rsplit('\\').next().unwrap_or("").to_string(),
            address,
            mask,
            gateway: first("DefaultGateway"),
            dns,
        });
    }
    for other in found.iter().skip(1) {
        p.plan.notes.push(format!(
            "static IPv4 {} of interface {} not carried: only the first static interface is",
            other.address, other.interface
        ));
    }
    Ok(found.into_iter().next())
}

pub(super) fn plan_first_boot(p: &mut Planner, ipv4: Option<&Ipv4>) -> Result<()> {
    let cs = p.cs.clone();
    let sw = HiveName::Software;
    let cv = "Microsoft\\Windows\\CurrentVersion";
    let ours = format!("%SystemRoot%\\{STAGING}");
    let current = p.value(sw, cv, "DevicePath")?;
    let mut parts: Vec<String> = current
        .as_ref()
        .and_then(Data::as_str)
        .unwrap_or("%SystemRoot%\\inf")
        .split(';')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if !parts.iter().any(|s| s.eq_ignore_ascii_case(&ours)) {
        parts.push(ours);
    }
    p.set(
        sw,
        cv,
        "DevicePath",
        Data::ExpandSz(parts.join(";")),
        "PnP looks for drivers of new devices in the staged packages",
    )?;
    let crash = format!("{cs}\\Control\\CrashControl");
    let auto_reboot = p.first_original(HiveName::System, &crash, "AutoReboot")?;
    let script = first_boot_script(
        &p.plan.staged,
        p.vol.target.build,
        ipv4,
        auto_reboot.as_ref(),
    );
    let path = p.vol.windows.join(STAGING).join(FIRSTBOOT);
    p.file(
        &path,
        Source::Text(script),
        "first boot: pnputil installs the staged packages, the old static IPv4 is carried",
    )?;
    p.set(
        sw,
        &format!("{cv}\\RunOnce"),
        RUNONCE_VALUE,
        Data::Sz(format!(
            "cmd.exe /c \"%SystemRoot%\\{STAGING}\\{FIRSTBOOT}\""
        )),
        "run the first-boot script once",
    )?;
    p.set(
        HiveName::System,
        &crash,
        "AutoReboot",
        Data::Dword(0),
        "a stop error at first boot stays on screen instead of a reboot loop (the first-boot \
         script restores the old value)",
    )
}

/// The first-boot script (CRLF: cmd.exe's labels and blocks misparse LF-only files).
pub(super) fn first_boot_script(
    staged: &[String],
    build: u32,
    ipv4: Option<&Ipv4>,
    auto_reboot: Option<&Data>,
) -> String {
    let mut s = vec![
        "@echo off".to_string(),
        "rem bmr first boot: installs the driver packages the restore staged, then removes itself."
            .to_string(),
        "rem Written by drivers-inject; record.json beside it lists every offline change.".into(),
        "setlocal".into(),
        format!("set \"BMR=%SystemRoot%\\{STAGING}\""),
        "set \"LOG=%BMR%\\firstboot.log\"".into(),
        "echo [%DATE% %TIME%] bmr first boot >> \"%LOG%\"".into(),
    ];
    for inf in staged {
        let rel = inf
            .strip_prefix(&format!("{STAGING}/"))
            .unwrap_or(inf)
            .replace('/', "\\");
        // pnputil's /add-driver syntax is Windows 10 1607 and later; -i -a before.
        let cmd = if build >= 14393 {
            format!("pnputil /add-driver \"%BMR%\\{rel}\" /install")
        } else {
            format!("pnputil -i -a \"%BMR%\\{rel}\"")
        };
        s.push(format!("{cmd} >> \"%LOG%\" 2>&1"));
        s.push(format!(
            "echo pnputil {rel}: exit %ERRORLEVEL% >> \"%LOG%\""
        ));
    }
    if let Some(ip) = ipv4 {
        s.push(format!(
            "rem The static IPv4 of the old NIC {}, set on the first connected adapter (a \
             heuristic: netsh's English \"Connected\" state, the first one listed).",
            ip.interface
        ));
        s.push("set \"BMR_IF=\"".into());
        s.push(
            "for /f \"skip=3 tokens=1,2,3*\" %%a in ('netsh interface show interface') do if /i \
             \"%%b\"==\"Connected\" if not defined BMR_IF set \"BMR_IF=%%d\""
                .into(),
        );
        s.push("if defined BMR_IF (".into());
        let gw = ip
            .gateway
            .as_ref()
            .map(|g| format!(" {g} 1"))
            .unwrap_or_default();
        s.push(format!(
            "  netsh interface ip set address name=\"%BMR_IF%\" static {} {}{gw} >> \"%LOG%\" 2>&1",
            ip.address, ip.mask
        ));
        for (i, d) in ip.dns.iter().enumerate() {
            if i == 0 {
                s.push(format!(
                    "  netsh interface ip set dns name=\"%BMR_IF%\" static {d} primary >> \"%LOG%\" 2>&1"
                ));
            } else {
                s.push(format!(
                    "  netsh interface ip add dns name=\"%BMR_IF%\" {d} index={} >> \"%LOG%\" 2>&1",
                    i + 1
                ));
            }
        }
        s.push(") else (".into());
        s.push(format!(
            "  echo no connected adapter: static IPv4 {} not set >> \"%LOG%\"",
            ip.address
        ));
        s.push(")".into());
    }
    let crash = "HKLM\\SYSTEM\\CurrentControlSet\\Control\\CrashControl";
    s.push(match auto_reboot {
        Some(Data::Dword(v)) => {
            format!("reg add \"{crash}\" /v AutoReboot /t REG_DWORD /d {v} /f >> \"%LOG%\" 2>&1")
        }
        _ => format!("reg delete \"{crash}\" /v AutoReboot /f >> \"%LOG%\" 2>&1"),
    });
    s.push("echo [%DATE% %TIME%] done >> \"%LOG%\"".into());
    s.push("(goto) 2>nul & del \"%~f0\"".into());
    let mut out = s.join("\r\n");
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_boot_script_shape() {
        let ip = Ipv4 {
            interface: "{1}".into(),
            address: "10.0.0.5".into(),
            mask: "255.255.255.0".into(),
            gateway: Some("10.0.0.1".into()),
            dns: vec!["10.0.0.2".into(), "10.0.0.3".into()],
        };
        let s = first_boot_script(
            &["bmr-drivers/netkvm/netkvm.inf".into()],
            17763,
            Some(&ip),
            Some(&Data::Dword(1)),
        );
        assert!(s.contains("pnputil /add-driver \"%BMR%\\netkvm\\netkvm.inf\" /install"));
        assert!(s.contains("static 10.0.0.5 255.255.255.0 10.0.0.1 1"));
        assert!(s.contains("add dns name=\"%BMR_IF%\" 10.0.0.3 index=2"));
        assert!(s.contains("/v AutoReboot /t REG_DWORD /d 1 /f"));
        assert!(s.ends_with("del \"%~f0\"\r\n"));
        assert!(!s.replace("\r\n", "").contains('\n'), "CRLF only");
        let old = first_boot_script(&["bmr-drivers/v/v.inf".into()], 7601, None, None);
        assert!(old.contains("pnputil -i -a \"%BMR%\\v\\v.inf\""));
        assert!(old.contains("reg delete"));
    }
}
