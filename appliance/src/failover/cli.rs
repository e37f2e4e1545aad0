//! Command line of `appliance failover` (DESIGN.md §4: start|list|status|stop ...).

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct FailoverArgs {
    #[command(subcommand)]
    pub command: FailoverCommand,
}

#[derive(Subcommand)]
pub enum FailoverCommand {
    /// Run a snapshot as a VM (QEMU) on this appliance; restart a stopped or crashed one.
    Start(StartArgs),
    /// List failover VMs and their state.
    List(ListArgs),
    /// State, uptime and bytes changed since start of one VM.
    Status(VmArgs),
    /// Stop a VM: ACPI power button, then hard after --timeout. Its disks are kept.
    Stop(StopArgs),
    /// Publish a failback round (--final: cutover, the VM is stopped first).
    Round(RoundArgs),
    /// Save a PNG of the VM's screen.
    Screenshot(ScreenshotArgs),
    /// Remove a VM, its disks and its published rounds (the end of a failback: no rollback).
    Delete(DeleteArgs),
}

#[derive(Args)]
pub struct StartArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// Host whose snapshot to run (not needed to restart an existing VM).
    #[arg(long)]
    pub host: Option<String>,
    /// Snapshot id, or `latest`.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// VM name (letters, digits and -_.).
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Network: `none`, `user` (QEMU's NAT) or `bridge=BR` (qemu-bridge-helper).
    #[arg(long, default_value = "user")]
    pub net: String,
    /// virtio disk and NIC instead of the compatibility models (AHCI, e1000).
    #[arg(long)]
    pub virtio: bool,
    /// Accelerator: `auto` probes KVM with a short test guest and falls back to TCG.
    #[arg(long, value_parser = ["auto", "kvm", "tcg"], default_value = "auto")]
    pub accel: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VmArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StopArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub name: String,
    /// How long the guest gets to power off after the ACPI power button.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub timeout: Duration,
    /// Skip the ACPI power button: QEMU quits at once.
    #[arg(long)]
    pub hard: bool,
}

#[derive(Args)]
pub struct RoundArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub name: String,
    /// Cutover: stop the VM (ACPI, hard after --timeout) and publish its final state.
    #[arg(long)]
    pub r#final: bool,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScreenshotArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub name: String,
    /// PNG file to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct DeleteArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub name: String,
    /// Stop the VM hard first if it runs.
    #[arg(long)]
    pub force: bool,
}
