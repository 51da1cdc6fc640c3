//! The chaos campaign: a small two-worker job, one random fault at a random moment per trial,
//! and the job must end exactly where an uninterrupted run of it ends.
//!
//! Faults: SIGKILL of a worker, SIGKILL of the coordinator (started again with `--resume`),
//! SIGSTOP of a worker for a random time, SIGTERM of a worker (it drains the group, leaves and
//! exits 143; a replacement joins), and, around a commit in flight (the coordinator started
//! with a test-only delay of its commit writer): the coordinator killed while a commit is
//! written (before or after its manifest, before the reply), rank 0 killed right after its
//! vote, rank 0 stopped for longer than the heartbeat timeout, then continued, and a storage
//! stall (one commit slower than the vote's deadline); some trials keep only one checkpoint
//! (`keep = 1`). And a worker's link cut for a
//! random time (on a virtual cluster: each process on a host of its own; where namespaces
//! cannot be made, everything runs on loopback and the link fault is left out). A supervisor
//! starts a worker that died again under its id, as `launch --max-restarts` and the Kubernetes
//! and Slurm recipes do.
//!
//! Every trial must finish, consume every sample of every epoch exactly once (the sample
//! logs), end with identical replicas and, since the group ends at its original size, write
//! final model and optimizer files byte-identical to the uninterrupted run's: data order,
//! augmentation and reduction order are deterministic, so recovery must be exact. Every
//! committed checkpoint left must verify.
//!
//!     AXIAL_CHAOS_TRIALS=20 cargo test -p axial-e2e --test chaos -- --nocapture
//!
//! (`scripts/chaos.sh` does that.) CI runs 3 trials. `AXIAL_CHAOS_SEED` replays a campaign.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use axial_e2e::cluster::VirtualCluster;
use axial_e2e::{assert_each_sample_once, bin};

const TOKEN: &str = "a-chaos-test-token-of-enough-length";
const TRAIN: usize = 200;
/// 2 epochs of 200 samples in steps of 2 x 8: 13 steps each.
const FINAL_STEP: u64 = 26;

fn job_toml(keep: u64) -> String {
    format!(
        r#"
[model]
variant = "official"
layers = [1, 1, 1, 1]
width = 0.125
num_classes = 10
[data]
format = "builtin"
train = {TRAIN}
val = 32
image_size = 32
loader_threads = 1
log_samples = true
[train]
epochs = 2
batch_size = 8
seed = 5
threads = 1
log_every = 2
[checkpoint]
dir = "ckpt"
every_steps = 3
keep = {keep}
[metrics]
listen = ""
"#
    )
}

/// SplitMix64: a campaign is replayed from its seed.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillWorker,
    KillCoordinator,
    StopWorker,
    TermWorker,
    CutLink,
    KillCoordinatorInCommit,
    KillRank0AfterVote,
    StopRank0,
    StorageStall,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillWorker => "SIGKILL worker",
            Fault::KillCoordinator => "SIGKILL coordinator",
            Fault::StopWorker => "SIGSTOP worker",
            Fault::TermWorker => "SIGTERM worker",
            Fault::CutLink => "cut link",
            Fault::KillCoordinatorInCommit => "SIGKILL coordinator in a commit",
            Fault::KillRank0AfterVote => "SIGKILL rank 0 after its vote",
            Fault::StopRank0 => "SIGSTOP rank 0 past the heartbeat timeout",
            Fault::StorageStall => "storage stall past the vote deadline",
        }
    }

    /// The test-only commit delay the coordinator runs with for this fault: (ms, only the
    /// commit of this step).
    fn commit_delay(self, at: u64) -> Option<(u64, Option<u64>)> {
        match self {
            Fault::KillCoordinatorInCommit | Fault::KillRank0AfterVote => Some((1500, None)),
            Fault::StorageStall => Some((11_000, Some(at))),
            _ => None,
        }
    }
}

