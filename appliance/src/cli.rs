//! Command line of `appliance` (names and main flags are a contract: DESIGN.md §4).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "appliance",
    version,
    about = "Backup appliance: snapshot store, ingest, HTTP server, failover VMs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a store and its signing key.
    Init(InitArgs),
    /// Print the store's public key (the boot image carries it).
    Pubkey(StoreArgs),
    /// Issue the HTTPS certificate `serve --tls` presents, signed by the store's CA (made at
    /// `init`); a running server loads it on SIGHUP.
    Tls(TlsArgs),
    /// Snapshot disks (raw images, qcow2/VMDK or block devices, one per disk, in disk order).
    Ingest(IngestArgs),
    /// List hosts and snapshots.
    List(ListArgs),
    /// Re-hash every chunk reachable from the chosen snapshots.
    Verify(VerifyArgs),
    /// Remove chunks no snapshot references.
    Gc(GcArgs),
    /// Serve the store, the HTTP API and boot files.
    Serve(ServeArgs),
    /// Failover VMs (QEMU) and failback rounds.
    Failover(crate::failover::cli::FailoverArgs),
    /// Browse a snapshot's filesystems and take files out, without restoring the disk.
    Files(FilesArgs),
}

#[derive(clap::Args)]
pub struct FilesArgs {
    #[command(subcommand)]
    pub action: FilesAction,
}

#[derive(clap::Args)]
pub struct FilesWhere {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub host: String,
    /// Snapshot id; default: the newest (`latest`).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Disk number (from 0).
    #[arg(long, default_value_t = 0)]
    pub disk: u32,
    /// Partition number (as Linux numbers them); default: the only one with a filesystem
    /// that can be browsed.
    #[arg(long)]
    pub partition: Option<u32>,
    /// An LVM2 logical volume (`VG/LV`) of a PV on the disk, instead of a partition.
    #[arg(long, value_name = "VG/LV", conflicts_with = "partition")]
    pub lv: Option<String>,
}

#[derive(Subcommand)]
pub enum FilesAction {
    /// List a directory (default `/`).
    Ls {
        #[command(flatten)]
        at: FilesWhere,
        #[arg(default_value = "/")]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Write one file's content to `-o FILE` (or stdout).
    Get {
        #[command(flatten)]
        at: FilesWhere,
        path: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write a file or a directory tree as a tar archive (modes, owners, times and symbolic
    /// links kept) to `-o FILE` (or stdout).
    Export {
        #[command(flatten)]
        at: FilesWhere,
        path: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct StoreArgs {
    #[arg(long)]
    pub store: PathBuf,
}

#[derive(clap::Args)]
pub struct InitArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// Host names and addresses the HTTPS certificate is for, besides this machine's own
    /// (host name, `hostname -I`, loopback); repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub tls_name: Vec<String>,
}

#[derive(clap::Args)]
pub struct TlsArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// Host names and addresses the certificate is for (default: this machine's host name,
    /// addresses and loopback); repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub name: Vec<String>,
    /// Add this machine's names to the given ones.
    #[arg(long)]
    pub with_defaults: bool,
}

#[derive(clap::Args)]
pub struct IngestArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub host: String,
    /// Snapshot id (default: the UTC time, e.g. 20261123T051900Z).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Firmware the source boots with (auto: UEFI when the disk has an EFI system partition).
    #[arg(long, value_parser = ["auto", "uefi", "bios"], default_value = "auto")]
    pub firmware: String,
    /// zstd compression level of new chunks (1-19): higher stores less and costs more CPU.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// Keep every disk whole (no partition table or filesystem analysis used for skipping).
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
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Rewrite damaged chunks from the --source images; move the rest out of chunks/ (to
    /// private/quarantine/) so that the next ingest or upload stores them again.
    #[arg(long)]
    pub repair: bool,
    /// A disk image or device holding correct copies (chunked as ingest does), for --repair.
    #[arg(long, requires = "repair")]
    pub source: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct GcArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub store: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:8080.
    #[arg(long)]
    pub listen: String,
    /// Directory of boot files (bootimg's output) served under /boot/.
    #[arg(long)]
    pub boot: Option<PathBuf>,
    /// Open connections at once; more wait in the kernel's accept queue.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Requests handled at once; more wait for a slot (without holding a thread).
    #[arg(long, default_value_t = 64)]
    pub max_requests: usize,
    /// Serve HTTPS here, and on --listen only the boot files (plain HTTP, for PXE firmware).
    #[arg(long)]
    pub tls_listen: Option<String>,
    /// Serve HTTPS with the store's certificate (`appliance tls`).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub tls: bool,
    /// Serve HTTPS with this certificate (PEM, the chain from the server's own); reloaded on
    /// SIGHUP.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// An upload session without a request for this long is aborted (e.g. 1h, 30m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub upload_idle_timeout: std::time::Duration,
}
