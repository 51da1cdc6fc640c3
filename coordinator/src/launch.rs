//! Serving a job, and launching one on this machine: the coordinator in-process plus N worker
//! processes, their log lines prefixed by worker, the coordinator stopping once every worker
//! has finished. A worker that crashes is reported; it is started again (same id, so the group
//! re-forms with it) while `--max-restarts` allows, the job goes on without it while at least
//! `--min-workers` remain, and otherwise the job stops.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use axial_common::JobConfig;
use axial_proto::v1::coordinator_server::CoordinatorServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::job::JobState;
use crate::membership::MembershipConfig;
use crate::service::{Service, authenticate};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub token: String,
    pub members: MembershipConfig,
    pub resume: bool,
    /// Where to serve `/metrics` and `/api/status` (None: off).
    pub http: Option<SocketAddr>,
    /// HTTPS for those (the gRPC certificate), plain HTTP when None.
    pub http_tls: Option<crate::http::TlsFiles>,
    /// TLS for gRPC (None: plain HTTP/2; the token still guards every call).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// End a group whose step does not advance for this long (0: never).
    pub progress_timeout_ms: u64,
    /// How long a checkpoint waits for every rank's vote before it is abandoned.
    pub vote_timeout_ms: u64,
    /// After the job finished, keep `/metrics` up this long (a scrape then sees
    /// `axial_coordinator_job_finished 1`, and alerts know the job ended rather than died).
    pub linger: Duration,
    /// On SIGTERM, serve on this long at most while the group drains to a checkpoint and
    /// leaves (the manifests' termination grace period covers it).
    pub grace: Duration,
}

/// Where a coordinator listens, once bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    /// The dashboard, `/api/status` and `/metrics` (None: off).
    pub http: Option<SocketAddr>,
}

/// Serves the job until every worker has finished (or Ctrl-C). `ready` receives the bound
/// addresses.
pub async fn serve(
    job: JobConfig,
    opts: ServeOptions,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    if opts.resume
        && let Some(done) = crate::job::finished_at(&job)
    {
        // A restarted coordinator of a job that ended (e.g. a Kubernetes Job's pod) exits.
        eprintln!(
            "coordinator: the job is already finished ({} is its last checkpoint); nothing to do",
            done.display()
        );
        return Ok(());
    }
    if !opts.resume {
        axial_common::checkpoint::refuse_foreign(&job.checkpoint.dir)
            .map_err(anyhow::Error::msg)?;
    }
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let mut state = JobState::new(job, opts.members, opts.resume).map_err(anyhow::Error::msg)?;
    state.set_progress_timeout(opts.progress_timeout_ms);
    state.set_vote_timeout(opts.vote_timeout_ms);
    // Test-only: a commit slower than the vote's deadline (tests/tests/storage.rs).
    if let Some(ms) = std::env::var("AXIAL_TEST_COMMIT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let step = std::env::var("AXIAL_TEST_COMMIT_DELAY_STEP")
            .ok()
            .and_then(|v| v.parse().ok());
        state.set_commit_delay(ms, step);
    }
    if let Some(c) = state.committed() {
        eprintln!(
            "coordinator: resuming from {} (step {})",
            c.folder.display(),
            c.position.step
        );
    }
    let service = Service::new(state);
    let mut http_bound = None;
    if let Some(http) = opts.http {
        let scheme = if opts.http_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let bound = crate::http::serve(
            http,
            service.clone(),
            opts.token.clone(),
            opts.http_tls.clone(),
        )
        .await
        .with_context(|| format!("HTTP on {http}"))?;
        http_bound = Some(bound);
        eprintln!(
            "coordinator: dashboard on {scheme}://{bound}/ (status at /api/status, metrics at /metrics)"
        );
    }
    let failed = service.state.clone();
    // Time passes on a task of its own, so that it goes on while a SIGTERM drains the group.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let ticker = service.clone();
    tokio::spawn(async move {
        let mut printed = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if ticker.tick(&mut printed) {
                break;
            }
        }
        let _ = done_tx.send(());
    });
    if let Some(tx) = ready {
        let _ = tx.send(Bound {
            grpc: addr,
            http: http_bound,
        });
    }
    eprintln!("coordinator: listening on {addr}");
    // SIGTERM (a scheduler stops the job: Kueue suspending it, a `kubectl delete`, a node
    // drain, `scancel`): the coordinator serves on while the running group drains to a
    // checkpoint and its workers leave, at most --grace; then it exits with an error so that a
    // supervisor starts it again, with --resume. Workers still running then wait for it.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("a SIGTERM handler")?;
    let (terminated_tx, terminated_rx) = tokio::sync::oneshot::channel::<()>();
    let draining = service.clone();
    let grace = opts.grace;
    let shutdown = async move {
        tokio::select! {
            _ = done_rx => {}
            _ = tokio::signal::ctrl_c() => eprintln!("coordinator: interrupted"),
            _ = sigterm.recv() => {
                let step = draining.state.lock().unwrap_or_else(|e| e.into_inner()).stop_gracefully();
                match step {
                    Some(step) => eprintln!(
                        "coordinator: terminated (SIGTERM): the group checkpoints after step {step} and leaves (at most {} s)",
                        grace.as_secs()
                    ),
                    None => eprintln!("coordinator: terminated (SIGTERM)"),
                }
                let deadline = tokio::time::Instant::now() + grace;
                loop {
                    let stopped = draining.state.lock().unwrap_or_else(|e| e.into_inner()).stopped();
                    if stopped {
                        eprintln!("coordinator: every worker has left");
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        eprintln!("coordinator: --grace of {} s is over; leaving", grace.as_secs());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                eprintln!("coordinator: start it again with --resume to go on");
                let _ = terminated_tx.send(());
            }
        }
    };
    // Connections from workers that stopped answering (a dead host, a cut link) are closed
    // within seconds (HTTP/2 pings; TCP keepalive as well).
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(axial_proto::deadline::KEEPALIVE))
        .http2_keepalive_timeout(Some(axial_proto::deadline::KEEPALIVE_TIMEOUT));
    if let Some(tls) = opts.tls {
        server = server.tls_config(tls).context("TLS configuration")?;
        eprintln!("coordinator: gRPC over TLS");
    }
    server
        .add_service(CoordinatorServer::with_interceptor(
            service,
            authenticate(opts.token),
        ))
        .serve_with_incoming_shutdown(accepted(listener), shutdown)
        .await?;
    if let Some(why) = failed.lock().unwrap_or_else(|e| e.into_inner()).failed() {
        bail!("the job stopped: {why}");
    }
    let finished = failed.lock().unwrap_or_else(|e| e.into_inner()).done();
    if finished && !opts.linger.is_zero() {
        eprintln!(
            "coordinator: the job has finished; /metrics stays up {} s (--linger)",
            opts.linger.as_secs()
        );
        tokio::time::sleep(opts.linger).await;
    }
    if let Ok(()) = terminated_rx.await {
        bail!(
            "terminated (SIGTERM); the job goes on with a coordinator started again with --resume"
        );
    }
    Ok(())
}