/// The processes of one run: where they run (a virtual cluster, or loopback), the coordinator
/// and the two workers, each started again when it dies, as a supervisor would.
struct Run<'a> {
    dir: PathBuf,
    cluster: Option<&'a VirtualCluster>,
    coordinator: Child,
    lines: Receiver<(String, Instant)>,
    /// (line, when it was read), every coordinator line so far.
    seen: Vec<(String, Instant)>,
    workers: Vec<Child>,
    restarts: usize,
    port: u16,
    /// The coordinator's test-only commit delay (see `Fault::commit_delay`).
    delay: Option<(u64, Option<u64>)>,
}

/// The lines of `stream`, each with the moment it was read (printed as they come).
fn stream_timed(stream: impl std::io::Read + Send + 'static) -> Receiver<(String, Instant)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stream)).map_while(Result::ok) {
            println!("{line}");
            if tx.send((line, Instant::now())).is_err() {
                break;
            }
        }
    });
    rx
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

impl<'a> Run<'a> {
    fn start(
        dir: &Path,
        cluster: Option<&'a VirtualCluster>,
        keep: u64,
        delay: Option<(u64, Option<u64>)>,
    ) -> Self {
        std::fs::write(dir.join("job.toml"), job_toml(keep)).expect("job");
        std::fs::write(dir.join("token"), TOKEN).expect("token");
        let port = if cluster.is_some() {
            50051
        } else {
            axial_e2e::free_port()
        };
        let (coordinator, lines) = Self::coordinator(dir, cluster, port, false, delay);
        let mut run = Self {
            dir: dir.to_path_buf(),
            cluster,
            coordinator,
            lines,
            seen: Vec::new(),
            workers: Vec::new(),
            restarts: 0,
            port,
            delay,
        };
        run.wait_for(|l| l.contains("listening on"), Duration::from_secs(30));
        run.workers = (0..2).map(|i| run.worker(i)).collect();
        run
    }

    fn coordinator_host(cluster: Option<&VirtualCluster>) -> String {
        cluster.map_or_else(|| "127.0.0.1".to_owned(), VirtualCluster::coordinator_ip)
    }

    fn coordinator(
        dir: &Path,
        cluster: Option<&VirtualCluster>,
        port: u16,
        resume: bool,
        delay: Option<(u64, Option<u64>)>,
    ) -> (Child, Receiver<(String, Instant)>) {
        let host = Self::coordinator_host(cluster);
        let mut cmd = match cluster {
            Some(c) => c.command("c", bin("axial-coordinator")),
            None => std::process::Command::new(bin("axial-coordinator")),
        };
        cmd.args([
            "serve",
            "--workers",
            "2",
            "--insecure",
            "--heartbeat-timeout",
            "3",
        ])
        .args(["--listen", &format!("{host}:{port}")])
        .args(["--http", &format!("{host}:0"), "--token-file"])
        .arg(dir.join("token"))
        .arg(dir.join("job.toml"))
        .stderr(Stdio::piped());
        if resume {
            cmd.arg("--resume");
        }
        if let Some((ms, step)) = delay {
            cmd.env("AXIAL_TEST_COMMIT_DELAY_MS", ms.to_string());
            if let Some(step) = step {
                cmd.env("AXIAL_TEST_COMMIT_DELAY_STEP", step.to_string());
            }
        }
        let mut child = cmd.spawn().expect("serve");
        let rx = stream_timed(child.stderr.take().expect("stderr"));
        (child, rx)
    }

