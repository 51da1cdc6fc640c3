//! Clusters for real: the coordinator and every worker on a host of its own (a network
//! namespace with its own address on a bridge, `axial_e2e::cluster`), as on a cluster, not on
//! 127.0.0.1: groups form across hosts, strangers cannot touch the rendezvous, bad set-ups stop
//! with their reason, and the job survives cut links, a stopped coordinator and a slow network
//! with every sample consumed exactly once. Each test skips, saying why, where network
//! namespaces cannot be made (not root).

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use axial_e2e::cluster::VirtualCluster;
use axial_e2e::{assert_each_sample_once, bin, run, stream_lines, until, wait_ok};

const TOKEN: &str = "a-cluster-test-token-of-enough-length";
const PORT: u16 = 50051;

/// A small job: `train` built-in samples per epoch, 2 epochs, batch 8 per rank, a checkpoint
/// every 5 steps, sample logs for the exactly-once audit.
fn job_toml(train: usize) -> String {
    format!(
        r#"
[model]
variant = "official"
layers = [1, 1, 1, 1]
width = 0.125
num_classes = 10
[data]
format = "builtin"
train = {train}
val = 48
image_size = 32
loader_threads = 1
log_samples = true
[train]
epochs = 2
batch_size = 8
seed = 3
threads = 1
log_every = 4
[checkpoint]
dir = "ckpt"
every_steps = 5
keep = 2
[metrics]
listen = ""
"#
    )
}

/// A job on a virtual cluster: its folder (shared by every host, as on shared storage) and the
/// hosts.
struct Job {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cluster: VirtualCluster,
    train: usize,
}

impl Job {
    fn new(workers: usize, train: usize) -> Option<Self> {
        let cluster = VirtualCluster::up(workers)?;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("job.toml"), job_toml(train)).expect("job");
        std::fs::write(dir.join("token"), TOKEN).expect("token");
        Some(Self {
            _tmp: tmp,
            dir,
            cluster,
            train,
        })
    }

    fn url(&self) -> String {
        format!("http://{}:{PORT}", self.cluster.coordinator_ip())
    }

    /// `axial-coordinator serve` on the coordinator's host; its log lines come through the
    /// channel.
    fn serve(&self, extra: &[&str]) -> (Child, Receiver<String>) {
        let c = self.cluster.coordinator_ip();
        let mut child = self
            .cluster
            .command("c", bin("axial-coordinator"))
            .args(["serve", "--insecure", "--listen", &format!("{c}:{PORT}")])
            .args(["--http", &format!("{c}:9090"), "--token-file"])
            .arg(self.dir.join("token"))
            .arg(self.dir.join("job.toml"))
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve");
        let rx = stream_lines(child.stderr.take().expect("stderr"));
        (child, rx)
    }

    /// `axial-worker join` as `w<i>` on its own host, logging to `w<i>.log`.
    fn join(&self, i: usize, extra: &[&str]) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("w{i}.log"))).expect("log");
        self.cluster
            .command(&format!("w{i}"), bin("axial-worker"))
            .args(["join", "--coordinator", &self.url(), "--worker-id"])
            .arg(format!("w{i}"))
            .arg("--token-file")
            .arg(self.dir.join("token"))
            .args([
                "--metrics-listen",
                "0.0.0.0:9100",
                "--collective-timeout",
                "60",
            ])
            .args(extra)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("worker")
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("w{i}.log"))).unwrap_or_default()
    }

    /// Every rank's replica fingerprint (the hash of its whole state at the end).
    fn fingerprints(&self, world: usize) -> Vec<String> {
        (0..world)
            .map(|r| {
                std::fs::read_to_string(self.dir.join(format!("ckpt/replica-{r}.sha256")))
                    .unwrap_or_else(|_| panic!("rank {r}'s fingerprint"))
            })
            .collect()
    }

    /// The job ended with every sample once per epoch, on `world` ranks, replicas identical.
    fn assert_finished(&self, world: usize) {
        assert_each_sample_once(&self.dir, 2, self.train);
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.join("ckpt/summary.json")).expect("summary"),
        )
        .expect("json");
        assert_eq!(
            summary["samples_seen"].as_u64(),
            Some(2 * self.train as u64),
            "{summary}"
        );
        let prints = self.fingerprints(world);
        assert!(
            prints.iter().all(|p| *p == prints[0]),
            "replicas differ: {prints:?}"
        );
    }

    /// GET `path` from the coordinator's HTTP port, from this machine (on the cluster's
    /// network).
    fn status(&self) -> serde_json::Value {
        let text = http_get(
            &format!("{}:9090", self.cluster.coordinator_ip()),
            "/api/status",
        )
        .expect("status");
        serde_json::from_str(&text).expect("json")
    }
}

