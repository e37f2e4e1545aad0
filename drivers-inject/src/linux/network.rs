//! The restored system's NICs, as its own network configs name them, mapped to this machine's.
//!
//! Configs bind to a NIC by name or by MAC. A MAC binding is rewritten to the new NIC's MAC
//! (systemd-networkd and `.link` `[Match]`, netplan `match: macaddress:`, NetworkManager
//! `mac-address=`, RHEL/SUSE `ifcfg` `HWADDR=`, udev `70-persistent-net.rules`). A name binding
//! (ifupdown, networkd `Name=`, NetworkManager `interface-name=`, `ifcfg` `DEVICE=`) is kept as it
//! is and the old name is pinned to the new NIC with a systemd `.link` file matching its MAC:
//! every config that names the interface keeps working, whatever the restored udev would call
//! the new NIC (docs/adapt.md says why this beats predicting the new name).

use super::Ctx;
use anyhow::Result;
use serde::Serialize;

/// A NIC the restored system knew, from its manifest entry or its configs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OldNic {
    pub name: Option<String>,
    pub mac: Option<String>,
    /// Where it was found (`/etc/network/interfaces`, `manifest`).
    pub from: String,
}

/// One old NIC mapped to one of this machine's NICs.
#[derive(Debug, Clone, Serialize)]
pub struct NicMapping {
    pub old: OldNic,
    /// This machine's NIC: its MAC, PCI address and driver.
    pub new_mac: String,
    pub new_pci: Option<String>,
    pub new_driver: Option<String>,
    /// The same NIC as before (same MAC): nothing to do.
    pub same: bool,
}

const NETWORKD: &str = "etc/systemd/network";
const NETPLAN: &str = "etc/netplan";
const NM: &str = "etc/NetworkManager/system-connections";
const IFCFG: [&str; 2] = ["etc/sysconfig/network-scripts", "etc/sysconfig/network"];
const PERSISTENT_NET: &str = "etc/udev/rules.d/70-persistent-net.rules";

fn is_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn norm_mac(s: &str) -> String {
    s.trim_matches(|c| c == '"' || c == '\'')
        .to_ascii_lowercase()
}

/// Plain interface names only (no globs, no `lo`, VLAN and alias suffixes cut).
fn iface_name(s: &str) -> Option<String> {
    let s = s.trim_matches(|c| c == '"' || c == '\'');
    let base = s.split(['.', ':']).next()?;
    let ok = !base.is_empty()
        && base != "lo"
        && base.len() <= 15
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then(|| base.to_string())
}

