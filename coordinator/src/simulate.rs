//! `axial-coordinator simulate`: a load test of the coordinator with simulated workers.
//!
//! For each worker count N it starts a real coordinator (`serve`, this binary, in a process of
//! its own) and N simulated workers in this process: real tonic clients speaking the real
//! protocol with the job token, the way `axial-worker join` does it. Each worker joins
//! (polling while it waits, as the worker does), then, once the group has formed, sends a
//! training heartbeat every `report_every` steps and the liveness heartbeat when a second has
//! passed without either, and rank 0 votes for its group's checkpoint every `checkpoint_every`
//! steps (it writes the checkpoint's files and names them; the other ranks, which the worker's
//! collective barrier vouches for, send no vote). A few workers fail (they stop heartbeating for longer than the heartbeat timeout and
//! join again as a restarted process): the generation ends and every worker joins again, as
//! real ones do. At the end all leave.
//!
//! Printed per N: the time from the last worker's first join to the group formed, the
//! re-formations after failures, p50/p99/max latency per RPC kind, the checkpoint commit time
//! (the first vote sent to the committing reply), the coordinator's CPU seconds and peak RSS,
//! and the size of `/api/status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axial_common::checkpoint::{self, Position};
use axial_proto::v1::coordinator_client::CoordinatorClient;
use axial_proto::v1::{self, HeartbeatRequest, JoinRequest, LeaveRequest, VoteRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// What `simulate` runs.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub workers: Vec<usize>,
    /// Seconds of steady training after the group formed (failures happen within them).
    pub seconds: u64,
    /// Milliseconds per simulated optimizer step.
    pub step_ms: u64,
    /// A training heartbeat every this many steps (the job's `[train] log_every`).
    pub report_every: u64,
    pub checkpoint_every: u64,
    /// Workers that fail during the run (one at a time, spread over it).
    pub failures: usize,
    /// HTTP/2 connections the simulated workers share.
    pub channels: usize,
    /// The coordinator's `--heartbeat-timeout`.
    pub heartbeat_timeout_s: u64,
}