impl Drop for Job {
    /// A failing test shows what the workers said (their logs live in its temp dir).
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.cluster.workers() {
                let log = self.log(i);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                println!(
                    "---- w{i}.log (last {} lines)\n{}",
                    tail.len(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

/// A plain HTTP/1.0 GET (the body), or None if the host does not answer.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// What a process without the job's membership got from the coordinator's rendezvous store,
/// calling it over and over while a group forms and trains: replies by gRPC status code.
#[derive(Debug, Default)]
struct StrangerTally {
    by_code: std::collections::BTreeMap<String, usize>,
}

/// A stranger on the cluster network (this machine) that finds the coordinator and tries to
/// read, write, delete and count rendezvous keys of the first generations, once without the
/// job token and once with it but as no member of any group, until `stop`.
fn stranger(url: String, stop: Arc<AtomicBool>) -> StrangerTally {
    use axial_proto::v1::coordinator_client::CoordinatorClient;
    use axial_proto::v1::{StoreRequest, store_request::Op};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut tally = StrangerTally::default();
    while !stop.load(Ordering::Relaxed) {
        let channel = match rt.block_on(
            tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect_timeout(Duration::from_secs(1))
                .connect(),
        ) {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        for with_token in [false, true] {
            let header: tonic::metadata::MetadataValue<_> =
                format!("Bearer {TOKEN}").parse().expect("header");
            let mut client = CoordinatorClient::with_interceptor(
                channel.clone(),
                move |mut req: tonic::Request<()>| {
                    if with_token {
                        req.metadata_mut().insert("authorization", header.clone());
                    }
                    Ok(req)
                },
            );
            for generation in 0..4u64 {
                for (op, key) in [
                    (Op::Set, "0"),
                    (Op::Get, "0"),
                    (Op::Delete, "0"),
                    (Op::Set, "rank_1"),
                    (Op::Add, "counter"),
                    (Op::NumKeys, ""),
                ] {
                    let req = StoreRequest {
                        worker_id: "stranger".into(),
                        generation,
                        op: op as i32,
                        keys: if key.is_empty() {
                            Vec::new()
                        } else {
                            vec![key.into()]
                        },
                        value: b"10.66.6.6:666".to_vec(),
                        ..Default::default()
                    };
                    let code = match rt.block_on(client.store(req)) {
                        Ok(_) => "Ok".to_owned(),
                        Err(s) => format!("{:?}", s.code()),
                    };
                    *tally.by_code.entry(code).or_default() += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tally
}

/// Two workers on two hosts, the coordinator on a third, no `--host`: each worker advertises
/// the address of its route to the coordinator, the group forms, the job finishes with
/// identical replicas and every sample once per epoch, and with the same bits as the same job
/// on one machine over loopback. Meanwhile a stranger on the network hammers the rendezvous
/// store without the token and with it but as no member: every call is refused, and the group
/// forms and trains undisturbed.
#[test]
fn two_workers_on_separate_hosts_train_like_on_loopback_and_strangers_are_refused() {
    let Some(job) = Job::new(2, 400) else { return };
    let (mut coordinator, lines) = job.serve(&["--workers", "2"]);
    until(&lines, "listening on");
    let stop = Arc::new(AtomicBool::new(false));
    let intruder = {
        let (url, stop) = (job.url(), stop.clone());
        std::thread::spawn(move || stranger(url, stop))
    };
    let start = Instant::now();
    let mut workers: Vec<Child> = (0..2).map(|i| job.join(i, &[])).collect();
    until(&lines, "Formed");
    println!(
        "group formed {:.1} s after the workers started",
        start.elapsed().as_secs_f64()
    );
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("w{i}"));
    }
    wait_ok(&mut coordinator, "the coordinator");
    stop.store(true, Ordering::Relaxed);
    let tally = intruder.join().expect("stranger");
    println!(
        "the stranger's calls to the rendezvous store, by reply: {:?}",
        tally.by_code
    );
    assert!(!tally.by_code.contains_key("Ok"), "{tally:?}");
    assert!(
        tally.by_code.get("Unauthenticated").copied().unwrap_or(0) > 0,
        "{tally:?}"
    );
    assert!(
        tally.by_code.get("PermissionDenied").copied().unwrap_or(0)
            + tally
                .by_code
                .get("FailedPrecondition")
                .copied()
                .unwrap_or(0)
            > 0,
        "{tally:?}"
    );
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("refused a store call")),
        "{rest:#?}"
    );
    for i in 0..2 {
        let log = job.log(i);
        let ip = job.cluster.worker_ip(i);
        assert!(
            log.contains(&format!("advertising {ip} for the collective (the local address of the route to the coordinator")),
            "w{i}:\n{log}"
        );
    }
    job.assert_finished(2);

    // The same job on one machine, over loopback: the same bits.
    let local = tempfile::tempdir().expect("tempdir");
    std::fs::write(local.path().join("job.toml"), job_toml(400)).expect("job");
    let out = run(std::process::Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", "2", "--worker-bin"])
        .arg(bin("axial-worker"))
        .arg(local.path().join("job.toml")));
    assert!(out.status.success());
    let loopback = std::fs::read_to_string(local.path().join("ckpt/replica-0.sha256"))
        .expect("loopback fingerprint");
    assert_eq!(
        job.fingerprints(2)[0],
        loopback,
        "separate hosts and loopback trained different weights"
    );
}

/// Eight workers, each on its own host: the job finishes, all eight replicas are identical,
/// every sample is consumed once per epoch, and the weights are those of the same job on one
/// machine.
#[test]
fn eight_workers_on_eight_hosts() {
    let Some(job) = Job::new(8, 320) else { return };
    let (mut coordinator, lines) = job.serve(&["--workers", "8"]);
    until(&lines, "listening on");
    let start = Instant::now();
    let mut workers: Vec<Child> = (0..8).map(|i| job.join(i, &[])).collect();
    until(&lines, "Formed");
    println!(
        "8 ranks formed {:.1} s after starting",
        start.elapsed().as_secs_f64()
    );
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("w{i}"));
    }
    wait_ok(&mut coordinator, "the coordinator");
    println!(
        "8 workers: done {:.1} s after starting",
        start.elapsed().as_secs_f64()
    );
    job.assert_finished(8);
    // The same job with 8 workers on one machine over loopback: the same bits (ranks follow
    // the worker ids, w0..w7, in both).
    let local = tempfile::tempdir().expect("tempdir");
    std::fs::write(local.path().join("job.toml"), job_toml(320)).expect("job");
    let out = run(std::process::Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", "8", "--worker-bin"])
        .arg(bin("axial-worker"))
        .arg(local.path().join("job.toml")));
    assert!(out.status.success());
    let loopback = std::fs::read_to_string(local.path().join("ckpt/replica-0.sha256"))
        .expect("loopback fingerprint");
    assert_eq!(
        job.fingerprints(8)[0],
        loopback,
        "eight hosts and loopback trained different weights"
    );
}

/// Set-ups that cannot work are stopped with their reason, not retried forever: a worker that
/// would advertise a loopback address to a coordinator on another host is refused at start
/// (and by the coordinator itself, for a client that skips that check); a worker whose backend
/// cannot exist here (NCCL on a host without a GPU) gives up after its first attempt, and the
/// coordinator shows why, while the job goes on with the other worker (--min 1).
#[test]
fn impossible_setups_stop_with_their_reason() {
    let Some(job) = Job::new(2, 200) else { return };
    let (mut coordinator, lines) = job.serve(&["--workers", "2", "--min", "1"]);
    until(&lines, "listening on");

    let mut loopback = job.join(1, &["--host", "127.0.0.1"]);
    let status = loopback.wait().expect("wait");
    let log = job.log(1);
    println!("--host 127.0.0.1:\n{log}");
    assert!(!status.success());
    assert!(
        log.contains("loopback") && log.contains(&job.cluster.coordinator_ip()),
        "{log}"
    );

    // The coordinator's own check, for a client that advertises loopback from afar (this
    // machine is on the cluster network).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let refused = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(job.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let header: tonic::metadata::MetadataValue<_> =
            format!("Bearer {TOKEN}").parse().expect("header");
        let mut client = axial_proto::v1::coordinator_client::CoordinatorClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            },
        );
        client
            .join(axial_proto::v1::JoinRequest {
                worker_id: "sneaky".into(),
                incarnation: 1,
                host: "127.0.0.1".into(),
                ..Default::default()
            })
            .await
            .expect_err("refused")
    });
    println!("coordinator: {refused}");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("loopback"));

    let mut good = job.join(0, &[]);
    let start = Instant::now();
    let mut nccl = job.join(1, &["--backend", "nccl"]);
    let status = nccl.wait().expect("wait");
    let log = job.log(1);
    println!(
        "--backend nccl on a CPU host ({:.1} s):\n{log}",
        start.elapsed().as_secs_f64()
    );
    assert!(!status.success());
    assert!(log.contains("collective set-up failed"), "{log}");
    assert!(log.contains("joining again cannot fix this"), "{log}");
    let status = job.status();
    let failed = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["id"] == "w1")
        .cloned()
        .unwrap_or_default();
    println!("the coordinator shows w1 as {failed}");
    assert_eq!(failed["state"], "failed", "{status}");
    assert!(
        failed["reason"].as_str().unwrap_or("").contains("NCCL"),
        "{failed}"
    );
    wait_ok(&mut good, "w0");
    wait_ok(&mut coordinator, "the coordinator");
    assert_each_sample_once(&job.dir, 2, 200);
}

