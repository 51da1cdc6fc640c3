//! `axial-worker join`: one rank of a distributed job. Joins the coordinator (authenticated by
//! the job token), receives rank, world, generation, the resolved job and the resume point,
//! forms the collective group through the coordinator's rendezvous store (`crate::rendezvous`:
//! no fixed ports, no store listening on any worker, no side door), then runs the training
//! loop with all-reduce, heartbeats and checkpoint votes.
//!
//! Addresses: the other ranks reach this one on the address it advertises: `--host`, or by
//! default the local address of the route to the coordinator (the interface the cluster's
//! traffic takes), or the address of `--iface`. Gloo binds its device there; NCCL picks the
//! interface named by `--iface` (`NCCL_SOCKET_IFNAME`). A loopback address advertised to a
//! coordinator on another host is refused at start, and by the coordinator.
//!
//! A generation can end under a worker: the coordinator aborts it (a member lost or restarted,
//! a new member), a collective fails because a peer died or hung past the timeout, or the
//! coordinator goes away. The worker then drops its group, tells the coordinator which
//! generation it abandoned and why (so the others are told at once), and joins again — waiting
//! up to `--wait-coordinator` seconds for a coordinator that is restarting — then resumes from
//! the newest committed checkpoint with whoever is in the new group. Nothing that was committed
//! is lost, and the ledger makes the data exactly-once across the re-formation.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axial_common::JobConfig;
use axial_common::checkpoint::{FileEntry, Position};
use axial_common::hparams::HyperParameterChange;
use axial_proto::v1::coordinator_client::CoordinatorClient;
use axial_proto::v1::{self, HeartbeatRequest, JoinReply, JoinRequest, LeaveRequest, VoteRequest};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::collective::{Backend, ProcessGroup, Store};
use crate::error::{Error, Result};
use crate::metrics::{WorkerMetrics, serve};
use crate::train::coordination::Shares;
use crate::train::run::{Coordination, Distributed, Report, RunOptions, run};

/// How long a join may be held by the coordinator until a group forms (a long poll): short
/// enough that SIGTERM while waiting is seen within seconds.
const JOIN_WAIT_MS: u32 = 2000;

#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// The coordinator, e.g. http://10.0.0.1:50051.
    #[arg(long)]
    pub coordinator: String,
    /// File holding the job token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// This worker's id (default: host name and process id).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Address the other ranks reach this one on (the collective's traffic). Default: the
    /// local address of the route to the coordinator.
    #[arg(long)]
    pub host: Option<String>,
    /// Network interface for the collective's traffic (e.g. eth1): Gloo's device is bound to
    /// it and NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME are set to it unless already set. The
    /// advertised address is then the interface's.
    #[arg(long)]
    pub iface: Option<String>,
    /// Consecutive generations whose group cannot be formed (an address that does not resolve,
    /// a backend this machine lacks) before the worker gives up with the error.
    #[arg(long, default_value_t = 3)]
    pub max_setup_failures: u32,
    /// Seconds a collective may wait for a peer before failing.
    #[arg(long, default_value_t = 120)]
    pub collective_timeout: u64,
    /// The collective backend: `nccl` for CUDA devices and `gloo` for the CPU (auto), or
    /// `gloo` forced (several ranks sharing one GPU stage their tensors through the host).
    #[arg(long, default_value = "auto", value_parser = ["auto", "gloo", "nccl"])]
    pub backend: String,
    /// Seconds to keep trying to reach the coordinator, at start and whenever it goes away
    /// (a restarting coordinator).
    #[arg(long, default_value_t = 300)]
    pub wait_coordinator: u64,
    /// This rank's device (cpu, cuda:N), overriding the job's `train.device`: on a machine with
    /// several GPUs each rank takes its own, e.g. `--device cuda:$SLURM_LOCALID`.
    #[arg(long)]
    pub device: Option<String>,
    /// The CA that signed the coordinator's certificate: gRPC over TLS (the --coordinator URL
    /// must then be https://).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This worker's certificate and key, for a coordinator that requires client certificates
    /// (mutual TLS).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The name in the coordinator's certificate, when it is not the URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Where this worker serves `/metrics`, overriding the job's `[metrics] listen` (several
    /// ranks on one machine need one port each; "" turns it off).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Run this many ranks on this machine, one process per GPU (cuda:0 .. cuda:N-1): each
    /// gets `--worker-id <id>-<i>`, its own device and `--metrics-listen` port + i; SIGTERM
    /// is passed on to all of them (see `local_ranks`).
    #[arg(long, default_value_t = 1)]
    pub local_ranks: usize,
    /// With --local-ranks: times a local rank that crashed or hung is started again (under its
    /// id, after 1, 2, 4 ... s); then the parent stops the others and exits non-zero, so that
    /// the scheduler restarts the pod or the node's task.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// With --local-ranks: seconds a local rank may stay silent (stopped, or every thread
    /// stuck) before the parent kills it and counts a failure.
    #[arg(long, default_value_t = 60)]
    pub hang_timeout: u64,
    /// Seconds to wait for a group to form (the coordinator reachable, the group short of
    /// workers) before giving up with an error, so that a half-scheduled job does not hold its
    /// GPUs for ever (0: wait for ever).
    #[arg(long, default_value_t = 600)]
    pub join_timeout: u64,
}