#[derive(Clone)]
struct Token(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, Token>>;

/// RPC kinds measured.
const KINDS: [&str; 5] = ["join", "heartbeat", "train heartbeat", "vote", "leave"];

/// Latencies (µs) by kind, and the run's events.
#[derive(Default)]
struct Record {
    latency: [Vec<u32>; 5],
    errors: [u64; 5],
    /// Failed calls by kind and status code.
    error_codes: BTreeMap<(&'static str, String), u64>,
    /// (step, first vote sent, committing reply)
    commits: BTreeMap<(u64, u64), (Option<Instant>, Option<Instant>)>,
    /// Each formation: when the last worker got its rank.
    formed: Vec<(u64, Instant)>,
    /// Each generation that ended: when its first worker heard so.
    ended: BTreeMap<u64, Instant>,
}

struct Shared {
    record: Mutex<Record>,
    /// When the last worker sent its first join.
    last_first_join: Mutex<Option<Instant>>,
    /// Set when the steady phase ends: workers leave.
    stop: AtomicBool,
    /// Workers holding a rank in the newest generation, by generation.
    assigned: Mutex<BTreeMap<u64, usize>>,
    world: usize,
    dir: PathBuf,
    checkpoint_every: u64,
    report_every: u64,
    step_ms: u64,
    /// The worker told to fail next (index), u64::MAX: none.
    fail_next: AtomicU64,
    heartbeat_timeout: Duration,
}

impl Shared {
    fn time<T>(&self, kind: usize, start: Instant, result: &Result<T, tonic::Status>) {
        let us = start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        r.latency[kind].push(us);
        if let Err(e) = result {
            r.errors[kind] += 1;
            *r.error_codes
                .entry((KINDS[kind], format!("{:?}", e.code())))
                .or_insert(0) += 1;
        }
    }
}

/// Runs the load test for each worker count and prints the table.
pub fn simulate(o: &SimulateOptions) -> anyhow::Result<()> {
    if o.workers.is_empty() || o.workers.contains(&0) {
        bail!("--workers: one or more counts, each at least 1 (e.g. 100,1000,10000)");
    }
    if o.channels == 0 || o.step_ms == 0 || o.checkpoint_every == 0 || o.report_every == 0 {
        bail!("--channels, --step-ms, --report-every and --checkpoint-every must be at least 1");
    }
    let mut rows = Vec::new();
    for &n in &o.workers {
        eprintln!("simulate: {n} workers ...");
        rows.push(run_one(o, n).with_context(|| format!("{n} workers"))?);
    }
    println!(
        "\n| workers | formed after the last join | re-formations (ended -> formed) | join calls per worker; p50/p99/max ms (held up to 2 s while waiting) | heartbeat p50/p99/max ms | train heartbeat p50/p99/max ms | vote p50/p99/max ms | commit ms (mean, max) | RPC errors; votes refused (generation over) | coordinator CPU s | peak RSS MB | /api/status KB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

fn percentiles(v: &mut [u32]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_unstable();
    let at = |q: f64| f64::from(v[((v.len() - 1) as f64 * q).round() as usize]) / 1e3;
    format!("{:.1} / {:.1} / {:.1}", at(0.5), at(0.99), at(1.0))
}

/// The coordinator's CPU seconds (user + system) and peak RSS (MB), from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name's closing parenthesis: utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, s)| s);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0);
    (cpu, rss)
}

fn http_get_len(addr: &str, path: &str) -> Option<usize> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(raw.len() - at - 4)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Coordinator(Child);
impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_one(o: &SimulateOptions, n: usize) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir().context("a temp dir")?;
    let dir = tmp.path().to_path_buf();
    let ckpt = dir.join("ckpt");
    std::fs::write(
        dir.join("job.toml"),
        format!(
            "[model]\narch = \"axial26s\"\nnum_classes = 10\n[data]\nformat = \"builtin\"\n\
             train = 10000000\nval = 100\nimage_size = 32\n[train]\nepochs = 1\nbatch_size = 8\n\
             [checkpoint]\ndir = \"{}\"\nevery_steps = {}\nkeep = 2\n",
            ckpt.display(),
            o.checkpoint_every
        ),
    )?;
    let token = format!("{:032x}", rand_u128());
    std::fs::write(dir.join("token"), &token)?;
    let (grpc, http) = (free_port()?, free_port()?);
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let coordinator = Coordinator(
        Command::new(exe)
            .arg("serve")
            .arg(dir.join("job.toml"))
            .args(["--workers", &n.to_string()])
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .arg("--token-file")
            .arg(dir.join("token"))
            .args(["--heartbeat-timeout", &o.heartbeat_timeout_s.to_string()])
            .args(["--vote-timeout", "60"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start the coordinator")?,
    );
    let pid = coordinator.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the coordinator did not listen: {}",
                std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let shared = Arc::new(Shared {
        record: Mutex::new(Record::default()),
        last_first_join: Mutex::new(None),
        stop: AtomicBool::new(false),
        assigned: Mutex::new(BTreeMap::new()),
        world: n,
        dir: ckpt.clone(),
        checkpoint_every: o.checkpoint_every,
        report_every: o.report_every,
        step_ms: o.step_ms,
        fail_next: AtomicU64::new(u64::MAX),
        heartbeat_timeout: Duration::from_secs(o.heartbeat_timeout_s),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let clients: Vec<Client> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..o.channels {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))?
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await?;
            v.push(CoordinatorClient::with_interceptor(
                channel,
                Token(header.clone()),
            ));
        }
        anyhow::Ok(v)
    })?;
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            rt.spawn(worker(i, client, shared.clone()))
        })
        .collect();
    // The steady phase: once formed, `seconds` long, with the failures spread over it.
    let formed_deadline = Instant::now() + Duration::from_secs(300);
    while shared
        .assigned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .max()
        .copied()
        != Some(n)
    {
        if Instant::now() > formed_deadline {
            bail!("the group of {n} did not form within 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let steady = Duration::from_secs(o.seconds);
    let steady_start = Instant::now();
    for f in 0..o.failures {
        let at = steady.mul_f64((f as f64 + 0.5) / (o.failures as f64 + 0.5) * 0.6);
        while steady_start.elapsed() < at {
            std::thread::sleep(Duration::from_millis(50));
        }
        shared
            .fail_next
            .store(((f * 7919 + 13) % n) as u64, Ordering::Relaxed);
    }
    while steady_start.elapsed() < steady {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status_kb = http_get_len(&format!("127.0.0.1:{http}"), "/api/status")
        .map_or(f64::NAN, |b| b as f64 / 1024.0);
    let metrics_ok = http_get_len(&format!("127.0.0.1:{http}"), "/metrics").is_some();
    let (cpu, rss) = usage(pid);
    shared.stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
        }
    });
    drop(coordinator);
    let elapsed = start.elapsed().as_secs_f64();
    let mut r = shared.record.lock().unwrap_or_else(|e| e.into_inner());
    let last_join = shared
        .last_first_join
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(start);
    let first_formed = r
        .formed
        .first()
        .map_or(f64::NAN, |(_, t)| t.duration_since(last_join).as_secs_f64());
    // A re-formation: from the first worker hearing that its generation ended to the next
    // group formed.
    let reforms: Vec<f64> = r
        .formed
        .iter()
        .skip(1)
        .filter_map(|(g, t)| {
            let (_, ended) = r.ended.range(..*g).next_back()?;
            Some(t.duration_since(*ended).as_secs_f64())
        })
        .collect();
    let commits: Vec<f64> = r
        .commits
        .values()
        .filter_map(|(a, b)| Some(b.as_ref()?.duration_since(*a.as_ref()?).as_secs_f64() * 1e3))
        .collect();
    let commit = if commits.is_empty() {
        "-".to_owned()
    } else {
        format!(
            "{:.1}, {:.1} ({} commits)",
            commits.iter().sum::<f64>() / commits.len() as f64,
            commits.iter().copied().fold(0.0, f64::max),
            commits.len()
        )
    };
    // A vote from a rank whose generation has just ended is refused (FailedPrecondition) and
    // the rank re-joins: the designed path, counted apart from real errors.
    let refused = r
        .error_codes
        .get(&("vote", format!("{:?}", tonic::Code::FailedPrecondition)))
        .copied()
        .unwrap_or(0);
    let errors = format!("{}; {refused}", r.errors.iter().sum::<u64>() - refused);
    let mut cols = Vec::new();
    for k in 0..KINDS.len() {
        if k == 4 {
            continue;
        }
        cols.push(percentiles(&mut r.latency[k]));
    }
    eprintln!(
        "simulate: {n} workers done in {elapsed:.0} s; errors {:?}; /metrics answered: {metrics_ok}; coordinator log {}",
        r.error_codes,
        dir.join("coordinator.log").display()
    );
    let joins = format!("{:.1}; {}", r.latency[0].len() as f64 / n as f64, cols[0]);
    Ok(format!(
        "| {n} | {first_formed:.2} s | {} | {} | {} | {} | {} | {commit} | {errors} | {cpu:.1} | {rss:.0} | {status_kb:.0} |",
        if reforms.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{}, mean {:.2} s",
                reforms.len(),
                reforms.iter().sum::<f64>() / reforms.len() as f64
            )
        },
        joins,
        cols[1],
        cols[2],
        cols[3]
    ))
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u128::from_le_bytes(b)
}

