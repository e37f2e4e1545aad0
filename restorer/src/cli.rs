//! Command line of `restorer` (names and main flags are a contract: DESIGN.md §4).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "restorer",
    version,
    about = "Restore, verify, capture and fail back server disks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Plan, then restore a snapshot onto this machine's disks.
    Restore(RestoreArgs),
    /// Compare target disks with a snapshot.
    Verify(VerifyArgs),
    /// Upload this machine's disks to an appliance.
    Capture(CaptureArgs),
    /// Run as PID 1 in the boot image.
    Init,
}

/// Where the snapshot comes from and how to trust it.
#[derive(clap::Args, Clone)]
pub struct SourceArgs {
    /// Store base URL (http://HOST:PORT/store) or a local store directory.
    #[arg(long)]
    pub from: String,
    #[arg(long)]
    pub host: String,
    /// Snapshot id, or `latest`.
    #[arg(long, default_value = "latest")]
    pub snapshot: String,
    /// Refuse manifests not signed by this key (hex file as `appliance pubkey` prints it).
    #[arg(long)]
    pub pubkey: Option<PathBuf>,
    /// Bearer token for `appliance serve`.
    #[arg(long)]
    pub token: Option<String>,
    /// CA certificate (PEM) for HTTPS.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Target block devices or files, comma-separated, in source disk order; or `auto`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// Show the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    /// Grow the last partition and its filesystem onto a bigger disk.
    #[arg(long, value_parser = ["last", "none"], default_value = "last")]
    pub grow: String,
    /// Chunk fetches in flight.
    #[arg(long, default_value_t = 16)]
    pub jobs: usize,
    /// On failure keep what was written instead of wiping the partition table.
    #[arg(long)]
    pub keep_on_error: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct CaptureArgs {
    /// Appliance base URL (http://HOST:PORT).
    #[arg(long)]
    pub to: String,
    #[arg(long)]
    pub host: String,
    #[arg(long)]
    pub token: Option<String>,
    #[arg(long)]
    pub ca: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
}