/// Writes the job token to `path`, readable by the owner only.
pub fn write_token(path: &Path, token: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(())
}

fn forward_lines(name: String, stream: impl std::io::Read + Send + 'static, to_stderr: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if to_stderr {
                eprintln!("[{name}] {line}");
            } else {
                println!("[{name}] {line}");
            }
        }
    });
}

/// What `axial-coordinator launch` runs.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub workers: usize,
    /// The job goes on with this many workers after crashes (default: all of them).
    pub min_workers: Option<usize>,
    /// Crashed workers are started again this many times in all.
    pub max_restarts: usize,
    pub worker_bin: PathBuf,
    pub resume: bool,
    /// End a group whose step does not advance for this many seconds (0: never).
    pub progress_timeout_s: u64,
    /// The dashboard, `/api/status` and `/metrics` (port 0 picks one).
    pub http: SocketAddr,
    /// Worker `i` serves its `/metrics` on 127.0.0.1:(base + i) (None: the job's
    /// `[metrics] listen`).
    pub metrics_port: Option<u16>,
    /// A Prometheus file-discovery target list of the coordinator and the workers, written
    /// once they are bound (needs `metrics_port`).
    pub prometheus_targets: Option<PathBuf>,
    /// Seconds `/metrics` stays up after the job finished.
    pub linger_s: u64,
    /// The workers' collective backend (`join --backend`: auto, gloo, nccl).
    pub backend: String,
}

/// The Prometheus `file_sd_configs` list of a local launch: the coordinator's `/metrics` and
/// every worker's, with the job labels that `deploy/prometheus` and its alerts use.
fn prometheus_targets(coordinator: SocketAddr, workers: &[SocketAddr]) -> String {
    let list = |a: &[SocketAddr]| a.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>();
    format!(
        "[{{\"targets\": [{}], \"labels\": {{\"job\": \"axial-coordinator\"}}}},\n \
         {{\"targets\": [{}], \"labels\": {{\"job\": \"axial-worker\"}}}}]\n",
        list(&[coordinator]).join(", "),
        list(workers).join(", ")
    )
}

