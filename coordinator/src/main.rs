//! `axial-coordinator`: launch a job on this machine, serve one for a cluster, or validate a job
//! file.

use std::path::PathBuf;

use anyhow::Context;
use axial_coordinator::launch::{ServeOptions, default_worker_bin, launch, serve};
use axial_coordinator::membership::MembershipConfig;
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
    /// Run a job on this machine: the coordinator and N worker processes.
    Launch {
        /// The job file (TOML).
        job: PathBuf,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Continue from the newest committed checkpoint.
        #[arg(long)]
        resume: bool,
        /// The axial-worker binary (default: the one beside this binary).
        #[arg(long)]
        worker_bin: Option<PathBuf>,
    },
    /// Serve a job for workers started elsewhere (`axial-worker join --coordinator URL`).
    Serve {
        job: PathBuf,
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: std::net::SocketAddr,
        /// File holding the job token (created with a fresh token if absent).
        #[arg(long)]
        token_file: PathBuf,
        /// Workers to wait for (min = max = N), or a range with --min.
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        min: Option<usize>,
        #[arg(long)]
        resume: bool,
        /// Serve /metrics and /api/status here.
        #[arg(long, default_value = "0.0.0.0:9090")]
        http: std::net::SocketAddr,
    },
    /// Check a job file and print it resolved (every default filled in).
    Validate {
        /// The job file (TOML).
        job: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Launch {
            job,
            workers,
            resume,
            worker_bin,
        } => launch(
            &job,
            workers,
            &worker_bin.unwrap_or_else(default_worker_bin),
            resume,
        ),
        Command::Serve {
            job,
            listen,
            token_file,
            workers,
            min,
            resume,
            http,
        } => serve_cmd(&job, listen, &token_file, workers, min, resume, http),
        Command::Validate { job } => axial_common::JobConfig::load(&job)
            .map(|j| {
                println!("# {} is valid; resolved:", job.display());
                print!("{}", j.to_toml());
            })
            .map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn serve_cmd(
    job: &std::path::Path,
    listen: std::net::SocketAddr,
    token_file: &std::path::Path,
    workers: usize,
    min: Option<usize>,
    resume: bool,
    http: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let config = axial_common::JobConfig::load(job)?;
    let token = match std::fs::read_to_string(token_file) {
        Ok(t) => t.trim().to_owned(),
        Err(_) => {
            let t = axial_coordinator::auth::generate()?;
            axial_coordinator::launch::write_token(token_file, &t)?;
            eprintln!(
                "coordinator: wrote a new job token to {}",
                token_file.display()
            );
            t
        }
    };
    anyhow::ensure!(!token.is_empty(), "{} is empty", token_file.display());
    let opts = ServeOptions {
        listen,
        token,
        members: MembershipConfig {
            min: min.unwrap_or(workers).max(1),
            max: workers.max(1),
            settle_ms: 2000,
            timeout_ms: 60_000,
        },
        resume,
        http: Some(http),
    };
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    rt.block_on(serve(config, opts, None))
}