#[derive(Clone)]
pub(crate) struct Token(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Token {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub(crate) type Client = CoordinatorClient<InterceptedService<Channel, Token>>;

/// The most a worker stays silent while it is alive: the liveness thread heartbeats when
/// neither it nor the training loop has heard from the coordinator for this long.
const LIVENESS_EVERY: Duration = Duration::from_secs(1);

/// Where in the second a worker's liveness beats fall in `generation`: spread over the
/// second by a hash of its id.
fn liveness_phase(worker_id: &str, generation: u64) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (worker_id, generation).hash(&mut h);
    let every = LIVENESS_EVERY.as_millis() as u64;
    Duration::from_millis(h.finish() % every)
}

/// When the coordinator last answered one of this worker's heartbeats (training or liveness),
/// shared by the training thread and the liveness thread.
struct Beat {
    start: Instant,
    /// Milliseconds after `start`, plus one (0: never).
    at_ms: AtomicU64,
}

impl Beat {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let ms = self.start.elapsed().as_millis() as u64 + 1;
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether a heartbeat was answered within `window`.
    fn within(&self, window: Duration) -> bool {
        let at = self.at_ms.load(Ordering::Relaxed);
        at != 0
            && (self.start.elapsed().as_millis() as u64 + 1).saturating_sub(at)
                < window.as_millis() as u64
    }
}

/// The liveness thread of one generation. It heartbeats every second whatever the training
/// thread is doing (computing, or blocked in a collective), so the coordinator can declare a
/// worker lost within seconds when its process hangs, stops or dies. When the coordinator
/// answers that the generation is over (a peer was lost), it aborts the group: a collective
/// waiting for the lost peer fails at once instead of at its timeout, and the worker re-joins.
struct Liveness {
    stop: Arc<AtomicBool>,
    /// The group, once formed (to abort it).
    group: Arc<Mutex<Option<Arc<ProcessGroup>>>>,
    /// Set when the coordinator has ended this generation.
    ended: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Liveness {
    fn start(session: &Session, step: Arc<AtomicU64>) -> Self {
        let terminate = session.terminate.clone();
        let beat = session.beat.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let group: Arc<Mutex<Option<Arc<ProcessGroup>>>> = Arc::new(Mutex::new(None));
        let (endpoint, token) = (session.endpoint.clone(), session.token.clone());
        let (worker_id, generation) = (session.worker_id.clone(), session.generation);
        let (stop2, ended2, group2) = (stop.clone(), ended.clone(), group.clone());
        let handle = std::thread::Builder::new()
            .name("liveness".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let mut client: Option<Client> = None;
                // Beats at this thread's own phase, once a second: a group's beats stay spread
                // over the second (beats timed from the last training heartbeat would all land
                // on the group's step boundaries, and a whole group hears of its formation at
                // once). The first beat comes within a second of joining.
                let mut slot = Instant::now() + liveness_phase(&worker_id, generation);
                while !stop2.load(Ordering::Relaxed) {
                    if Instant::now() < slot {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    slot += LIVENESS_EVERY;
                    if slot < Instant::now() {
                        slot = Instant::now(); // behind (a call that took long): beat now
                    }
                    // A training heartbeat answered within the last second stands for this
                    // one (at 10,000 workers each beat saved is load off the coordinator),
                    // unless there is news (SIGTERM).
                    let terminating = terminate.load(Ordering::Relaxed);
                    if !terminating && beat.within(LIVENESS_EVERY) {
                        continue;
                    }
                    if client.is_none() {
                        client = rt
                            .block_on(endpoint.connect())
                            .ok()
                            .map(|c| CoordinatorClient::with_interceptor(c, token.clone()));
                    }
                    if let Some(c) = client.as_mut() {
                        let phase = if terminating {
                            "terminating"
                        } else {
                            "alive"
                        };
                        let req = HeartbeatRequest {
                            worker_id: worker_id.clone(),
                            generation,
                            step: step.load(Ordering::Relaxed),
                            phase: phase.into(),
                            ..Default::default()
                        };
                        let req = axial_proto::deadline::call(req);
                        let over = match rt.block_on(c.heartbeat(req)) {
                            Ok(r) => {
                                beat.mark();
                                r.get_ref().abort
                            }
                            // A restarted coordinator does not know this generation.
                            Err(e) if e.code() == tonic::Code::NotFound => true,
                            Err(_) => {
                                client = None;
                                false
                            }
                        };
                        if over {
                            ended2.store(true, Ordering::Relaxed);
                            if let Some(g) = group2.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                                eprintln!(
                                    "{worker_id}: the coordinator ended generation {generation}; aborting its collectives"
                                );
                                g.abort();
                            }
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .ok();
        Self {
            stop,
            group,
            ended,
            handle,
        }
    }

    /// Hands over the formed group (aborted at once if the generation already ended).
    fn watch(&self, group: &Arc<ProcessGroup>) {
        *self.group.lock().unwrap_or_else(|e| e.into_inner()) = Some(group.clone());
        if self.ended.load(Ordering::Relaxed) {
            group.abort();
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.group.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Session {
    rt: tokio::runtime::Runtime,
    endpoint: tonic::transport::Endpoint,
    token: Token,
    client: Option<Client>,
    worker_id: String,
    incarnation: u64,
    generation: u64,
    /// Hyperparameter changes, as the coordinator last sent them.
    changes: Vec<HyperParameterChange>,
    /// How long to keep trying an unreachable coordinator.
    patience: Duration,
    /// How long a join waits for a group to form (0: for ever).
    join_timeout: Duration,
    /// The last step reported (the liveness thread sends it too).
    step: Arc<AtomicU64>,
    /// When the coordinator last answered a heartbeat of this worker.
    beat: Arc<Beat>,
    /// The address this worker advertises for the collective's traffic.
    host: String,
    /// Set on SIGTERM.
    terminate: Arc<AtomicBool>,
    /// The step the running group drains after (a member is terminating), as the coordinator
    /// last said.
    drain_at: Option<u64>,
    /// This generation's splits of the global batch by speed, oldest first.
    shares: Vec<Shares>,
}

/// Whether a failed call means the coordinator is (for now) out of reach.
fn unreachable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

fn rpc_err(e: &tonic::Status) -> Error {
    if unreachable(e) || e.code() == tonic::Code::NotFound {
        // Gone or restarted (a restarted coordinator does not know this worker yet).
        Error::Regroup(format!("coordinator {:?}: {}", e.code(), e.message()))
    } else if e.code() == tonic::Code::Internal && e.message().contains("h2 protocol error") {
        Error::Coordinator(format!(
            "{}: the coordinator does not speak plain gRPC; if it is served over TLS, use an https:// URL and --tls-ca",
            e.message()
        ))
    } else {
        Error::Coordinator(format!("{:?}: {}", e.code(), e.message()))
    }
}

impl Session {
    /// The client, connecting first if there is none (the coordinator may be restarting: keep
    /// trying for `patience`).
    fn client(&mut self) -> Result<Client> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let deadline = Instant::now() + self.patience;
        let endpoint = self.endpoint.clone();
        let channel = self.rt.block_on(async {
            loop {
                match endpoint.connect().await {
                    Ok(c) => break Ok(c),
                    Err(e) if Instant::now() > deadline => break Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        });
        let channel = channel.map_err(|e| {
            Error::Coordinator(format!(
                "could not reach the coordinator at {} within {} s: {e}",
                self.endpoint.uri(),
                self.patience.as_secs()
            ))
        })?;
        let client = CoordinatorClient::with_interceptor(channel, self.token.clone());
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Runs one call; on a transport failure the connection is dropped, so that the next call
    /// connects again.
    fn call<T, F, Fut>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client()?;
        match self.rt.block_on(f(client)) {
            Ok(r) => Ok(r.into_inner()),
            Err(e) => {
                if unreachable(&e) {
                    self.client = None;
                }
                Err(rpc_err(&e))
            }
        }
    }

    /// Asks to join until assigned; `abandoned` reports the generation given up, once. A
    /// worker the coordinator keeps waiting (rendezvous, or a standby while a group runs)
    /// waits at most `join_timeout` (0: for ever); a coordinator out of reach is waited for
    /// `patience`.
    fn rendezvous(&mut self, mut abandoned: Option<(u64, String)>) -> Result<JoinReply> {
        let mut unreachable_since: Option<Instant> = None;
        let started = Instant::now();
        loop {
            if self.terminate.load(Ordering::Relaxed) {
                return Err(Error::Terminated(0));
            }
            if !self.join_timeout.is_zero() && started.elapsed() > self.join_timeout {
                return Err(Error::Coordinator(format!(
                    "no group formed within {} s (--join-timeout): the coordinator is waiting \
                     for more workers than have joined",
                    self.join_timeout.as_secs()
                )));
            }
            let (gen_, reason) = abandoned.clone().unwrap_or_default();
            let req = JoinRequest {
                worker_id: self.worker_id.clone(),
                incarnation: self.incarnation,
                abandoned_generation: gen_,
                reason,
                host: self.host.clone(),
                wait_ms: JOIN_WAIT_MS,
            };
            let asked = Instant::now();
            match self.call(|mut c| async move { c.join(axial_proto::deadline::call(req)).await }) {
                Ok(r) => {
                    abandoned = None;
                    unreachable_since = None;
                    if r.status == v1::join_reply::Status::Assigned as i32
                        || r.status == v1::join_reply::Status::Finished as i32
                        || r.status == v1::join_reply::Status::Stopped as i32
                    {
                        return Ok(r);
                    }
                }
                Err(Error::Regroup(why)) => {
                    // Out of reach (it may be restarting): the next call connects again.
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.patience {
                        let hint = if self.endpoint.uri().scheme_str() == Some("https") {
                            " (over TLS: does it require a client certificate, --tls-cert and --tls-key?)"
                        } else {
                            ""
                        };
                        return Err(Error::Coordinator(format!(
                            "the coordinator stayed out of reach for {} s: {why}{hint}",
                            self.patience.as_secs()
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
            // A coordinator that held the call (a long poll) is asked again at once; one that
            // answered at once (an older one, or out of reach) at 5 Hz.
            std::thread::sleep(Duration::from_millis(200).saturating_sub(asked.elapsed()));
        }
    }
}

impl Coordination for Session {
    fn heartbeat(&mut self, report: &Report) -> Result<()> {
        self.step.store(report.step, Ordering::Relaxed);
        let (eval_epoch, eval_top1) = report.eval.unwrap_or((0, 0.0));
        let req = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step: report.step,
            phase: "train".into(),
            loss: report.loss,
            images_per_second: report.images_per_second,
            lr: report.lr,
            total_steps: report.total_steps,
            phase_seconds: report.phase_seconds.to_vec(),
            eval_epoch,
            eval_top1,
        };
        let reply =
            self.call(|mut c| async move { c.heartbeat(axial_proto::deadline::call(req)).await })?;
        self.beat.mark();
        if reply.abort {
            return Err(Error::Regroup(format!(
                "generation {} was aborted by the coordinator",
                self.generation
            )));
        }
        if reply.stop {
            return Err(Error::Coordinator("the coordinator stopped the job".into()));
        }
        self.changes = reply.changes.iter().map(Into::into).collect();
        self.drain_at = (reply.drain_at_step != 0).then_some(reply.drain_at_step);
        if let Some(b) = reply.shares
            && b.generation == self.generation
            && self.shares.last().is_none_or(|s| s.from_step < b.from_step)
        {
            self.shares.push(Shares {
                from_step: b.from_step,
                samples: b.samples,
            });
        }
        Ok(())
    }

    fn vote(&mut self, pos: Position, folder: &Path, files: Vec<FileEntry>) -> Result<()> {
        let req = VoteRequest {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step: pos.step,
            epoch: pos.epoch,
            consumed: pos.consumed,
            files: files
                .into_iter()
                .map(|f| v1::FileEntry {
                    path: f.name,
                    sha256: f.sha256,
                    bytes: f.bytes,
                })
                .collect(),
            folder: folder.display().to_string(),
            position_json: serde_json::to_string(&pos).unwrap_or_default(),
            // Only rank 0 votes, after the group's collective barrier at this step (see
            // train::checkpointer::checkpoint_at).
            for_group: true,
        };
        let reply = match self
            .call(|mut c| async move { c.vote(axial_proto::deadline::call(req)).await })
        {
            Err(Error::Coordinator(m)) if m.starts_with("FailedPrecondition") => {
                return Err(Error::Regroup(m));
            }
            r => r?,
        };
        if !reply.accepted {
            // The group cannot go on past a checkpoint it did not commit: re-form and resume
            // from the last committed one (the coordinator logged why).
            return Err(Error::Regroup(format!(
                "checkpoint vote for step {} refused: {}",
                pos.step, reply.reason
            )));
        }
        Ok(())
    }

    fn changes(&self) -> &[HyperParameterChange] {
        &self.changes
    }

    fn drain_at(&self) -> Option<u64> {
        self.drain_at
    }

    fn shares(&self) -> &[Shares] {
        &self.shares
    }
}

fn incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Whether a failed generation is worth joining again for: the group is gone or broken, but
/// the job is not (bad configuration, data or checkpoints are final).
fn regroupable(e: &Error) -> bool {
    match e {
        Error::Regroup(_) | Error::Collective(_) | Error::Setup(_) => true,
        Error::Torch(t) => crate::collective::is_collective_failure(t),
        _ => false,
    }
}

/// A set-up error that joining again cannot heal: this machine's address, interface, GPU or
/// build is at fault, not the group.
fn permanent_setup_error(message: &str) -> bool {
    [
        "Cannot resolve",
        "Cannot assign requested address",
        "no NCCL backend",
        "only supported with GPUs",
        "has no GPU cuda:",
        "Unable to find address for",
        "no such interface",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// Sets an environment variable at start-up, unless the user set it.
#[allow(unsafe_code)]
fn default_env(key: &str, value: &str) {
    if std::env::var_os(key).is_none() {
        // SAFETY: called from `join` before it starts any thread (runtime, liveness, loaders).
        unsafe { std::env::set_var(key, value) };
    }
}

pub fn join(args: &JoinArgs) -> anyhow::Result<()> {
    match args.local_ranks {
        0 => bail!("--local-ranks must be at least 1"),
        1 => {}
        n => return crate::local_ranks::run(args, n),
    }
    // A local rank tells its parent it is alive (see `local_ranks`).
    crate::local_ranks::report_liveness();
    // SIGTERM (a preempted pod, a time limit): the group checkpoints, this worker leaves.
    let terminate = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, terminate.clone())
        .context("a SIGTERM handler")?;
    if let Some(iface) = &args.iface {
        // NCCL's bootstrap and data sockets, and Gloo's (for tools that read the variable).
        default_env("NCCL_SOCKET_IFNAME", iface);
        default_env("GLOO_SOCKET_IFNAME", iface);
    }
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("token file {}", args.token_file.display()))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("{} is empty", args.token_file.display());
    }
    let header = format!("Bearer {token}")
        .parse()
        .context("the token is not valid metadata")?;
    if let Some(d) = &args.device {
        crate::forward::parse_device(d).map_err(|m| anyhow::anyhow!("--device: {m}"))?;
    }
    if let Some(m) = &args.metrics_listen
        && !m.is_empty()
        && m.parse::<std::net::SocketAddr>().is_err()
    {
        bail!("--metrics-listen {m:?} is not an address like 0.0.0.0:9401 (\"\" turns it off)");
    }
    let worker_id = args.worker_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let endpoint = axial_proto::tls::endpoint(
        &args.coordinator,
        &axial_proto::tls::ClientFiles {
            ca: args.tls_ca.clone(),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            domain: args.tls_domain.clone(),
        },
    )
    .map_err(anyhow::Error::msg)?;
    let coordinator =
        crate::address::coordinator_addr(endpoint.uri()).map_err(anyhow::Error::msg)?;
    let advertised =
        crate::address::advertised(args.host.as_deref(), args.iface.as_deref(), coordinator)
            .map_err(anyhow::Error::msg)?;
    eprintln!(
        "{worker_id}: advertising {} for the collective ({}{})",
        advertised.host,
        advertised.how,
        match &advertised.local {
            crate::collective::Local::Interface(i) => format!("; Gloo on interface {i}"),
            crate::collective::Local::Host(_) => String::new(),
        }
    );
    // A runtime with a thread of its own: the connection to the coordinator is driven between
    // calls too. On a current-thread runtime it only runs inside a call, so while the training
    // thread computes (a report every `log_every` steps can be tens of seconds apart) the
    // server's HTTP/2 keepalive pings go unanswered, the server closes the connection, and the
    // next heartbeat fails with a transport error that ends the generation.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("coordinator-client")
        .enable_all()
        .build()?;
    let mut session = Session {
        rt,
        endpoint,
        token: Token(header),
        client: None,
        worker_id: worker_id.clone(),
        incarnation: incarnation(),
        generation: 0,
        changes: Vec::new(),
        patience: Duration::from_secs(args.wait_coordinator),
        join_timeout: Duration::from_secs(args.join_timeout),
        step: Arc::new(AtomicU64::new(0)),
        beat: Arc::new(Beat::new()),
        host: advertised.host.clone(),
        terminate,
        drain_at: None,
        shares: Vec::new(),
    };
    let metrics = WorkerMetrics::new(&worker_id);
    let mut serving_metrics = false;
    let mut abandoned = None;
    let mut regroups = 0u64;
    let mut setup_failures = 0u32;
    loop {
        let reply = match session.rendezvous(abandoned.take()) {
            Err(Error::Terminated(step)) => return terminated(&mut session, step),
            r => r?,
        };
        if reply.status == v1::join_reply::Status::Finished as i32 {
            eprintln!("{worker_id}: the job has finished; nothing to join");
            return Ok(());
        }
        if reply.status == v1::join_reply::Status::Stopped as i32 {
            // The coordinator is stopping (the job is being stopped): the group has drained.
            return Err(Terminated(format!(
                "{worker_id}: the coordinator is stopping the job (SIGTERM); its last checkpoint \
                 is committed"
            ))
            .into());
        }
        session.generation = reply.generation;
        session.changes = reply.changes.iter().map(Into::into).collect();
        session.drain_at = None;
        session.shares.clear();
        let result = run_generation(
            &mut session,
            args,
            &advertised.local,
            &reply,
            &metrics,
            &mut serving_metrics,
        );
        match result {
            Ok(()) => break,
            Err(Error::Terminated(step)) => return terminated(&mut session, step),
            Err(Error::Setup(why))
                if permanent_setup_error(&why) || setup_failures + 1 >= args.max_setup_failures =>
            {
                let attempts = setup_failures + 1;
                let reason = format!(
                    "collective set-up failed in {attempts} generation(s) in a row{}: {why}",
                    if permanent_setup_error(&why) {
                        " (joining again cannot fix this)"
                    } else {
                        ""
                    }
                );
                let req = LeaveRequest {
                    worker_id: worker_id.clone(),
                    finished: false,
                    reason: reason.clone(),
                };
                // The coordinator shows why; the worker stops either way.
                let _ = session
                    .call(|mut c| async move { c.leave(axial_proto::deadline::call(req)).await });
                bail!("{worker_id}: {reason}");
            }
            Err(e) if regroupable(&e) => {
                regroups += 1;
                if matches!(e, Error::Setup(_)) {
                    setup_failures += 1;
                } else {
                    setup_failures = 0;
                }
                eprintln!(
                    "{worker_id}: generation {} ended: {e}; joining again (re-formation {regroups})",
                    reply.generation
                );
                metrics.regroups.increment(1);
                abandoned = Some((reply.generation, e.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let req = LeaveRequest {
        worker_id,
        finished: true,
        reason: String::new(),
    };
    session.call(|mut c| async move { c.leave(axial_proto::deadline::call(req)).await })?;
    Ok(())
}

/// SIGTERM: tell the coordinator why this worker leaves (after the group's checkpoint at
/// `step`, or before training), and end as a terminated process.
fn terminated(session: &mut Session, step: u64) -> anyhow::Result<()> {
    let reason = if step > 0 {
        format!("terminated (SIGTERM) after the group's checkpoint at step {step}")
    } else {
        "terminated (SIGTERM) before training".to_owned()
    };
    let req = LeaveRequest {
        worker_id: session.worker_id.clone(),
        finished: false,
        reason: reason.clone(),
    };
    let _ = session.call(|mut c| async move { c.leave(axial_proto::deadline::call(req)).await });
    Err(Terminated(format!("{}: {reason}; left the group", session.worker_id)).into())
}

/// A worker that left its group on SIGTERM (`main` exits with 143).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Terminated(pub String);

/// One generation: form the group through the coordinator's rendezvous store, train (from the
/// committed checkpoint, if any) to the end of the job, and wait for every rank's final vote.
fn run_generation(
    session: &mut Session,
    args: &JoinArgs,
    local: &crate::collective::Local,
    reply: &JoinReply,
    metrics: &WorkerMetrics,
    serving_metrics: &mut bool,
) -> Result<()> {
    let worker_id = session.worker_id.clone();
    let (rank, world) = (reply.rank as usize, reply.world as usize);
    let liveness = Liveness::start(session, session.step.clone());
    let mut job = JobConfig::parse(&reply.job_toml, "the coordinator's job", Path::new("/"))?;
    // Both checked at start (join).
    if let Some(d) = &args.device {
        job.train.device.clone_from(d);
    }
    if let Some(m) = &args.metrics_listen {
        job.metrics.listen.clone_from(m);
    }
    let timeout = Duration::from_secs(args.collective_timeout);
    let device = crate::forward::parse_device(&job.train.device).map_err(|m| Error::BadTensor {
        path: PathBuf::from("train.device"),
        message: m,
    })?;
    let backend = match args.backend.as_str() {
        "gloo" => Backend::Gloo,
        "nccl" => Backend::Nccl,
        _ => Backend::for_device(device),
    };
    let kv = crate::rendezvous::CoordinatorStore::connect(
        &session.endpoint,
        session.token.clone(),
        &worker_id,
        reply.generation,
        liveness.ended.clone(),
    )
    .map_err(Error::Setup)?;
    let store = Store::key_value(Box::new(kv), rank, world, timeout);
    let group = ProcessGroup::new(&store, backend, local, device).map_err(|e| {
        // Aborted because the generation ended meanwhile: re-form, not a set-up fault.
        if e.message.contains("aborted:") || e.message.contains("FailedPrecondition") {
            Error::Regroup(e.to_string())
        } else {
            Error::Setup(e.to_string())
        }
    })?;
    let group = Arc::new(group);
    liveness.watch(&group);
    eprintln!(
        "{worker_id}: rank {rank} of {world}, generation {}, {} on {device:?}",
        reply.generation,
        backend.name()
    );
    if !*serving_metrics && let Some(addr) = job.metrics_addr() {
        // Without metrics the worker still trains: a port taken (another job on the node,
        // node_exporter on 9100) is a warning, not a failure.
        match serve(addr, metrics.handle()) {
            Ok(bound) => eprintln!("{worker_id}: metrics on http://{bound}/metrics"),
            Err(e) => eprintln!(
                "{worker_id}: WARNING: no /metrics: cannot listen on {addr} ({e}); give \
                 --metrics-listen another address"
            ),
        }
        *serving_metrics = true;
    }
    metrics.rank.set(rank as f64);
    metrics.world_size.set(world as f64);
    metrics.generation.set(reply.generation as f64);
    let resume_from = reply
        .resume
        .as_ref()
        .filter(|r| !r.checkpoint.is_empty())
        .map(|r| PathBuf::from(&r.checkpoint));
    let opts = RunOptions {
        resume: false,
        resume_from,
        stop_after_steps: None,
        quiet: false,
        sample_log: (worker_id.clone(), reply.generation),
        generation: reply.generation,
        terminate: Some(session.terminate.clone()),
    };
    let summary = run(
        &job,
        &opts,
        metrics,
        Some(Distributed {
            group: group.clone(),
            coordination: session,
        }),
    )?;
    // Every rank has voted for the final checkpoint before anyone leaves (a member leaving
    // ends the generation).
    group.barrier()?;
    if rank == 0 {
        println!(
            "done after {} steps ({} samples) in {:.1} s ({:.1} images/s): val top-1 {:.2}%, top-5 {:.2}%, loss {:.4}",
            summary.steps,
            summary.samples_seen,
            summary.wall_seconds,
            summary.images_per_second,
            100.0 * summary.val_top1,
            100.0 * summary.val_top5,
            summary.val_loss
        );
    }
    Ok(())
}