/// Waits for a committed checkpoint at `step` or later in the coordinator's log.
fn until_committed(lines: &Receiver<String>, step: u64) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let more = until(lines, "committed");
        let done = more.last().is_some_and(|l| {
            l.split("(step ")
                .nth(1)
                .and_then(|t| t.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= step)
        });
        seen.extend(more);
        if done {
            return seen;
        }
    }
}

/// A worker's cable is pulled for good: the coordinator declares it lost within its heartbeat
/// timeout, the group re-forms without it (--min 1), and the job finishes on the other worker
/// with every sample once per epoch.
#[test]
fn a_worker_cut_off_for_good_is_lost_and_the_job_finishes_without_it() {
    let Some(job) = Job::new(2, 400) else { return };
    let (mut coordinator, lines) =
        job.serve(&["--workers", "2", "--min", "1", "--heartbeat-timeout", "5"]);
    until(&lines, "listening on");
    let mut w0 = job.join(0, &[]);
    let mut w1 = job.join(1, &[]);
    until_committed(&lines, 5);
    job.cluster.cut("w1");
    let cut = Instant::now();
    let seen = until(&lines, "Lost");
    let lost = cut.elapsed().as_secs_f64();
    let seen2 = until(&lines, "Formed");
    let formed = cut.elapsed().as_secs_f64();
    println!("cable cut: w1 lost after {lost:.1} s, group re-formed after {formed:.1} s");
    assert!(seen.iter().any(|l| l.contains("w1")), "{seen:#?}");
    assert!(
        seen2.last().is_some_and(|l| l.contains("world: 1")),
        "{seen2:#?}"
    );
    assert!(lost < 15.0, "detected after {lost:.1} s");
    wait_ok(&mut w0, "w0");
    wait_ok(&mut coordinator, "the coordinator");
    let _ = w1.kill();
    let _ = w1.wait();
    assert_each_sample_once(&job.dir, 2, 400);
}

