//! Command line of `restorer` (names and main flags are a contract: DESIGN.md §4).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Bring a failover VM's disks back onto this machine: rounds, then cutover.
    Failback(FailbackArgs),
    /// Adapt an already-restored (or moved) system on these disks to this machine.
    Adapt(AdaptArgs),
    /// Run as PID 1 in the boot image.
    Init,
}

/// How to reach a server: token, CA, retry policy.
#[derive(clap::Args, Clone, Debug)]
pub struct NetArgs {
    /// Bearer token for `appliance serve`.
    #[arg(long)]
    pub token: Option<String>,
    /// CA certificate (PEM) for HTTPS.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// How long to keep retrying while the server is unreachable (e.g. 10m, 90s, 1h).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub retry_for: Duration,
    /// Timeout of one HTTP request.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub timeout: Duration,
}

impl NetArgs {
    pub fn http_options(&self) -> snapshot::store::http::Options {
        snapshot::store::http::Options {
            token: self.token.clone(),
            ca: self.ca.clone(),
            retry_for: self.retry_for,
            timeout: self.timeout,
        }
    }
}

/// Where the snapshot comes from and how to trust it.
#[derive(clap::Args, Clone, Debug)]
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
    #[command(flatten)]
    pub net: NetArgs,
}

/// How source disks are laid out on the targets.
#[derive(clap::Args, Clone, Debug)]
pub struct LayoutArgs {
    /// Target block devices or files, comma-separated, in source disk order; or `auto`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// On a bigger target, grow the last partition and its filesystem (`last`) or keep the
    /// source sizes (`none`).
    #[arg(long, value_parser = ["last", "none"], default_value = "last")]
    pub grow: String,
    /// The LV of a grown LVM2 PV that takes the new extents (its filesystem grows too), as
    /// VG/LV; default: the LV whose filesystem holds the most used data.
    #[arg(long, value_name = "VG/LV")]
    pub grow_lv: Option<String>,
}

impl LayoutArgs {
    pub fn grow_last(&self) -> bool {
        self.grow == "last"
    }
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Show the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan and the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Chunk fetches in flight (12: more writes queued while other workers fetch and hash;
    /// measured faster than 8 on 2 cores, docs/benchmarks.md).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// On failure keep what was written instead of wiping the partition table.
    #[arg(long)]
    pub keep_on_error: bool,
    /// After the restore, write a UEFI boot entry for the restored system's loader on its ESP
    /// (first in BootOrder; needs a UEFI-booted machine and block device targets).
    #[arg(long)]
    pub efi_boot_entry: bool,
    /// Restore the bytes only: do not adapt the restored OS to this machine.
    #[arg(long)]
    pub no_adapt: bool,
    #[command(flatten)]
    pub adapt: AdaptOptions,
    /// Where partitions that shrink or move onto a smaller target are rebuilt first (sparse
    /// files holding their used data); default: $TMPDIR or /tmp.
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<std::path::PathBuf>,
}

/// How the restored OS is adapted to this machine.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AdaptOptions {
    /// Map a NIC of the restored system to one of this machine's: OLD (name or MAC) = NEW
    /// (MAC, kernel name here, or PCI address); repeatable. Default: by PCI order.
    #[arg(long = "nic-map", value_name = "OLD=NEW")]
    pub nic_map: Vec<String>,
    /// Windows driver packages (.inf, .sys, .cat) for this machine's storage controllers and
    /// NICs: a folder, a tarball (plain, gzip, zstd) or its http(s) URL. Without it a restored
    /// Windows gets only its in-box drivers made boot-start (storahci, stornvme).
    #[arg(long, value_name = "DIR|TAR|URL")]
    pub drivers: Option<String>,
    /// Edit a restored Windows although it was hibernated (Fast Startup; the hibernated
    /// session is lost) or its hives have unreplayed transaction logs.
    #[arg(long)]
    pub windows_force: bool,
}

#[derive(clap::Args, Debug)]
pub struct AdaptArgs {
    /// Disks of the restored system (block devices or image files), comma-separated, in its
    /// disk order.
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    #[command(flatten)]
    pub adapt: AdaptOptions,
    /// Token and CA for a --drivers URL.
    #[command(flatten)]
    pub net: NetArgs,
    /// Show what would change; write nothing (filesystems mounted read-only).
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[arg(long)]
    pub json: bool,
    /// Chunks compared at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
}

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// Appliance base URL (http://HOST:PORT).
    #[arg(long)]
    pub to: String,
    #[arg(long)]
    pub host: String,
    #[command(flatten)]
    pub net: NetArgs,
    /// Firmware the source boots with; `auto` reads it from this machine when the sources are
    /// block devices.
    #[arg(long, value_parser = ["auto", "uefi", "bios", "unknown"], default_value = "auto")]
    pub firmware: String,
    /// Copy every disk whole, ignoring the filesystems' used-block maps.
    #[arg(long)]
    pub raw: bool,
    /// Also leave out the contents of this file (absolute path inside its filesystem; ext and
    /// NTFS), beside the defaults: pagefile.sys, hiberfil.sys, swapfile.sys, /swapfile,
    /// /swap.img and the swap files /etc/fstab names. Repeatable.
    #[arg(long = "exclude", value_name = "PATH")]
    pub exclude: Vec<String>,
    /// Store paging, hibernation and swap files like any other file.
    #[arg(long)]
    pub no_default_excludes: bool,
    /// Uploads in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    #[arg(long)]
    pub json: bool,
    /// Disks (block devices or image files), one per disk, in disk order.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct FailbackArgs {
    /// Store base URL of the appliance (http://HOST:PORT/store).
    #[arg(long)]
    pub from: String,
    /// API base URL (default: --from with /store replaced by /api/v1).
    #[arg(long)]
    pub api: Option<String>,
    /// Failover VM to fail back.
    #[arg(long)]
    pub vm: String,
    /// Target block devices or files, comma-separated, in the VM's disk order.
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// Cut over once a round fetched at most this many bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub threshold: u64,
    /// Cut over after this many rounds at most (the final round not counted).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_rounds: u32,
    /// Refuse rounds not signed by this key (hex file as `appliance pubkey` prints it).
    #[arg(long)]
    pub pubkey: Option<PathBuf>,
    #[command(flatten)]
    pub net: NetArgs,
    /// Chunk fetches in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// How long the VM gets to power off at cutover before the appliance forces it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub stop_timeout: Duration,
    /// After cutover, read back every slot this failback wrote (`written`: with round 1's
    /// comparison, every slot of the target is then proven), the whole target (`full`), or only
    /// the final delta, which the cutover window always checks (`delta`).
    #[arg(long, value_parser = ["written", "full", "delta"], default_value = "written")]
    pub verify: String,
    #[arg(long)]
    pub json: bool,
}