/// One simulated worker: joins, trains (heartbeats, votes), fails when told, leaves at the end.
async fn worker(index: usize, mut client: Client, s: Arc<Shared>) {
    let id = format!("sim-{index:05}");
    let mut incarnation = 1u64;
    let mut abandoned: Option<u64> = None;
    let mut first_join = true;
    'join: loop {
        // Join, asking again while the coordinator says to wait (as `join` does: a long poll of
        // up to 2 s, at most 5 Hz).
        let (rank, generation, resume_step) = loop {
            if s.stop.load(Ordering::Relaxed) {
                break 'join;
            }
            let req = JoinRequest {
                worker_id: id.clone(),
                incarnation,
                abandoned_generation: abandoned.unwrap_or(0),
                reason: abandoned
                    .map(|_| "simulated".to_owned())
                    .unwrap_or_default(),
                host: "127.0.0.1".into(),
                wait_ms: 2000,
            };
            if first_join {
                first_join = false;
                *s.last_first_join.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            let t = Instant::now();
            let r = client.join(axial_proto::deadline::call(req)).await;
            s.time(0, t, &r);
            match r.map(tonic::Response::into_inner) {
                Ok(r) if r.status == v1::join_reply::Status::Assigned as i32 => {
                    abandoned = None;
                    break (
                        r.rank as usize,
                        r.generation,
                        r.resume.map_or(0, |x| x.step),
                    );
                }
                Ok(r) if r.status == v1::join_reply::Status::Finished as i32 => break 'join,
                // Held up to 2 s by the coordinator (a long poll), asked again at once.
                _ => {
                    tokio::time::sleep(Duration::from_millis(200).saturating_sub(t.elapsed())).await
                }
            }
        };
        {
            let mut a = s.assigned.lock().unwrap_or_else(|e| e.into_inner());
            let count = a.entry(generation).or_insert(0);
            *count += 1;
            if *count == s.world {
                s.record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .formed
                    .push((generation, Instant::now()));
            }
        }
        // Train: steps on the wall clock from the formation, all ranks alike.
        let started = Instant::now();
        // The liveness thread's phase: a process of its own starts it at its own moment.
        let mut last_alive = Instant::now()
            .checked_sub(Duration::from_millis((index as u64 * 7919) % 1000))
            .unwrap_or_else(Instant::now);
        let mut last_train: Option<Instant> = None;
        let mut step = resume_step;
        let mut reported = resume_step;
        let mut voted = resume_step;
        loop {
            if s.stop.load(Ordering::Relaxed) {
                break 'join;
            }
            if s.fail_next.load(Ordering::Relaxed) == index as u64
                && s.fail_next
                    .compare_exchange(index as u64, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                // A crash: silent past the heartbeat timeout, then a restarted process.
                tokio::time::sleep(s.heartbeat_timeout + Duration::from_secs(2)).await;
                incarnation += 1;
                continue 'join;
            }
            let due = resume_step + (started.elapsed().as_millis() as u64 / s.step_ms);
            let mut ended = false;
            if due > step {
                step = due;
            }
            // As the worker does: rank r reports at the steps where step + r is a multiple.
            let report_at = step.saturating_sub((step + rank as u64) % s.report_every);
            if report_at > reported {
                reported = report_at;
                let req = HeartbeatRequest {
                    worker_id: id.clone(),
                    generation,
                    step,
                    phase: "train".into(),
                    loss: 2.3,
                    images_per_second: 100.0,
                    lr: 0.1,
                    total_steps: 1_000_000,
                    phase_seconds: vec![0.01, 0.2, 0.4, 0.05, 0.02],
                    ..Default::default()
                };
                let t = Instant::now();
                let r = client.heartbeat(axial_proto::deadline::call(req)).await;
                s.time(2, t, &r);
                if r.is_ok() {
                    last_train = Some(Instant::now());
                }
                ended |= r
                    .as_ref()
                    .map_or_else(|e| e.code() == tonic::Code::NotFound, |r| r.get_ref().abort);
            }
            // The checkpoint step every rank reaches: rank 0 votes for the group, as the
            // worker does after the group's collective barrier (a late rank 0 votes for the one
            // it passed).
            let checkpoint = step - step % s.checkpoint_every;
            if !ended && rank == 0 && checkpoint > voted {
                voted = checkpoint;
                ended |= vote(&mut client, &s, &id, generation, checkpoint).await;
            }
            // As the worker's liveness thread does: a beat a second at its own phase, skipped
            // when a training heartbeat was answered within the last second.
            let beat = last_alive.elapsed() >= Duration::from_secs(1);
            if beat {
                last_alive += Duration::from_secs(1);
                if last_alive.elapsed() >= Duration::from_secs(1) {
                    last_alive = Instant::now(); // behind (a call that took long)
                }
            }
            if !ended && beat && last_train.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                let req = HeartbeatRequest {
                    worker_id: id.clone(),
                    generation,
                    step,
                    phase: "alive".into(),
                    ..Default::default()
                };
                let t = Instant::now();
                let r = client.heartbeat(axial_proto::deadline::call(req)).await;
                s.time(1, t, &r);
                ended |= r
                    .as_ref()
                    .map_or_else(|e| e.code() == tonic::Code::NotFound, |r| r.get_ref().abort);
            }
            if ended {
                s.record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .ended
                    .entry(generation)
                    .or_insert_with(Instant::now);
                abandoned = Some(generation);
                continue 'join;
            }
            // Asleep until the next step or liveness heartbeat is due (a real worker is busy
            // training meanwhile), and at least every 250 ms (the stop flag, a failure).
            let next_step = started + Duration::from_millis((step + 1 - resume_step) * s.step_ms);
            let wake = next_step
                .min(last_alive + Duration::from_secs(1))
                .min(Instant::now() + Duration::from_millis(250));
            tokio::time::sleep_until(wake.into()).await;
        }
    }
    let t = Instant::now();
    let r = client
        .leave(axial_proto::deadline::call(LeaveRequest {
            worker_id: id,
            finished: false,
            reason: "simulation over".into(),
        }))
        .await;
    s.time(4, t, &r);
}

