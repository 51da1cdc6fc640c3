//! `axial-worker`: the worker binary. See the README for the commands.

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "axial-worker",
    version,
    about = "Trains axial-attention ResNets; runs and checks models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a model on tensors from files (check an imported checkpoint; parity with PyTorch).
    Forward(axial_worker::forward::ForwardArgs),
    /// Train a model for a few steps on one random batch: loss and throughput (no data needed).
    Demo(axial_worker::demo::DemoArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward(args) => axial_worker::forward::run(&args)
            .map(|names| println!("wrote {} tensors to {}", names.len(), args.output.display()))
            .context("forward failed"),
        Command::Demo(args) => axial_worker::demo::run(&args)
            .map(|_| ())
            .context("demo failed"),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
