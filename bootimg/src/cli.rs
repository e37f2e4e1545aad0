//! Command line of `bootimg` (names and main flags are a contract: DESIGN.md §4).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "bootimg",
    version,
    about = "Build the restore boot image: PXE bundle, USB image, ISO"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Build the boot media into DIR.
    Build(BuildArgs),
    /// Download and unpack the recipe's kernel package into the cache; print where it is.
    FetchKernel(FetchArgs),
}

/// Where downloaded packages and unpacked kernels are kept.
#[derive(clap::Args, Clone)]
pub struct CacheArgs {
    /// Package cache [default: $BMR_CACHE, else /var/cache/bmr].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The image recipe [default: $BMR_RECIPE, else buildroot/ of this source tree].
    #[arg(long)]
    pub recipe: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct FetchArgs {
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// The restorer binary to put in the image (static musl build preferred)
    /// [default: target/x86_64-unknown-linux-musl/release/restorer of this source tree].
    #[arg(long)]
    pub restorer: Option<PathBuf>,
    /// Store URL baked into every boot entry as `restorer.url=`.
    #[arg(long)]
    pub appliance_url: Option<String>,
    /// More kernel parameters baked into every boot entry (e.g. "restorer.host=web1").
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Media to build, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "pxe,usb,iso",
          value_parser = ["pxe", "usb", "iso"])]
    pub format: Vec<String>,
    /// Appliance public key (hex, as `appliance pubkey` prints it) put in the image; the restorer
    /// then refuses unsigned snapshots.
    #[arg(long)]
    pub pubkey: Option<PathBuf>,
    /// CA certificate (PEM) of an HTTPS appliance put in the image; the restorer trusts it
    /// (`--ca`) for the store, the API and progress reports.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Initrd compression.
    #[arg(long, default_value = "zstd", value_parser = ["zstd", "xz"])]
    pub compress: String,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}