/// Rank 0's vote for its group's checkpoint at `step` (its files written first). Returns
/// whether the generation ended (the vote was refused for a stale generation).
async fn vote(client: &mut Client, s: &Shared, id: &str, generation: u64, step: u64) -> bool {
    let folder = s.dir.join(checkpoint::staging_name(generation, step));
    let (folder, files) = match write_files(&folder) {
        Ok(files) => (folder.display().to_string(), files),
        Err(e) => {
            eprintln!("simulate: cannot write {}: {e}", folder.display());
            return false;
        }
    };
    let pos = Position {
        step,
        loss_scale: 1.0,
        ..Position::default()
    };
    let req = VoteRequest {
        worker_id: id.to_owned(),
        generation,
        step,
        epoch: 0,
        consumed: 0,
        files,
        folder,
        position_json: serde_json::to_string(&pos).unwrap_or_default(),
        for_group: true,
    };
    let sent = Instant::now();
    {
        let mut r = s.record.lock().unwrap_or_else(|e| e.into_inner());
        let e = r.commits.entry((generation, step)).or_insert((None, None));
        e.0 = Some(e.0.map_or(sent, |t: Instant| t.min(sent)));
    }
    let r = client.vote(axial_proto::deadline::call(req)).await;
    s.time(3, sent, &r);
    match r {
        Ok(reply) => {
            let reply = reply.into_inner();
            if reply.committed {
                let mut r = s.record.lock().unwrap_or_else(|e| e.into_inner());
                r.commits
                    .entry((generation, step))
                    .or_insert((None, None))
                    .1 = Some(Instant::now());
            }
            reply.reason.contains("stale generation")
        }
        Err(e) => e.code() == tonic::Code::FailedPrecondition,
    }
}

/// Rank 0's files of a checkpoint (small stand-ins with the real names), described for a vote.
fn write_files(folder: &Path) -> std::io::Result<Vec<v1::FileEntry>> {
    std::fs::create_dir_all(folder)?;
    for name in checkpoint::FILES {
        std::fs::write(folder.join(name), name.as_bytes())?;
    }
    Ok(checkpoint::describe(folder, &checkpoint::FILES)?
        .into_iter()
        .map(|f| v1::FileEntry {
            path: f.name,
            sha256: f.sha256,
            bytes: f.bytes,
        })
        .collect())
}
