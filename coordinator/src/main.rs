//! `axial-coordinator`: today `validate`; `serve` and `launch` arrive with the gRPC service.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "axial-coordinator",
    version,
    about = "Coordinates axial training jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a job file and print it resolved (every default filled in).
    Validate {
        /// The job file (TOML).
        job: std::path::PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { job } => axial_common::JobConfig::load(&job).map(|j| {
            println!("# {} is valid; resolved:", job.display());
            print!("{}", j.to_toml());
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