    fn worker(&self, i: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("w{i}.log")))
            .expect("log");
        let mut cmd = match self.cluster {
            Some(c) => c.command(&format!("w{i}"), bin("axial-worker")),
            None => std::process::Command::new(bin("axial-worker")),
        };
        let url = format!(
            "http://{}:{}",
            Self::coordinator_host(self.cluster),
            self.port
        );
        cmd.args([
            "join",
            "--coordinator",
            &url,
            "--worker-id",
            &format!("w{i}"),
        ])
        .arg("--token-file")
        .arg(self.dir.join("token"))
        .args(["--collective-timeout", "30", "--metrics-listen", ""])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("worker")
    }

    /// Reads coordinator lines (and supervises the workers) until one satisfies `hit`.
    fn wait_for(&mut self, hit: impl Fn(&str) -> bool, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            self.supervise();
            if let Ok((line, at)) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let found = hit(&line);
                self.seen.push((line, at));
                if found {
                    return at;
                }
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} in vain; the coordinator said:\n{}",
                self.seen
                    .iter()
                    .rev()
                    .take(30)
                    .rev()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    /// Like [`Self::wait_for`], but `None` if the coordinator ends first (the job finished).
    fn wait_for_or_end(&mut self, hit: impl Fn(&str) -> bool, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            self.supervise();
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok((line, at)) => {
                    let found = hit(&line);
                    self.seen.push((line, at));
                    if found {
                        return Some(at);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            assert!(Instant::now() < deadline, "waited {limit:?} in vain");
        }
    }

    /// Starts a worker that died (not one that finished) again under its id.
    fn supervise(&mut self) {
        for i in 0..self.workers.len() {
            if let Ok(Some(status)) = self.workers[i].try_wait()
                && !status.success()
                && self.restarts < 4
            {
                self.restarts += 1;
                std::thread::sleep(Duration::from_millis(300));
                self.workers[i] = self.worker(i);
            }
        }
    }

    fn pid(&self, i: usize) -> u32 {
        self.workers[i].id()
    }

    /// The worker that is rank 0 of the newest generation (from the workers' logs).
    fn rank0(&self) -> usize {
        let newest = |i: usize| -> (u64, bool) {
            let log =
                std::fs::read_to_string(self.dir.join(format!("w{i}.log"))).unwrap_or_default();
            log.lines()
                .filter_map(|l| {
                    let rest = l.split(": rank ").nth(1)?;
                    let rank: u64 = rest.split(' ').next()?.parse().ok()?;
                    let g: u64 = rest
                        .split("generation ")
                        .nth(1)?
                        .split(',')
                        .next()?
                        .parse()
                        .ok()?;
                    Some((g, rank == 0))
                })
                .max()
                .unwrap_or((0, false))
        };
        let (a, b) = (newest(0), newest(1));
        if a.0 >= b.0 {
            usize::from(!a.1)
        } else {
            usize::from(b.1)
        }
    }

    /// Restarts the coordinator (killed) on its saved state.
    fn restart_coordinator(&mut self) {
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
        std::thread::sleep(Duration::from_millis(1000));
        let (c, lines) = Run::coordinator(&self.dir, self.cluster, self.port, true, self.delay);
        self.coordinator = c;
        self.lines = lines;
    }

    /// Waits for the coordinator and both workers to end well.
    fn finish(mut self) -> Vec<(String, Instant)> {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            self.supervise();
            while let Ok(seen) = self.lines.try_recv() {
                self.seen.push(seen);
            }
            let coordinator = self.coordinator.try_wait().expect("wait");
            let workers: Vec<_> = self
                .workers
                .iter_mut()
                .map(|w| w.try_wait().expect("wait"))
                .collect();
            if let Some(c) = coordinator
                && workers.iter().all(|w| w.is_some_and(|s| s.success()))
            {
                assert!(c.success(), "the coordinator failed: {c}");
                return self.seen;
            }
            if Instant::now() > deadline {
                let _ = self.coordinator.kill();
                for w in &mut self.workers {
                    let _ = w.kill();
                }
                panic!(
                    "the job did not finish; the coordinator said:\n{}",
                    self.seen
                        .iter()
                        .map(|(l, _)| l.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn committed_step(line: &str) -> Option<u64> {
    line.split("(step ").nth(1)?.split(',').next()?.parse().ok()
}

fn final_files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let folder = dir.join(format!("ckpt/ckpt-{FINAL_STEP:010}"));
    let read = |name: &str| {
        std::fs::read(folder.join(name)).unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
    };
    (read("model.safetensors"), read("optimizer.safetensors"))
}

struct Row {
    trial: usize,
    fault: Fault,
    moment: String,
    detect: Option<f64>,
    recover: Option<f64>,
    outcome: String,
}

/// One trial: the job with `fault` after the commit of step `at`; returns its table row.
#[allow(clippy::too_many_arguments)]
fn trial(
    n: usize,
    fault: Fault,
    at: u64,
    hold: Duration,
    keep: u64,
    cluster: Option<&VirtualCluster>,
    reference: &(Vec<u8>, Vec<u8>),
    dice: &mut Dice,
) -> Row {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // A storage stall slows the commit after the one the fault waits for.
    let mut run = Run::start(dir, cluster, keep, fault.commit_delay(at + 3));
    run.wait_for(
        |l| committed_step(l).is_some_and(|s| s >= at),
        Duration::from_secs(120),
    );
    let victim = dice.below(2) as usize;
    let hit = Instant::now();
    let moment = format!(
        "after step {at}{}{}",
        match fault {
            Fault::StopWorker | Fault::CutLink | Fault::StopRank0 => {
                format!(", {:.0} s", hold.as_secs_f64())
            }
            Fault::StorageStall => format!("; the commit of step {} 11 s", at + 3),
            _ => String::new(),
        },
        if keep == 1 { ", keep 1" } else { "" }
    );
    // The first commit written after `at` (its vote just in).
    let in_commit = |l: &str| {
        l.split("writing the commit of step ")
            .nth(1)
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|s| s > at)
    };
    match fault {
        Fault::KillWorker => signal(run.pid(victim), "-KILL"),
        // It drains the group and leaves, exiting 143; the supervisor starts a replacement,
        // as the Job controller or Slurm's requeue would.
        Fault::TermWorker => signal(run.pid(victim), "-TERM"),
        Fault::StopWorker => {
            signal(run.pid(victim), "-STOP");
            std::thread::sleep(hold);
            signal(run.pid(victim), "-CONT");
        }
        Fault::CutLink => {
            let host = format!("w{victim}");
            let c = cluster.expect("a cluster");
            c.cut(&host);
            std::thread::sleep(hold);
            c.restore(&host);
        }
        Fault::KillCoordinator => run.restart_coordinator(),
        Fault::KillCoordinatorInCommit => {
            // The writer takes 1.5 s: killed before its rename and manifest, or after them
            // and before the committed pointer and the reply.
            if run
                .wait_for_or_end(in_commit, Duration::from_secs(60))
                .is_some()
            {
                std::thread::sleep(Duration::from_millis(dice.below(2000)));
                run.restart_coordinator();
            }
        }
        Fault::KillRank0AfterVote => {
            if run
                .wait_for_or_end(in_commit, Duration::from_secs(60))
                .is_some()
            {
                let rank0 = run.rank0();
                signal(run.pid(rank0), "-KILL");
            }
        }
        Fault::StopRank0 => {
            let rank0 = run.rank0();
            signal(run.pid(rank0), "-STOP");
            std::thread::sleep(hold);
            signal(run.pid(rank0), "-CONT");
        }
        // The commit after step `at` stalls past its vote's deadline.
        Fault::StorageStall => {}
    }
    // Detection: the coordinator names the fault (a lost, failed or restarted member), or,
    // for its own death, its successor forms a group. Recovery: the first commit after the
    // group formed again.
    // (A fault late in the job may meet its end instead: a worker terminated near the last
    // step finishes it, and no group forms again.)
    let formed = run.wait_for_or_end(|l| l.contains("Formed"), Duration::from_secs(120));
    let after_formed = run.seen.len();
    let detected = run.seen[..after_formed]
        .iter()
        .find(|(l, t)| {
            *t >= hit
                && (l.contains("Lost")
                    || l.contains("Failed")
                    || l.contains("Restarted")
                    || l.contains("terminating")
                    || l.contains("Formed"))
        })
        .map(|(_, t)| t.duration_since(hit).as_secs_f64());
    let recovered = match formed {
        Some(formed) => run
            .wait_for_or_end(|l| committed_step(l).is_some(), Duration::from_secs(120))
            .map(|t| t.max(formed)),
        None => None,
    };
    run.finish();
    // The outcome: exactly once, identical replicas, the uninterrupted run's bytes.
    assert_each_sample_once(dir, 2, TRAIN);
    let prints: Vec<String> = (0..2)
        .map(|r| {
            std::fs::read_to_string(dir.join(format!("ckpt/replica-{r}.sha256"))).expect("print")
        })
        .collect();
    assert_eq!(prints[0], prints[1], "trial {n}: replicas differ");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("ckpt/ckpt-{FINAL_STEP:010}/manifest.json")))
            .expect("final manifest"),
    )
    .expect("json");
    assert_eq!(manifest["world"].as_u64(), Some(2), "trial {n}: {manifest}");
    // Every committed checkpoint left is whole.
    for folder in axial_worker::train::checkpoint::list(&dir.join("ckpt")) {
        axial_worker::train::checkpoint::verify(&folder)
            .unwrap_or_else(|e| panic!("trial {n}: {} does not verify: {e}", folder.display()));
    }
    let files = final_files(dir);
    assert!(
        files == *reference,
        "trial {n} ({}, {moment}): the final model or optimizer differs from the uninterrupted run",
        fault.name()
    );
    Row {
        trial: n,
        fault,
        moment,
        detect: detected,
        recover: recovered.map(|t| t.duration_since(hit).as_secs_f64()),
        outcome: if formed.is_some() {
            "finished; exactly once; replicas equal; final files identical".into()
        } else {
            "the job ended first; exactly once; replicas equal; final files identical".into()
        },
    }
}