/// Files of `dir` (relative) ending with one of `exts` (any when empty), sorted.
fn files(ctx: &Ctx, dir: &str, exts: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(ctx.changes.path(dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| exts.is_empty() || exts.iter().any(|x| n.ends_with(x)))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    v.sort();
    v
}

/// `key=value` lines of an INI-style file, with the section each is in.
fn ini(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for l in text.lines() {
        let l = l.trim();
        if l.starts_with('[') && l.ends_with(']') {
            section = l[1..l.len() - 1].to_string();
        } else if let Some((k, v)) = l.split_once('=') {
            if !l.starts_with('#') && !l.starts_with(';') {
                out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// The old NICs named in the restored system's configs, in the order first seen.
pub fn discover(ctx: &Ctx) -> Vec<OldNic> {
    let mut found: Vec<OldNic> = Vec::new();
    let mut add = |name: Option<String>, mac: Option<String>, from: &str| {
        let mac = mac.filter(|m| is_mac(m)).map(|m| norm_mac(&m));
        if name.is_none() && mac.is_none() {
            return;
        }
        if let Some(n) = found
            .iter_mut()
            .find(|n| (mac.is_some() && n.mac == mac) || (name.is_some() && n.name == name))
        {
            n.name = n.name.clone().or(name);
            n.mac = n.mac.clone().or(mac);
            return;
        }
        found.push(OldNic {
            name,
            mac,
            from: format!("/{from}"),
        });
    };
    // ifupdown
    let mut ifupdown = vec!["etc/network/interfaces".to_string()];
    ifupdown.extend(files(ctx, "etc/network/interfaces.d", &[]));
    for f in &ifupdown {
        let Some(text) = ctx.changes.read(f) else {
            continue;
        };
        for l in text.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.first().copied() {
                Some("iface") | Some("auto") | Some("allow-hotplug") => {
                    for n in &w[1..] {
                        if *n == "inet" || *n == "inet6" {
                            break;
                        }
                        add(iface_name(n), None, f);
                    }
                }
                Some("bridge_ports") | Some("bridge-ports") | Some("bond-slaves") => {
                    for n in &w[1..] {
                        if *n != "none" {
                            add(iface_name(n), None, f);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    // systemd-networkd and .link
    for f in files(ctx, NETWORKD, &[".network", ".link"]) {
        let Some(text) = ctx.changes.read(&f) else {
            continue;
        };
        let kv = ini(&text);
        let get = |sec: &str, key: &str| {
            kv.iter()
                .filter(|(s, k, _)| s == sec && k == key)
                .map(|(_, _, v)| v.clone())
                .next_back()
        };
        let macs = get("Match", "MACAddress");
        let name = if f.ends_with(".link") {
            get("Link", "Name")
        } else {
            get("Match", "Name").filter(|n| !n.contains(['*', '?', '[', ' ']))
        };
        match macs {
            Some(m) => {
                for m in m.split_whitespace() {
                    add(
                        name.clone().and_then(|n| iface_name(&n)),
                        Some(m.into()),
                        &f,
                    );
                }
            }
            None => add(name.and_then(|n| iface_name(&n)), None, &f),
        }
    }
    // netplan: ethernets ids, match: macaddress, set-name
    for f in files(ctx, NETPLAN, &[".yaml", ".yml"]) {
        let Some(text) = ctx.changes.read(&f) else {
            continue;
        };
        for (id, mac, set_name) in netplan_ethernets(&text) {
            let name = set_name.or_else(|| mac.is_none().then_some(id));
            add(name.and_then(|n| iface_name(&n)), mac, &f);
        }
    }
    // NetworkManager keyfiles
    for f in files(ctx, NM, &[]) {
        let Some(text) = ctx.changes.read(&f) else {
            continue;
        };
        let kv = ini(&text);
        let name = kv
            .iter()
            .find(|(s, k, _)| s == "connection" && k == "interface-name")
            .and_then(|(_, _, v)| iface_name(v));
        let mac = kv
            .iter()
            .find(|(s, k, _)| s == "ethernet" && k == "mac-address")
            .map(|(_, _, v)| v.clone());
        add(name, mac, &f);
    }
    // ifcfg
    for dir in IFCFG {
        for f in files(ctx, dir, &[]) {
            if !f
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("ifcfg-"))
            {
                continue;
            }
            let Some(text) = ctx.changes.read(&f) else {
                continue;
            };
            let val = |key: &str| {
                text.lines()
                    .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                    .map(|v| v.trim_matches(|c| c == '"' || c == '\'').to_string())
                    .next_back()
            };
            add(
                val("DEVICE").and_then(|n| iface_name(&n)),
                val("HWADDR"),
                &f,
            );
        }
    }
    // persistent-net rules
    if let Some(text) = ctx.changes.read(PERSISTENT_NET) {
        for l in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let field = |key: &str| {
                let i = l.find(key)? + key.len();
                let rest = l[i..].trim_start_matches(['=', '"']);
                Some(rest.split('"').next()?.to_string())
            };
            add(
                field("NAME=").and_then(|n| iface_name(&n)),
                field("ATTR{address}=="),
                PERSISTENT_NET,
            );
        }
    }
    found
}

/// `(id, match macaddress, set-name)` of every entry under `ethernets:` of a netplan file
/// (a small indentation-based reader for the shapes netplan documents).
fn netplan_ethernets(text: &str) -> Vec<(String, Option<String>, Option<String>)> {
    let mut out: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    let mut eth_indent: Option<usize> = None;
    let mut id_indent: Option<usize> = None;
    let mut in_match = None::<usize>;
    for l in text.lines() {
        let body = l.split(" #").next().unwrap_or("");
        if body.trim().is_empty() || body.trim_start().starts_with('#') {
            continue;
        }
        let ind = body.len() - body.trim_start().len();
        let t = body.trim();
        let (k, v) = match t.split_once(':') {
            Some((k, v)) => (k.trim(), v.trim().trim_matches(|c| c == '"' || c == '\'')),
            None => continue,
        };
        if let Some(e) = eth_indent {
            if ind <= e {
                eth_indent = None;
                id_indent = None;
            }
        }
        if eth_indent.is_none() {
            if k == "ethernets" {
                eth_indent = Some(ind);
            }
            continue;
        }
        match id_indent {
            None => id_indent = Some(ind),
            Some(i) if ind < i => id_indent = Some(ind),
            _ => {}
        }
        if Some(ind) == id_indent {
            out.push((k.to_string(), None, None));
            in_match = None;
            continue;
        }
        if let Some(m) = in_match {
            if ind <= m {
                in_match = None;
            }
        }
        let Some(cur) = out.last_mut() else {
            continue;
        };
        match k {
            "match" => in_match = Some(ind),
            "macaddress" if in_match.is_some() => cur.1 = Some(norm_mac(v)),
            "set-name" => cur.2 = Some(v.to_string()),
            _ => {}
        }
    }
    out
}

/// Replaces `old` MAC by `new` in the values of lines that `is_key` accepts, case-insensitively,
/// keeping the line's case style; returns the new text if anything changed.
fn replace_mac(
    text: &str,
    old: &str,
    new: &str,
    is_key: impl Fn(&str, &str) -> bool,
) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut section = String::new();
    let mut changed = false;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            section = t[1..t.len() - 1].to_string();
        }
        let lower = line.to_ascii_lowercase();
        match lower.find(old) {
            Some(i) if !t.starts_with('#') && is_key(&section, t) => {
                let upper = line[i..i + old.len()]
                    .chars()
                    .any(|c| c.is_ascii_uppercase());
                let repl = if upper {
                    new.to_ascii_uppercase()
                } else {
                    new.to_string()
                };
                out.push_str(&line[..i]);
                out.push_str(&repl);
                out.push_str(&line[i + old.len()..]);
                changed = true;
            }
            _ => out.push_str(line),
        }
    }
    changed.then_some(out)
}

/// Whether a line (in its INI section) binds to a NIC by MAC.
type IsKey = fn(&str, &str) -> bool;

/// Every config file that binds to NICs by MAC, with the test for the lines that do.
fn mac_bindings(ctx: &Ctx) -> Vec<(String, IsKey)> {
    let mut v: Vec<(String, IsKey)> = Vec::new();
    for f in files(ctx, NETWORKD, &[".network", ".link", ".netdev"]) {
        v.push((f, |sec, l| {
            sec == "Match" && (l.starts_with("MACAddress") || l.starts_with("PermanentMACAddress"))
        }));
    }
    for f in files(ctx, NETPLAN, &[".yaml", ".yml"]) {
        // `macaddress:` directly under `match:` (a `macaddress:` beside it sets the MAC).
        v.push((f, |_, l| l.starts_with("macaddress:")));
    }
    for f in files(ctx, NM, &[]) {
        v.push((f, |sec, l| {
            sec == "ethernet" && l.starts_with("mac-address=")
        }));
    }
    for dir in IFCFG {
        for f in files(ctx, dir, &[]) {
            if f.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("ifcfg-"))
            {
                v.push((f, |_, l| l.starts_with("HWADDR=")));
            }
        }
    }
    if ctx.changes.path(PERSISTENT_NET).exists() {
        v.push((PERSISTENT_NET.into(), |_, l| l.contains("ATTR{address}")));
    }
    v
}

/// Netplan files need the `match:` context: only `macaddress:` lines nested in a `match:`.
fn netplan_rewrite(text: &str, old: &str, new: &str) -> Option<String> {
    let mut out = String::new();
    let mut match_indent: Option<usize> = None;
    let mut changed = false;
    for line in text.split_inclusive('\n') {
        let ind = line.len() - line.trim_start().len();
        let t = line.trim();
        if let Some(m) = match_indent {
            if !t.is_empty() && ind <= m {
                match_indent = None;
            }
        }
        if t.starts_with("match:") {
            match_indent = Some(ind);
        }
        if match_indent.is_some() && t.starts_with("macaddress:") {
            if let Some(r) = replace_mac(line, old, new, |_, _| true) {
                out.push_str(&r);
                changed = true;
                continue;
            }
        }
        out.push_str(line);
    }
    changed.then_some(out)
}

/// Applies the mapping: MAC bindings rewritten, names pinned. Returns one line per NIC.
pub fn apply(ctx: &mut Ctx, maps: &[NicMapping]) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for m in maps.iter().filter(|m| !m.same) {
        let new_mac = m.new_mac.to_ascii_lowercase();
        let what = format!(
            "NIC {} is now {}{}{}",
            match (&m.old.name, &m.old.mac) {
                (Some(n), Some(x)) => format!("{n} ({x})"),
                (Some(n), None) => n.clone(),
                (None, Some(x)) => format!("with MAC {x}"),
                (None, None) => "?".into(),
            },
            new_mac,
            m.new_pci
                .as_ref()
                .map(|p| format!(" at {p}"))
                .unwrap_or_default(),
            m.new_driver
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
        );
        let mut pinned_by_config = false;
        if let Some(old_mac) = &m.old.mac {
            for (f, is_key) in mac_bindings(ctx) {
                let Some(text) = ctx.changes.read(&f) else {
                    continue;
                };
                let new_text = if f.starts_with(NETPLAN) {
                    netplan_rewrite(&text, old_mac, &new_mac)
                } else {
                    replace_mac(&text, old_mac, &new_mac, is_key)
                };
                if let Some(t) = new_text {
                    // A config that renames by MAC now gives the old name to the new NIC.
                    pinned_by_config |= t.contains("set-name:")
                        || t.contains("NAME=")
                        || (f.ends_with(".link") && t.contains("Name="));
                    ctx.changes.write(&f, &t, &format!("{what}: MAC binding"))?;
                }
            }
        }
        let Some(name) = &m.old.name else {
            lines.push(what);
            continue;
        };
        if pinned_by_config {
            lines.push(format!(
                "{what}: the config that names it now matches the new MAC"
            ));
            continue;
        }
        let predicted = ctx
            .inventory
            .nics
            .iter()
            .find(|n| n.mac.eq_ignore_ascii_case(&m.new_mac))
            .and_then(|n| n.predictable.clone());
        if predicted.as_deref() == Some(name) && ctx.net_ifnames {
            lines.push(format!("{what}: it keeps the name {name}"));
            continue;
        }
        let link = format!("{NETWORKD}/10-bmr-{name}.link");
        let content =
            format!(
            "# Written by the bmr restorer: this system's NIC {name}{} is now the NIC with MAC\n\
             # {new_mac}{}{}; this keeps its name so that the configs naming {name} still apply.\n\
             [Match]\nMACAddress={new_mac}\n\n[Link]\nName={name}\n",
            m.old.mac.as_ref().map(|x| format!(" (MAC {x})")).unwrap_or_default(),
            m.new_pci.as_ref().map(|p| format!(" at PCI {p}")).unwrap_or_default(),
            m.new_driver.as_ref().map(|d| format!(", driver {d}")).unwrap_or_default(),
        );
        ctx.changes
            .write(&link, &content, &format!("{what}: keeps the name {name}"))?;
        ctx.pinned_links = true;
        lines.push(format!(
            "{what}: name {name} pinned to it (/{link}){}",
            predicted
                .map(|p| format!("; udev would have called it {p}"))
                .unwrap_or_default()
        ));
    }
    Ok(lines)
}

/// Maps old NICs to this machine's: explicit `OLD=NEW` pairs first (by name or MAC on either
/// side, NEW also by PCI address), then NICs whose MAC is unchanged, then the rest in order
/// (old: as found; new: by PCI address).
pub fn map(
    old: &[OldNic],
    new: &[crate::inventory::Nic],
    explicit: &[(String, String)],
) -> (Vec<NicMapping>, Vec<String>) {
    let mut maps = Vec::new();
    let mut warnings = Vec::new();
    let mut free_new: Vec<&crate::inventory::Nic> = new.iter().collect();
    let mut free_old: Vec<&OldNic> = old.iter().collect();
    let mk = |o: &OldNic, n: &crate::inventory::Nic| NicMapping {
        old: o.clone(),
        new_mac: n.mac.clone(),
        new_pci: n.pci.clone(),
        new_driver: n.driver.clone(),
        same: o
            .mac
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(&n.mac)),
    };
    for (o, n) in explicit {
        let oi = free_old.iter().position(|x| {
            x.name.as_deref() == Some(o)
                || x.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(o))
        });
        let ni = free_new.iter().position(|x| {
            x.mac.eq_ignore_ascii_case(n) || x.name == *n || x.pci.as_deref() == Some(n)
        });
        match (oi, ni) {
            (Some(oi), Some(ni)) => {
                maps.push(mk(free_old[oi], free_new[ni]));
                free_old.remove(oi);
                free_new.remove(ni);
            }
            (None, _) => warnings.push(format!(
                "--nic-map {o}={n}: the restored system has no NIC {o}"
            )),
            (_, None) => warnings.push(format!("--nic-map {o}={n}: this machine has no NIC {n}")),
        }
    }
    free_old.retain(|o| {
        let Some(m) = &o.mac else { return true };
        match free_new.iter().position(|n| n.mac.eq_ignore_ascii_case(m)) {
            Some(ni) => {
                maps.push(mk(o, free_new[ni]));
                free_new.remove(ni);
                false
            }
            None => true,
        }
    });
    for o in free_old {
        if free_new.is_empty() {
            warnings.push(format!(
                "the restored system's NIC {} has no NIC left to map to on this machine",
                o.name.as_deref().or(o.mac.as_deref()).unwrap_or("?")
            ));
            continue;
        }
        maps.push(mk(o, free_new.remove(0)));
    }
    (maps, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netplan_shapes() {
        let y = "network:\n  version: 2\n  renderer: networkd\n  ethernets:\n    lan:\n      match:\n        macaddress: \"52:54:00:12:34:56\"\n      set-name: lan0\n      addresses: [10.0.2.15/24]\n      macaddress: 02:00:00:00:00:01 # spoofed\n    enp0s3:\n      dhcp4: true\n  bridges:\n    br0:\n      interfaces: [lan0]\n";
        let e = netplan_ethernets(y);
        assert_eq!(
            e,
            [
                (
                    "lan".into(),
                    Some("52:54:00:12:34:56".into()),
                    Some("lan0".into())
                ),
                ("enp0s3".into(), None, None)
            ]
        );
        let r = netplan_rewrite(y, "52:54:00:12:34:56", "52:54:00:ab:cd:ef").unwrap();
        assert!(r.contains("macaddress: \"52:54:00:ab:cd:ef\""));
        // The MAC it sets (not under match:) is left alone.
        assert!(r.contains("macaddress: 02:00:00:00:00:01"));
        assert!(netplan_rewrite(y, "02:00:00:00:00:01", "52:54:00:ab:cd:ef").is_none());
    }

    #[test]
    fn mac_rewrite_keeps_case_and_section() {
        let network =
            "[Match]\nMACAddress=52:54:00:12:34:56\n\n[Link]\nMACAddress=52:54:00:12:34:56\n";
        let out = replace_mac(network, "52:54:00:12:34:56", "52:54:00:ab:cd:ef", |s, l| {
            s == "Match" && l.starts_with("MACAddress")
        })
        .unwrap();
        assert_eq!(
            out,
            "[Match]\nMACAddress=52:54:00:ab:cd:ef\n\n[Link]\nMACAddress=52:54:00:12:34:56\n"
        );
        let ifcfg = "DEVICE=eth0\nHWADDR=52:54:00:AA:BB:CC\n";
        let out = replace_mac(ifcfg, "52:54:00:aa:bb:cc", "52:54:00:ab:cd:ef", |_, l| {
            l.starts_with("HWADDR=")
        })
        .unwrap();
        assert_eq!(out, "DEVICE=eth0\nHWADDR=52:54:00:AB:CD:EF\n");
    }

    fn nic(name: &str, mac: &str, pci: &str) -> crate::inventory::Nic {
        crate::inventory::Nic {
            name: name.into(),
            mac: mac.into(),
            pci: Some(pci.into()),
            driver: None,
            predictable: None,
        }
    }

    #[test]
    fn mapping_order() {
        let old = vec![
            OldNic {
                name: Some("enp0s3".into()),
                mac: None,
                from: "a".into(),
            },
            OldNic {
                name: Some("enp0s4".into()),
                mac: Some("52:54:00:00:00:02".into()),
                from: "b".into(),
            },
        ];
        let new = vec![
            nic("eth0", "52:54:00:00:00:09", "0000:00:05.0"),
            nic("eth1", "52:54:00:00:00:02", "0000:00:06.0"),
        ];
        let (m, w) = map(&old, &new, &[]);
        assert!(w.is_empty());
        assert_eq!(m.len(), 2);
        assert!(m[0].same && m[0].old.name.as_deref() == Some("enp0s4"));
        assert!(!m[1].same && m[1].new_mac == "52:54:00:00:00:09");
        let (m, _) = map(&old, &new, &[("enp0s3".into(), "0000:00:06.0".into())]);
        assert_eq!(m[0].new_mac, "52:54:00:00:00:02");
        assert!(!m[1].same);
    }
}

#[cfg(test)]
mod restored_root {
    use super::*;
    use crate::inventory::Nic;

    fn write(root: &std::path::Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// Real-format configs of every kind, with comments, includes and things to leave alone;
    /// discovered, mapped in PCI order to new NICs, rewritten.
    #[test]
    fn every_config_kind() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write(root, "etc/network/interfaces", "# The loopback network interface\nsource /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n#iface eth9 inet dhcp\n");
        write(root, "etc/network/interfaces.d/lan", "allow-hotplug enp0s3\niface enp0s3 inet static\n    address 10.0.2.15/24\n    gateway 10.0.2.2\n    hwaddress ether 02:00:00:00:00:77\n");
        write(
            root,
            "etc/systemd/network/20-wan.network",
            "# WAN by MAC\n[Match]\nMACAddress=52:54:00:12:34:57\n\n[Network]\nDHCP=yes\n",
        );
        write(
            root,
            "etc/systemd/network/30-spoof.link",
            "[Match]\nOriginalName=*\n\n[Link]\nMACAddress=02:00:00:00:00:99\n",
        );
        write(root, "etc/NetworkManager/system-connections/mgmt.nmconnection", "[connection]\nid=mgmt\ntype=ethernet\n\n[ethernet]\nmac-address=52:54:00:12:34:58\ncloned-mac-address=52:54:00:12:34:58\n\n[ipv4]\nmethod=auto\n");
        write(root, PERSISTENT_NET, "# This file was automatically generated by the /lib/udev/write_net_rules\nSUBSYSTEM==\"net\", ACTION==\"add\", DRIVERS==\"?*\", ATTR{address}==\"52:54:00:12:34:59\", ATTR{type}==\"1\", KERNEL==\"eth*\", NAME=\"eth7\"\n");
        let nic = |i: u8| Nic {
            name: format!("eth{i}"),
            mac: format!("52:54:00:be:ef:0{i}"),
            pci: Some(format!("0000:00:0{}.0", i + 4)),
            driver: Some("e1000e".into()),
            predictable: Some(format!("enp0s{}", i + 4)),
        };
        let inv = crate::linux::test_inventory((0..4).map(nic).collect());
        let mut ctx = Ctx::for_test(root, &inv);
        let old = discover(&ctx);
        let names: Vec<(Option<&str>, Option<&str>)> = old
            .iter()
            .map(|o| (o.name.as_deref(), o.mac.as_deref()))
            .collect();
        assert_eq!(
            names,
            [
                (Some("enp0s3"), None),
                (None, Some("52:54:00:12:34:57")),
                (None, Some("52:54:00:12:34:58")),
                (Some("eth7"), Some("52:54:00:12:34:59")),
            ]
        );
        let (maps, warnings) = map(&old, &inv.nics, &[]);
        assert!(warnings.is_empty(), "{warnings:?}");
        let lines = apply(&mut ctx, &maps).unwrap();
        assert_eq!(lines.len(), 4, "{lines:?}");
        let read = |rel: &str| std::fs::read_to_string(root.join(rel)).unwrap();
        // The name binding is pinned to the first new NIC; its config is untouched.
        assert!(read("etc/systemd/network/10-bmr-enp0s3.link")
            .contains("MACAddress=52:54:00:be:ef:00\n\n[Link]\nName=enp0s3\n"));
        assert!(read("etc/network/interfaces.d/lan").contains("hwaddress ether 02:00:00:00:00:77"));
        assert!(
            read("etc/systemd/network/20-wan.network").contains("MACAddress=52:54:00:be:ef:01\n")
        );
        assert_eq!(
            read("etc/systemd/network/30-spoof.link"),
            "[Match]\nOriginalName=*\n\n[Link]\nMACAddress=02:00:00:00:00:99\n"
        );
        let nm = read("etc/NetworkManager/system-connections/mgmt.nmconnection");
        assert!(
            nm.contains("\nmac-address=52:54:00:be:ef:02\n")
                && nm.contains("cloned-mac-address=52:54:00:12:34:58"),
            "{nm}"
        );
        let rules = read(PERSISTENT_NET);
        assert!(
            rules.contains("ATTR{address}==\"52:54:00:be:ef:03\"")
                && rules.contains("NAME=\"eth7\""),
            "{rules}"
        );
        // eth7 is named by its own rule: no .link for it.
        assert!(!root.join("etc/systemd/network/10-bmr-eth7.link").exists());
        // Originals kept outside the config directories.
        assert!(root
            .join("var/lib/bmr/pre-restore/etc/systemd/network/20-wan.network")
            .exists());
        assert!(!root
            .join("etc/systemd/network/20-wan.network.pre-restore")
            .exists());
        assert_eq!(ctx.changes.list.len(), 4);
    }

    /// The NIC whose predictable name is unchanged needs nothing.
    #[test]
    fn same_name_same_place_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write(
            root,
            "etc/network/interfaces",
            "auto enp0s3\niface enp0s3 inet dhcp\n",
        );
        let inv = crate::linux::test_inventory(vec![Nic {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            pci: Some("0000:00:03.0".into()),
            driver: Some("virtio_net".into()),
            predictable: Some("enp0s3".into()),
        }]);
        let mut ctx = Ctx::for_test(root, &inv);
        let old = discover(&ctx);
        let (maps, _) = map(&old, &inv.nics, &[]);
        let lines = apply(&mut ctx, &maps).unwrap();
        assert!(lines[0].contains("keeps the name enp0s3"), "{lines:?}");
        assert!(ctx.changes.list.is_empty());
    }
}
