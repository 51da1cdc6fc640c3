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
    /// Join a distributed job as one rank (started by `axial-coordinator launch`, or on a cluster).
    Join(axial_worker::join::JoinArgs),
    /// Train a job file in this process (one worker).
    Train(axial_worker::commands::TrainArgs),
    /// Print the top-5 classes of images, from a checkpoint.
    Predict(axial_worker::commands::PredictArgs),
    /// Turn an image folder into tar shards with a manifest.
    Prepare(axial_worker::commands::PrepareArgs),
    /// Run a model on tensors from files (check an imported checkpoint; parity with PyTorch).
    Forward(axial_worker::forward::ForwardArgs),
    /// Train a model for a few steps on one random batch: loss and throughput (no data needed).
    Demo(axial_worker::demo::DemoArgs),
}

fn main() {
    let cli = Cli::parse();
    axial_worker::keep_freed_memory();
    let result = match cli.command {
        Command::Join(args) => axial_worker::join::join(&args),
        Command::Train(args) => axial_worker::commands::train(&args),
        Command::Predict(args) => axial_worker::commands::predict(&args),
        Command::Prepare(args) => axial_worker::commands::prepare(&args),
        Command::Forward(args) => axial_worker::forward::run(&args)
            .map(|names| println!("wrote {} tensors to {}", names.len(), args.output.display()))
            .context("forward failed"),
        Command::Demo(args) => axial_worker::demo::run(&args)
            .map(|_| ())
            .context("demo failed"),
    };
    let code = match result {
        Ok(()) => 0,
        // A worker that left its group on SIGTERM exits as a terminated process does (128 +
        // 15), so that a supervisor (a Job controller, Slurm) replaces it rather than counting
        // its work as done.
        Err(e) if e.downcast_ref::<axial_worker::join::Terminated>().is_some() => {
            eprintln!("{e}");
            143
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    axial_worker::collective::exit(code)
}