#[test]
fn chaos_campaign() {
    let trials: usize = std::env::var("AXIAL_CHAOS_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("AXIAL_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    println!("chaos campaign: {trials} trials, AXIAL_CHAOS_SEED={seed}");
    let cluster = VirtualCluster::up(2);
    let mut faults = vec![
        Fault::KillWorker,
        Fault::KillCoordinator,
        Fault::StopWorker,
        Fault::TermWorker,
        Fault::KillCoordinatorInCommit,
        Fault::KillRank0AfterVote,
        Fault::StopRank0,
        Fault::StorageStall,
    ];
    if cluster.is_some() {
        faults.push(Fault::CutLink);
    } else {
        println!("(no virtual cluster: everything on loopback, no link faults)");
    }
    // The uninterrupted run.
    let tmp = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    Run::start(tmp.path(), cluster.as_ref(), 3, None).finish();
    let reference = final_files(tmp.path());
    println!("uninterrupted run: {:.1} s", start.elapsed().as_secs_f64());
    let mut dice = Dice(seed);
    let mut order = faults.clone();
    let mut rows = Vec::new();
    for n in 1..=trials {
        // Every fault once before any twice, in a random order.
        if order.is_empty() {
            order = faults.clone();
        }
        let fault = order.remove(dice.below(order.len() as u64) as usize);
        let at = 3 * (1 + dice.below(7)); // a commit at step 3 .. 21
        let hold = Duration::from_secs(4 + dice.below(9)); // 4 .. 12 s
        let keep = if dice.below(3) == 0 { 1 } else { 3 };
        let row = trial(
            n,
            fault,
            at,
            hold,
            keep,
            cluster.as_ref(),
            &reference,
            &mut dice,
        );
        println!(
            "trial {n}: {} {}: detected {:?} s, first commit after recovery {:?} s",
            fault.name(),
            row.moment,
            row.detect.map(|d| (d * 10.0).round() / 10.0),
            row.recover.map(|d| (d * 10.0).round() / 10.0)
        );
        rows.push(row);
    }
    println!(
        "\n| trial | fault | moment | detected after | first commit after recovery | outcome |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let s = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} s"));
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.trial,
            r.fault.name(),
            r.moment,
            s(r.detect),
            s(r.recover),
            r.outcome
        );
    }
    println!("\n{} of {trials} trials passed", rows.len());
}