/// Writes `text` to `path` through a temp file and a rename (Prometheus watches the file and
/// must never read half of it).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `axial-coordinator launch`: a coordinator and `workers` local worker processes.
pub fn launch(job_path: &Path, o: &LaunchOptions) -> anyhow::Result<()> {
    let (workers, worker_bin, resume) = (o.workers, o.worker_bin.as_path(), o.resume);
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    if o.prometheus_targets.is_some() && o.metrics_port.is_none() {
        bail!("--prometheus-targets needs --metrics-port (the workers' ports must be known)");
    }
    let worker_metrics: Vec<SocketAddr> = match o.metrics_port {
        None => Vec::new(),
        Some(base) => (0..workers)
            .map(|i| {
                u16::try_from(usize::from(base) + i)
                    .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                    .map_err(|_| {
                        anyhow::anyhow!("--metrics-port {base} + {workers} workers passes 65535")
                    })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let min_workers = o.min_workers.unwrap_or(workers);
    if min_workers == 0 || min_workers > workers {
        bail!("--min-workers must be between 1 and --workers ({workers}), not {min_workers}");
    }
    let job = JobConfig::load(job_path)?;
    if resume && let Some(done) = crate::job::finished_at(&job) {
        eprintln!(
            "launch: the job is already finished ({} is its last checkpoint); nothing to do",
            done.display()
        );
        return Ok(());
    }
    let token = crate::auth::generate().context("generate the job token")?;
    let token_file = job.checkpoint.dir.join(".job-token");
    write_token(&token_file, &token).with_context(|| format!("write {}", token_file.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let opts = ServeOptions {
        listen: "127.0.0.1:0".parse()?,
        token,
        members: MembershipConfig {
            min: min_workers,
            max: workers,
            settle_ms: 1000,
            timeout_ms: 10_000,
        },
        resume,
        http: Some(o.http),
        http_tls: None,
        tls: None,
        progress_timeout_ms: o.progress_timeout_s * 1000,
        vote_timeout_ms: 120_000,
        linger: Duration::from_secs(o.linger_s),
        grace: Duration::from_secs(120),
    };
    let server = rt.spawn(serve(job, opts, Some(tx)));
    let bound = match rt.block_on(rx) {
        Ok(b) => b,
        // The server ended before it was bound: its error says why.
        Err(_) => {
            return match rt.block_on(server) {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("the coordinator did not start")),
            };
        }
    };
    let addr = bound.grpc;
    if let (Some(file), Some(http)) = (&o.prometheus_targets, bound.http) {
        write_atomically(file, &prometheus_targets(http, &worker_metrics))
            .with_context(|| format!("write the Prometheus targets {}", file.display()))?;
        eprintln!("launch: Prometheus targets in {}", file.display());
    }
    let spawn = |name: &str, index: usize| -> anyhow::Result<Child> {
        let mut command = Command::new(worker_bin);
        command
            .args([
                "join",
                "--coordinator",
                &format!("http://{addr}"),
                "--worker-id",
                name,
                // The coordinator lives in this process: if it is gone, so is the job.
                "--wait-coordinator",
                "5",
                "--token-file",
            ])
            .arg(&token_file);
        if let Some(m) = worker_metrics.get(index) {
            command.arg("--metrics-listen").arg(m.to_string());
        }
        command.args(["--backend", &o.backend]);
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", worker_bin.display()))?;
        if let Some(out) = child.stdout.take() {
            forward_lines(name.to_owned(), out, false);
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(name.to_owned(), err, true);
        }
        Ok(child)
    };
    let mut children: Vec<(String, Child)> = Vec::new();
    for i in 0..workers {
        let name = format!("w{i}");
        children.push((name.clone(), spawn(&name, i)?));
    }
    let mut failed = None;
    let mut restarts = 0;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait()? {
                Some(status) => {
                    let (name, _) = children.remove(i);
                    let index: usize = name[1..].parse().unwrap_or(0);
                    if status.success() || failed.is_some() {
                        continue;
                    }
                    if restarts < o.max_restarts {
                        restarts += 1;
                        eprintln!(
                            "launch: worker {name} exited with {status}; starting it again (restart {restarts} of {})",
                            o.max_restarts
                        );
                        children.push((name.clone(), spawn(&name, index)?));
                    } else if children.len() >= min_workers {
                        eprintln!(
                            "launch: worker {name} exited with {status}; going on with {} worker(s) (--min-workers {min_workers})",
                            children.len()
                        );
                    } else {
                        eprintln!("launch: worker {name} exited with {status}; stopping the job");
                        failed = Some(format!("worker {name} exited with {status}"));
                        for (_, c) in &mut children {
                            let _ = c.kill();
                        }
                    }
                }
                None => i += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(f) = failed {
        server.abort();
        bail!(f);
    }
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(10 + o.linger_s), server).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Ok(()),
        }
    })
}

/// The worker binary beside this one (target/<profile>/ in a checkout, or an install dir).
pub fn default_worker_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("axial-worker")))
        .unwrap_or_else(|| PathBuf::from("axial-worker"))
}

/// The listener's connections, each with Nagle's algorithm off and TCP keepalive on. A server
/// fed its own listener (`serve_with_incoming*`) ignores the builder's `tcp_nodelay` and
/// `tcp_keepalive`: with Nagle on, a reply written while the previous one was unacknowledged
/// waited for the worker's delayed ACK, up to 40 ms (the p99 of heartbeats at 1,000 simulated
/// workers was 47 ms, at 100 workers 2 ms).
fn accepted(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        // Both only tune a connection that works either way (a peer already gone fails here
        // and at its first read alike).
        let _ = conn.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(axial_proto::deadline::KEEPALIVE);
        let _ = socket2::SockRef::from(&conn).set_tcp_keepalive(&keepalive);
        Ok(conn)
    })
}
