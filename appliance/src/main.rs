//! `appliance`: the backup appliance's store, ingest, HTTP server and failover VMs.

mod cli;
mod failover;
mod files;
mod gc;
mod images;
mod ingest;
mod init;
mod list;
mod progress;
mod serve;
mod tls;
mod verify;

use clap::Parser;
use cli::{Cli, Command};

fn main() {
    snapshot::stdout::exit_quietly_when_closed();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(a) => init::init(&a),
        Command::Pubkey(a) => init::pubkey(&a),
        Command::Tls(a) => init::tls(&a),
        Command::Ingest(a) => ingest::run(&a),
        Command::List(a) => list::run(&a),
        Command::Verify(a) => verify::run(&a),
        Command::Gc(a) => gc::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Failover(a) => failover::run(&a),
        Command::Files(a) => files::run(&a),
    };
    if let Err(e) = result {
        eprintln!("appliance: error: {e:#}");
        std::process::exit(1);
    }
}
