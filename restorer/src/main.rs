//! `restorer`: the program in the boot image (PID 1 mode) and a normal CLI on any Linux.

mod adapt;
mod bootentry;
mod capture;
mod cli;
mod dio;
mod failback;
#[cfg(test)]
mod faulty;
mod init;
mod lvm;
mod marker;
mod pipeline;
mod plan;
mod report;
mod resize;
mod restore;
mod shrink;
mod slots;
mod table;
mod target;
mod verify;
mod windows;

use clap::Parser;
use cli::{Cli, Command};

fn main() {
    snapshot::stdout::exit_quietly_when_closed();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Restore(a) => restore::run(&a),
        Command::Verify(a) => verify::run(&a),
        Command::Capture(a) => capture::run(&a),
        Command::Failback(a) => failback::run(&a),
        Command::Adapt(a) => adapt::run(&a),
        Command::Init => init::run(),
    };
    if let Err(e) = result {
        eprintln!("restorer: error: {e:#}");
        std::process::exit(1);
    }
}