/// A worker's cable is pulled for 20 s, then plugged back: the group (which needs both) waits,
/// the worker joins again when it can, and the job finishes with both ranks, identical
/// replicas and every sample once per epoch.
#[test]
fn a_worker_cut_off_for_20_s_rejoins_and_the_job_finishes_with_both() {
    let Some(job) = Job::new(2, 400) else { return };
    let (mut coordinator, lines) = job.serve(&["--workers", "2", "--heartbeat-timeout", "5"]);
    until(&lines, "listening on");
    let mut workers: Vec<Child> = (0..2).map(|i| job.join(i, &[])).collect();
    until_committed(&lines, 5);
    job.cluster.cut("w1");
    let cut = Instant::now();
    until(&lines, "Lost");
    println!("w1 lost {:.1} s after the cut", cut.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(20).saturating_sub(cut.elapsed()));
    job.cluster.restore("w1");
    let restored = Instant::now();
    let seen = until(&lines, "Formed");
    println!(
        "cable back after {:.1} s; group re-formed {:.1} s later: {:?}",
        restored.duration_since(cut).as_secs_f64(),
        restored.elapsed().as_secs_f64(),
        seen.last()
    );
    assert!(
        seen.last().is_some_and(|l| l.contains("world: 2")),
        "{seen:#?}"
    );
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("w{i}"));
    }
    wait_ok(&mut coordinator, "the coordinator");
    job.assert_finished(2);
}

