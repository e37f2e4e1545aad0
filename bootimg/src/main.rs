//! `bootimg`: builds the boot image of the restorer (PXE bundle, USB disk image, ISO) from the
//! recipe in `buildroot/` and Debian's signed kernel, shim and GRUB.

mod bootcfg;
mod build;
mod cli;
mod cpio;
mod initrd;
mod iso;
mod kernel;
mod pxe;
mod recipe;
mod run;
mod usb;

use clap::Parser;
use cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(a) => build::run(&a),
        Command::FetchKernel(a) => kernel::run(&a),
    };
    if let Err(e) = result {
        eprintln!("bootimg: error: {e:#}");
        std::process::exit(1);
    }
}
