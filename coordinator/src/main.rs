//! `axial-coordinator`: launch a job on this machine, serve one for a cluster, or validate a job
//! file.

use std::path::PathBuf;

use anyhow::Context;
use axial_coordinator::launch::{LaunchOptions, ServeOptions, default_worker_bin, launch, serve};
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
        /// Go on with at least this many workers when some crash (default: --workers; the
        /// group re-forms without them, from the last checkpoint).
        #[arg(long)]
        min_workers: Option<usize>,
        /// Start crashed workers again, this many times in all.
        #[arg(long, default_value_t = 0)]
        max_restarts: usize,
        /// End and re-form a group whose step has not advanced for this many seconds, though
        /// its workers still heartbeat (a deadlocked training thread). 0: off. Keep it above the
        /// longest evaluation or checkpoint.
        #[arg(long, default_value_t = 0)]
        progress_timeout: u64,
        /// Continue from the newest committed checkpoint.
        #[arg(long)]
        resume: bool,
        /// The axial-worker binary (default: the one beside this binary).
        #[arg(long)]
        worker_bin: Option<PathBuf>,
        /// Serve the dashboard, /api/status and /metrics here (port 0 picks a free one; the
        /// URL is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        http: std::net::SocketAddr,
        /// Worker i serves /metrics on 127.0.0.1:(PORT + i), instead of the job's
        /// [metrics] listen.
        #[arg(long, value_name = "PORT")]
        metrics_port: Option<u16>,
        /// Write a Prometheus file-discovery target list (file_sd_configs) of the
        /// coordinator and the workers here (needs --metrics-port).
        #[arg(long, value_name = "FILE")]
        prometheus_targets: Option<PathBuf>,
        /// Seconds to keep /metrics up after the job finished (see `serve --linger`).
        #[arg(long, default_value_t = 0)]
        linger: u64,
        /// The workers' collective backend: auto (NCCL on CUDA, Gloo on the CPU), or gloo
        /// for several workers sharing one GPU.
        #[arg(long, default_value = "auto", value_parser = ["auto", "gloo", "nccl"])]
        backend: String,
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
        /// Serve /, /metrics and /api/status here (over HTTPS with --tls-cert/--tls-key). The
        /// port is outside the Prometheus exporters' range (9400 is NVIDIA's DCGM exporter,
        /// which runs on most GPU nodes).
        #[arg(long, default_value = "0.0.0.0:8790")]
        http: std::net::SocketAddr,
        #[command(flatten)]
        tls: ServerTls,
        /// Seconds without a heartbeat after which a worker is lost (and the group re-forms
        /// without it; at least 3). Workers send one every second from a thread of their own,
        /// whatever training is doing (skipped after a training heartbeat), so a few seconds
        /// are enough.
        #[arg(long, default_value_t = 10)]
        heartbeat_timeout: u64,
        /// End and re-form a group whose step has not advanced for this many seconds, though
        /// its workers still heartbeat (a deadlocked training thread). 0: off. Keep it above the
        /// longest evaluation or checkpoint.
        #[arg(long, default_value_t = 0)]
        progress_timeout: u64,
        /// Seconds a checkpoint waits for every rank's vote before it is abandoned (keep it
        /// above the longest checkpoint write).
        #[arg(long, default_value_t = 120)]
        vote_timeout: u64,
        /// Seconds to keep /metrics up after the job finished, so that Prometheus scrapes
        /// `axial_coordinator_job_finished 1` (and alerts know the job ended, not died). Set
        /// it above the scrape interval.
        #[arg(long, default_value_t = 0)]
        linger: u64,
        /// On SIGTERM (a scheduler stopping the job), serve on at most this many seconds
        /// while the running group checkpoints and its workers leave; then exit. Keep it
        /// below the pod's terminationGracePeriodSeconds (150 in deploy/k8s) and above a
        /// checkpoint write plus a few steps.
        #[arg(long, default_value_t = 120)]
        grace: u64,
        /// Serve plain gRPC on an address other hosts can reach (without TLS the job token and
        /// the collective's rendezvous cross the network in clear text). Needed to serve
        /// without --tls-cert/--tls-key anywhere but on loopback.
        #[arg(long)]
        insecure: bool,
    },
    /// Change hyperparameters of a running job; every rank applies the change at the same
    /// step, and it is recorded with the next checkpoint.
    Set {
        /// The coordinator's gRPC address, e.g. http://10.0.0.1:50051.
        #[arg(long)]
        coordinator: String,
        /// File holding the job token (for a local launch: <checkpoint dir>/.job-token).
        #[arg(long)]
        token_file: PathBuf,
        /// [optim] lr (per lr_reference_batch images); the schedule keeps its shape.
        #[arg(long)]
        lr: Option<f64>,
        /// [optim] weight_decay.
        #[arg(long)]
        weight_decay: Option<f64>,
        /// [train] clip_grad_norm (0: off).
        #[arg(long)]
        clip_grad_norm: Option<f64>,
        /// [checkpoint] every_steps (0: at epoch ends only).
        #[arg(long)]
        checkpoint_every_steps: Option<u64>,
        /// The step to apply it from (default: the earliest step every rank is sure to reach
        /// only after hearing of it).
        #[arg(long)]
        from_step: Option<u64>,
        #[command(flatten)]
        tls: ClientTls,
    },
    /// Load-test a coordinator with simulated workers (real gRPC clients with the job token:
    /// joins, heartbeats, votes, failures and re-joins) and print latencies, CPU and memory.
    Simulate {
        /// Worker counts to run, one after the other (e.g. 100,1000,10000).
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        workers: Vec<usize>,
        /// Seconds of training once the group has formed.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Milliseconds per simulated step.
        #[arg(long, default_value_t = 500)]
        step_ms: u64,
        /// A training heartbeat every this many steps (as `[train] log_every`).
        #[arg(long, default_value_t = 5)]
        report_every: u64,
        /// A checkpoint vote every this many steps.
        #[arg(long, default_value_t = 10)]
        checkpoint_every: u64,
        /// Workers that fail (and come back) during the run.
        #[arg(long, default_value_t = 2)]
        failures: usize,
        /// HTTP/2 connections the simulated workers share.
        #[arg(long, default_value_t = 64)]
        channels: usize,
        /// The coordinator's --heartbeat-timeout.
        #[arg(long, default_value_t = 5)]
        heartbeat_timeout: u64,
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
            min_workers,
            max_restarts,
            progress_timeout,
            resume,
            worker_bin,
            http,
            metrics_port,
            prometheus_targets,
            linger,
            backend,
        } => launch(
            &job,
            &LaunchOptions {
                workers,
                min_workers,
                max_restarts,
                worker_bin: worker_bin.unwrap_or_else(default_worker_bin),
                resume,
                progress_timeout_s: progress_timeout,
                http,
                metrics_port,
                prometheus_targets,
                linger_s: linger,
                backend,
            },
        ),
        Command::Serve {
            job,
            listen,
            token_file,
            workers,
            min,
            resume,
            http,
            heartbeat_timeout,
            progress_timeout,
            tls,
            insecure,
            vote_timeout,
            linger,
            grace,
        } => serve_cmd(
            tls,
            &job,
            (listen, insecure, linger, grace),
            &token_file,
            (
                workers,
                min,
                heartbeat_timeout,
                progress_timeout,
                vote_timeout,
            ),
            resume,
            http,
        ),
        Command::Set {
            coordinator,
            token_file,
            lr,
            weight_decay,
            clip_grad_norm,
            checkpoint_every_steps,
            from_step,
            tls,
        } => set_cmd(
            &coordinator,
            &token_file,
            &tls,
            axial_common::hparams::HyperParameterChange {
                id: 0,
                from_step: from_step.unwrap_or(0),
                lr,
                weight_decay,
                clip_grad_norm,
                checkpoint_every_steps,
            },
        ),
        Command::Simulate {
            workers,
            seconds,
            step_ms,
            report_every,
            checkpoint_every,
            failures,
            channels,
            heartbeat_timeout,
        } => axial_coordinator::simulate::simulate(&axial_coordinator::simulate::SimulateOptions {
            workers,
            seconds,
            step_ms,
            report_every,
            checkpoint_every,
            failures,
            channels,
            heartbeat_timeout_s: heartbeat_timeout,
        }),
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

