//! Running the external tools the build uses (apt-get, dpkg-deb, depmod, mtools, xorriso...).

use anyhow::{bail, Context, Result};
use std::process::Command;

/// Runs `cmd`, failing with its stderr when it exits non-zero. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("running {desc} (is the tool installed?)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{desc} failed ({}): {}", out.status, err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that the programs `tools` name exist, listing the Debian packages to install if not.
pub fn require_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<_> = tools
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .collect();
    if !missing.is_empty() {
        let bins: Vec<_> = missing.iter().map(|(b, _)| *b).collect();
        let mut pkgs: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
        pkgs.dedup();
        bail!(
            "missing tools {}: apt-get install {}",
            bins.join(", "),
            pkgs.join(" ")
        );
    }
    Ok(())
}

pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