/// The coordinator's cable is pulled for 20 s, and later the coordinator is stopped (SIGSTOP)
/// for 20 s: workers notice within seconds (every call has a deadline, connections keep-alive
/// pings), wait for it, and the job finishes when it is back, with identical replicas and
/// every sample once per epoch; no worker hangs.
#[test]
fn the_coordinator_cut_off_then_stopped_for_20_s_and_the_job_finishes() {
    let Some(job) = Job::new(2, 800) else { return };
    let (mut coordinator, lines) = job.serve(&["--workers", "2"]);
    until(&lines, "listening on");
    let mut workers: Vec<Child> = (0..2).map(|i| job.join(i, &[])).collect();
    until_committed(&lines, 5);
    job.cluster.cut("c");
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    job.cluster.restore("c");
    let seen = until(&lines, "Formed");
    println!(
        "coordinator cut for 20 s; group formed again {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    assert!(
        seen.last().is_some_and(|l| l.contains("world: 2")),
        "{seen:#?}"
    );
    let step = until_committed(&lines, 0);
    let resumed_step: u64 = step
        .last()
        .and_then(|l| l.split("(step ").nth(1))
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let pid = coordinator.id().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("kill")
                .success()
        );
    };
    signal("-STOP");
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    signal("-CONT");
    println!(
        "coordinator stopped for {:.1} s (after step {resumed_step})",
        stopped.elapsed().as_secs_f64()
    );
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("w{i}"));
    }
    wait_ok(&mut coordinator, "the coordinator");
    for i in 0..2 {
        let log = job.log(i);
        assert!(log.contains("joining again"), "w{i}:\n{log}");
    }
    job.assert_finished(2);
}

/// The sum of `axial_worker_step_phase_seconds` for `phase` and its count, from metrics text.
fn phase_total(metrics: &str, phase: &str) -> Option<(f64, f64)> {
    let value = |suffix: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!("axial_worker_step_phase_seconds_{suffix}"))
                    && l.contains(&format!("phase=\"{phase}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((value("sum")?, value("count")?))
}

/// Both workers' links limited to 100 Mbit/s halfway through: training stays correct (every
/// sample once, identical replicas), and the slower all-reduce shows in the workers' metrics
/// (`axial_worker_step_phase_seconds{phase="allreduce_wait"}`).
#[test]
fn links_limited_to_100_mbit_train_correctly_and_the_all_reduce_shows_it() {
    let Some(job) = Job::new(2, 800) else { return };
    let (mut coordinator, lines) = job.serve(&["--workers", "2"]);
    until(&lines, "listening on");
    let mut workers: Vec<Child> = (0..2).map(|i| job.join(i, &[])).collect();
    // w0's all-reduce wait, scraped twice a second from this machine; the latest kept.
    let latest = Arc::new(std::sync::Mutex::new(None::<(f64, f64)>));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (latest, stop) = (latest.clone(), stop.clone());
        let addr = format!("{}:9100", job.cluster.worker_ip(0));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) =
                    http_get(&addr, "/metrics").and_then(|m| phase_total(&m, "allreduce_wait"))
                {
                    *latest.lock().expect("lock") = Some(v);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    until_committed(&lines, 20);
    let before = *latest.lock().expect("lock");
    job.cluster.limit("w0", "100mbit");
    job.cluster.limit("w1", "100mbit");
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("w{i}"));
    }
    stop.store(true, Ordering::Relaxed);
    poller.join().expect("poller");
    let after = *latest.lock().expect("lock");
    wait_ok(&mut coordinator, "the coordinator");
    job.assert_finished(2);
    let (Some((s0, n0)), Some((s1, n1))) = (before, after) else {
        panic!("no allreduce_wait metric from w0: {before:?} {after:?}");
    };
    let fast = 1e3 * s0 / n0.max(1.0);
    let slow = 1e3 * (s1 - s0) / (n1 - n0).max(1.0);
    println!(
        "all-reduce wait per step: {fast:.1} ms on the open network ({n0} steps), {slow:.1} ms at 100 Mbit/s ({} steps)",
        n1 - n0
    );
    assert!(
        slow > fast,
        "the limit did not show: {fast:.1} ms -> {slow:.1} ms"
    );
}