/// TLS for the coordinator's gRPC (PEM files).
#[derive(Debug, Clone, clap::Args)]
struct ServerTls {
    /// This coordinator's certificate (chain); with --tls-key, gRPC and the HTTP endpoints
    /// are served over TLS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
}

/// TLS for a client of the coordinator (PEM files).
#[derive(Debug, Clone, clap::Args)]
struct ClientTls {
    /// The CA that signed the coordinator's certificate (the URL must then be https://).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This client's certificate and key, for a coordinator that requires them.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The name in the coordinator's certificate, when it is not the URL's host.
    #[arg(long)]
    tls_domain: Option<String>,
}

fn serve_cmd(
    tls: ServerTls,
    job: &std::path::Path,
    (listen, insecure, linger, grace): (std::net::SocketAddr, bool, u64, u64),
    token_file: &std::path::Path,
    (workers, min, heartbeat_timeout, progress_timeout, vote_timeout): (
        usize,
        Option<usize>,
        u64,
        u64,
        u64,
    ),
    resume: bool,
    http: std::net::SocketAddr,
) -> anyhow::Result<()> {
    anyhow::ensure!(workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(
        min.is_none_or(|m| (1..=workers).contains(&m)),
        "--min must be between 1 and --workers ({workers})"
    );
    // A live worker is heard from at least every 2 s (a liveness beat a second, skipped when
    // a training heartbeat was answered within the second before it).
    anyhow::ensure!(
        heartbeat_timeout >= 3,
        "--heartbeat-timeout must be at least 3 seconds (a live worker may be silent for up to 2 s)"
    );
    anyhow::ensure!(
        vote_timeout >= 1,
        "--vote-timeout must be at least 1 second"
    );
    let http_tls = match (&tls.tls_cert, &tls.tls_key) {
        (Some(cert), Some(key)) => Some(axial_coordinator::http::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let tls = axial_proto::tls::ServerFiles {
        cert: tls.tls_cert,
        key: tls.tls_key,
        client_ca: tls.tls_client_ca,
    }
    .config()
    .map_err(anyhow::Error::msg)?;
    if tls.is_none() && !listen.ip().to_canonical().is_loopback() {
        anyhow::ensure!(
            insecure,
            "--listen {listen} can be reached from other hosts, and without TLS the job token \
             and the collective's rendezvous would cross the network in clear text: give \
             --tls-cert and --tls-key (workers then use an https:// URL with --tls-ca), or \
             --insecure on a network you trust (e.g. behind the Kubernetes NetworkPolicy in \
             deploy/k8s)"
        );
        eprintln!(
            "coordinator: WARNING: serving plain gRPC on {listen} (--insecure): the job token \
             and the collective's rendezvous cross the network unencrypted; anyone who can read \
             this network can take over the job. Use --tls-cert/--tls-key outside a trusted \
             network."
        );
    }
    let config = axial_common::JobConfig::load(job)?;
    let token = match std::fs::read_to_string(token_file) {
        Ok(t) => t.trim().to_owned(),
        // Only an absent file gets a new token: one that exists but cannot be read is never
        // overwritten (the workers hold its token).
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            anyhow::bail!(
                "cannot read the job token file {}: {e} (fix its permissions or the storage; \
                 a new token would lock out the workers that hold this one)",
                token_file.display()
            )
        }
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
            timeout_ms: heartbeat_timeout * 1000,
        },
        resume,
        http: Some(http),
        http_tls,
        tls,
        progress_timeout_ms: progress_timeout * 1000,
        vote_timeout_ms: vote_timeout * 1000,
        linger: std::time::Duration::from_secs(linger),
        grace: std::time::Duration::from_secs(grace),
    };
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    rt.block_on(serve(config, opts, None))
}

fn set_cmd(
    coordinator: &str,
    token_file: &std::path::Path,
    tls: &ClientTls,
    change: axial_common::hparams::HyperParameterChange,
) -> anyhow::Result<()> {
    change.validate()?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("token file {}", token_file.display()))?;
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .context("the token is not valid metadata")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let accepted = rt.block_on(async {
        let files = axial_proto::tls::ClientFiles {
            ca: tls.tls_ca.clone(),
            cert: tls.tls_cert.clone(),
            key: tls.tls_key.clone(),
            domain: tls.tls_domain.clone(),
        };
        let channel = axial_proto::tls::endpoint(coordinator, &files)
            .map_err(anyhow::Error::msg)?
            .connect()
            .await
            .with_context(|| format!("connect to the coordinator at {coordinator}"))?;
        let mut client = axial_proto::v1::coordinator_client::CoordinatorClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            },
        );
        let reply = client
            .set_hyper_parameters(axial_proto::v1::HyperParameterChange::from(&change))
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        anyhow::Ok(axial_common::hparams::HyperParameterChange::from(
            reply.get_ref(),
        ))
    })?;
    println!("accepted: {}", accepted.describe());
    Ok(())
}
