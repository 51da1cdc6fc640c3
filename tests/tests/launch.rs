//! `axial-coordinator launch`: a coordinator and two worker processes train a job together;
//! the replicas end bit-identical, every checkpoint is committed by the coordinator after both
//! ranks voted, and a worker with a wrong token is refused.

use std::path::Path;
use std::process::Command;

use axial_e2e::{
    assert_each_sample_once, bin, free_port, pids_with, run, stream_lines, until, wait_ok,
};

const JOB: &str = r#"
[model]
variant = "official"
layers = [1, 1, 1, 1]
width = 0.125
num_classes = 10
[data]
format = "builtin"
train = 200
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
"#;

fn launch(dir: &Path, workers: usize, extra: &[&str]) -> std::process::Output {
    std::fs::write(dir.join("job.toml"), JOB).expect("write");
    run(Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", &workers.to_string()])
        .arg("--worker-bin")
        .arg(bin("axial-worker"))
        .arg(dir.join("job.toml"))
        .args(extra))
}

#[test]
fn two_workers_train_with_identical_replicas() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = launch(tmp.path(), 2, &[]);
    assert!(out.status.success(), "launch failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[w0]") && stderr.contains("[w1]"),
        "log lines are prefixed by worker"
    );
    let ckpt = tmp.path().join("ckpt");
    let a = std::fs::read_to_string(ckpt.join("replica-0.sha256")).expect("rank 0 fingerprint");
    let b = std::fs::read_to_string(ckpt.join("replica-1.sha256")).expect("rank 1 fingerprint");
    assert_eq!(a.len(), 64);
    assert_eq!(a, b, "replicas differ at the end of training");
    // The final checkpoint was committed for both ranks; 13 steps of 16 per epoch (the last 8).
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("ckpt-0000000026/manifest.json"))
            .expect("final manifest"),
    )
    .expect("json");
    assert_eq!(manifest["world"].as_u64(), Some(2));
    assert_eq!(manifest["position"]["samples_seen"].as_u64(), Some(400));
    assert!(stderr.contains("committed"), "{stderr}");
}

#[test]
fn a_worker_with_a_wrong_token_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("job.toml"), JOB).expect("write");
    std::fs::write(tmp.path().join("token"), "the-right-token").expect("write");
    std::fs::write(tmp.path().join("wrong"), "not-the-token").expect("write");
    let mut server = Command::new(bin("axial-coordinator"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--token-file",
        ])
        .arg(tmp.path().join("token"))
        .arg(tmp.path().join("job.toml"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let stderr = server.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let addr = loop {
        let line = lines.next().expect("coordinator output").expect("line");
        if let Some(a) = line.strip_prefix("coordinator: listening on ") {
            break a.trim().to_owned();
        }
    };
    let out = run(Command::new(bin("axial-worker"))
        .args([
            "join",
            "--coordinator",
            &format!("http://{addr}"),
            "--worker-id",
            "intruder",
            "--token-file",
        ])
        .arg(tmp.path().join("wrong")));
    let _ = server.kill();
    let _ = server.wait();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("unauthenticated") && err.contains("wrong job token"),
        "{err}"
    );
    let logged: Vec<String> = lines
        .map_while(Result::ok)
        .take_while(|l| !l.is_empty())
        .take(5)
        .collect();
    assert!(
        logged.iter().any(|l| l.contains("refused")),
        "the refusal is logged: {logged:?}"
    );
}

/// Starts a launch, waits until the coordinator has committed the checkpoint at `step`, then
/// kills the launcher (the job stops mid-epoch; its workers lose the coordinator and exit).
fn launch_and_kill_after(dir: &Path, workers: usize, step: u64) {
    std::fs::write(dir.join("job.toml"), JOB).expect("write");
    let mut child = Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", &workers.to_string()])
        .arg("--worker-bin")
        .arg(bin("axial-worker"))
        .arg(dir.join("job.toml"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("launch");
    let stderr = child.stderr.take().expect("stderr");
    let needle = format!("ckpt-{step:010} (step {step},");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
        if line.contains(&needle) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // The orphaned workers lose the coordinator at their next heartbeat or collective and give
    // up after `--wait-coordinator 5`.
    std::thread::sleep(std::time::Duration::from_secs(7));
}

fn final_manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("ckpt/ckpt-0000000026/manifest.json"))
        .or_else(|_| {
            // Another world size cuts the epochs into other steps: take the newest.
            let mut v: Vec<_> = std::fs::read_dir(dir.join("ckpt"))
                .expect("ckpt")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("manifest.json").exists())
                .collect();
            v.sort();
            std::fs::read_to_string(v.pop().expect("a checkpoint").join("manifest.json"))
        })
        .expect("manifest");
    serde_json::from_str(&text).expect("json")
}

/// The whole job is stopped mid-epoch and resumed on another number of workers (2 -> 1 and
/// 1 -> 2): the committed ledger continues exactly, so the job ends having consumed every
/// sample of both epochs once (2 x 200) and no more.
#[test]
fn stopped_job_resumes_on_another_number_of_workers() {
    for (first, second) in [(2usize, 1usize), (1, 2)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        launch_and_kill_after(tmp.path(), first, 10);
        let out = launch(tmp.path(), second, &["--resume"]);
        assert!(
            out.status.success(),
            "{first} -> {second}: resumed launch failed"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("resuming from"),
            "{first} -> {second}: {stderr}"
        );
        let m = final_manifest(tmp.path());
        println!("{first} -> {second}: final position {}", m["position"]);
        assert_eq!(m["world"].as_u64(), Some(second as u64));
        assert_eq!(
            m["position"]["epoch"].as_u64(),
            Some(2),
            "{first} -> {second}"
        );
        assert_eq!(m["position"]["consumed"].as_u64(), Some(0));
        assert_eq!(
            m["position"]["samples_seen"].as_u64(),
            Some(400),
            "{first} -> {second}: every sample once per epoch"
        );
        assert_each_sample_once(tmp.path(), 2, 200);
    }
}

/// The job of the fault tests: like `JOB`, with 400 samples per epoch (25 steps of 16).
fn long_job() -> String {
    JOB.replace("train = 200", "train = 400")
}

/// `axial-coordinator serve` on `port`; its stderr lines come through the returned channel.
fn serve(
    dir: &Path,
    port: u16,
    resume: bool,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new(bin("axial-coordinator"));
    cmd.args(["serve", "--workers", "2", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--http", "127.0.0.1:0", "--token-file"])
        .arg(dir.join("token"))
        .arg(dir.join("job.toml"))
        .stderr(std::process::Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    let mut child = cmd.spawn().expect("serve");
    let rx = stream_lines(child.stderr.take().expect("stderr"));
    (child, rx)
}

fn assert_finished_exactly_once(dir: &Path, world: u64) {
    assert_each_sample_once(dir, 2, 400);
    let m = final_manifest(dir);
    println!("final position {} (world {})", m["position"], m["world"]);
    assert_eq!(m["world"].as_u64(), Some(world));
    assert_eq!(m["position"]["epoch"].as_u64(), Some(2));
    assert_eq!(m["position"]["consumed"].as_u64(), Some(0));
    assert_eq!(
        m["position"]["samples_seen"].as_u64(),
        Some(800),
        "every sample once per epoch, none twice"
    );
}

/// The coordinator of a served job is killed mid-run (after it committed step 10) while its two
/// workers keep running. Started again with `--resume` on the same address, it goes on from its
/// saved generation; the workers, which lost it, drop their group, wait for it, join again and
/// resume from the last committed checkpoint; the job finishes with every sample consumed once
/// per epoch, and the replicas end bit-identical.
#[test]
fn coordinator_killed_mid_run_comes_back_and_the_job_finishes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let (mut first, lines) = serve(dir, port, false);
    until(&lines, "listening on");
    let mut workers: Vec<std::process::Child> = (0..2).map(|i| join(dir, port, i)).collect();
    until(&lines, "(step 10,");
    first.kill().expect("kill the coordinator");
    let _ = first.wait();
    let killed_at = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (mut second, lines) = serve(dir, port, true);
    let seen = until(&lines, "Formed");
    println!(
        "group re-formed {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(
        seen.iter().any(|l| l.contains("restarted on saved state")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l.contains("resuming from")),
        "{seen:#?}"
    );
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("worker w{i}"));
    }
    wait_ok(&mut second, "the restarted coordinator");
    for i in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("w{i}.log"))).expect("log");
        assert!(log.contains("joining again"), "w{i}:\n{log}");
    }
    assert_finished_exactly_once(dir, 2);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("ckpt/coordinator.json")).expect("coordinator.json"),
    )
    .expect("json");
    assert_eq!(state["restarts"].as_u64(), Some(1));
    assert!(state["generation"].as_u64() >= Some(2));
    let a = std::fs::read_to_string(dir.join("ckpt/replica-0.sha256")).expect("rank 0");
    let b = std::fs::read_to_string(dir.join("ckpt/replica-1.sha256")).expect("rank 1");
    assert_eq!(a, b, "replicas differ");
}

/// SIGTERM to the coordinator while the group trains (a scheduler stopping the whole job):
/// it serves on, the group checkpoints after a step every rank reaches only after hearing of
/// it, the workers leave as terminated (143), and the coordinator exits once they have left.
/// Nothing since the previous checkpoint is lost: started again with --resume, the job goes on
/// from the drain's checkpoint and ends with every sample once. (Before, the coordinator left
/// at once and the workers lost their progress since the last checkpoint.)
#[test]
fn a_terminated_coordinator_drains_the_group_before_it_leaves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // Long enough to be stopped mid-way (150 steps an epoch), checkpoints far apart (every
    // 100 steps): the drain's is the one after SIGTERM.
    std::fs::write(
        dir.join("job.toml"),
        JOB.replace("train = 200", "train = 2400")
            .replace("every_steps = 5", "every_steps = 100"),
    )
    .expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let (mut first, lines) = serve(dir, port, false);
    until(&lines, "listening on");
    let mut workers: Vec<std::process::Child> = (0..2).map(|i| join(dir, port, i)).collect();
    until(&lines, "Formed");
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY of the test: a signal to our own child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(first.id() as libc::pid_t, libc::SIGTERM);
    }
    let seen = until(&lines, "every worker has left");
    assert!(
        seen.iter()
            .any(|l| l.contains("the group checkpoints after step")),
        "{seen:#?}"
    );
    let status = first.wait().expect("the coordinator");
    assert!(
        !status.success(),
        "exits non-zero: a supervisor starts it again"
    );
    for (i, w) in workers.iter_mut().enumerate() {
        let status = w.wait().expect("worker");
        assert_eq!(status.code(), Some(143), "w{i} leaves as terminated");
    }
    let drained = final_manifest(dir);
    let step = drained["position"]["step"].as_u64().expect("step");
    println!("drained to the checkpoint at step {step}");
    assert!(
        step > 0 && !step.is_multiple_of(100) && step < 300,
        "the drain's own checkpoint, mid-run ({step})"
    );
    // Started again, the job goes on from there and finishes.
    let (mut second, lines) = serve(dir, port, true);
    let mut workers: Vec<std::process::Child> = (0..2).map(|i| join(dir, port, i)).collect();
    let seen = until(&lines, "Formed");
    assert!(
        seen.iter()
            .any(|l| l.contains("resuming from") && l.contains(&format!("step {step}"))),
        "{seen:#?}"
    );
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("worker w{i}"));
    }
    wait_ok(&mut second, "the restarted coordinator");
    assert_each_sample_once(dir, 2, 2400);
    assert_eq!(
        final_manifest(dir)["position"]["samples_seen"].as_u64(),
        Some(4800)
    );
}

/// A worker waits at most --join-timeout for a group to form (here the coordinator waits for
/// 2 workers and only one comes), then exits with an error saying so: a half-scheduled job does
/// not hold its GPUs for ever. (Before, it waited for ever.)
#[test]
fn a_worker_gives_up_when_no_group_forms_within_the_join_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let (mut coordinator, lines) = serve(dir, port, false);
    until(&lines, "listening on");
    let started = std::time::Instant::now();
    let out = run(Command::new(bin("axial-worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args([
            "--worker-id",
            "alone",
            "--join-timeout",
            "3",
            "--token-file",
        ])
        .arg(dir.join("token")));
    let took = started.elapsed().as_secs_f64();
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no group formed within 3 s"), "{stderr}");
    assert!(took < 20.0, "gave up after {took:.1} s");
}

/// `axial-worker join` as `w<i>` to the coordinator on `port`, appending to `w<i>.log`.
fn join(dir: &Path, port: u16, i: usize) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("w{i}.log")))
        .expect("log");
    Command::new(bin("axial-worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--worker-id", &format!("w{i}"), "--token-file"])
        .arg(dir.join("token"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("worker")
}

/// SIGTERM to a worker (a preempted pod, a time limit): the group checkpoints after a step
/// every rank reaches only after hearing of it, waits for the commit, and the worker leaves
/// and exits with 143, saying so; its replacement (same id) joins, and the job resumes from that
/// checkpoint, nothing lost, every sample once per epoch.
#[test]
fn a_terminated_worker_leaves_after_a_group_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let (mut coordinator, lines) = serve(dir, port, false);
    until(&lines, "listening on");
    let mut workers: Vec<std::process::Child> = (0..2).map(|i| join(dir, port, i)).collect();
    until(&lines, "(step 5,");
    let pid = workers[1].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let seen = until(&lines, "is terminating");
    let step: u64 = seen
        .last()
        .and_then(|l| l.split("after step ").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the drain step");
    until(&lines, &format!("(step {step},"));
    let status = workers[1].wait().expect("wait");
    let log = std::fs::read_to_string(dir.join("w1.log")).expect("log");
    // As a terminated process exits: a supervisor replaces it.
    assert_eq!(status.code(), Some(143), "w1 exited with {status}:\n{log}");
    assert!(
        log.contains(&format!(
            "terminated (SIGTERM) after the group's checkpoint at step {step}"
        )),
        "{log}"
    );
    // The replacement, as Kubernetes or Slurm would start it.
    workers[1] = join(dir, port, 1);
    for (i, w) in workers.iter_mut().enumerate() {
        wait_ok(w, &format!("worker w{i}"));
    }
    wait_ok(&mut coordinator, "the coordinator");
    let log = std::fs::read_to_string(dir.join("w0.log")).expect("log");
    assert!(
        log.contains(&format!("ckpt-{step:010}")),
        "w0 resumed from the drain checkpoint:\n{log}"
    );
    assert_finished_exactly_once(dir, 2);
}

/// The process id of worker `id` of the launch in `dir` (found by its token file's path).
fn launched_worker_pid(dir: &Path, id: &str) -> String {
    let token = dir.join("ckpt/.job-token").display().to_string();
    let pids = pids_with(&["join", &token, id]);
    assert_eq!(pids.len(), 1, "{id}'s process: {pids:?}");
    pids[0].to_string()
}

/// `launch --workers 2 EXTRA dir/job.toml`; its stderr lines come through the channel (and are
/// printed).
fn launch_streaming(
    dir: &Path,
    extra: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", "2"])
        .args(extra)
        .arg("--worker-bin")
        .arg(bin("axial-worker"))
        .arg(dir.join("job.toml"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("launch");
    let lines = stream_lines(child.stderr.take().expect("stderr"));
    (child, lines)
}

/// A launch of 2 workers with `--min-workers 1` loses one (killed with SIGKILL after step 5 is
/// committed): the survivor's collective fails, it reports the generation to the coordinator,
/// which ends it at once; the group re-forms with the survivor alone, resumes from the last
/// checkpoint, and the job ends with every sample consumed once per epoch.
#[test]
fn a_lost_worker_and_the_group_reforms_without_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    let (mut child, lines) = launch_streaming(dir, &["--min-workers", "1"]);
    until(&lines, "(step 5,");
    let victim = launched_worker_pid(dir, "w1");
    let killed_at = std::time::Instant::now();
    run(Command::new("kill").args(["-9", &victim]));
    let seen = until(&lines, "Formed");
    println!(
        "group re-formed {:.2} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(seen.iter().any(|l| l.contains("Failed")), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("going on with 1 worker")),
        "{seen:#?}"
    );
    wait_ok(&mut child, "the launch");
    assert_finished_exactly_once(dir, 1);
}

/// An operator changes the learning rate and weight decay of a running 2-worker launch with
/// `axial-coordinator set` (a wrong token is refused): both ranks apply the change at the step
/// the coordinator chose, the learning rate drops from then on, the final manifest records the
/// change, and the replicas end bit-identical.
#[test]
fn hyperparameters_change_at_the_same_step_on_every_rank() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    let (mut child, lines) = launch_streaming(dir, &[]);
    let seen = until(&lines, "listening on");
    let addr = seen
        .last()
        .and_then(|l| l.split("listening on ").nth(1))
        .expect("address")
        .trim()
        .to_owned();
    until(&lines, "(step 5,");
    std::fs::write(dir.join("wrong"), "not-the-token").expect("write");
    let set = |token: &Path| {
        run(Command::new(bin("axial-coordinator"))
            .args([
                "set",
                "--coordinator",
                &format!("http://{addr}"),
                "--token-file",
            ])
            .arg(token)
            .args(["--lr", "0.001", "--weight-decay", "0"]))
    };
    let refused = set(&dir.join("wrong"));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    let out = set(&dir.join("ckpt/.job-token"));
    assert!(out.status.success(), "set failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let from_step: u64 = text
        .split("from step ")
        .nth(1)
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no step in {text:?}"));
    assert!(text.contains("lr=0.001 weight_decay=0"), "{text}");
    let mut rest = Vec::new();
    while let Ok(l) = lines.recv_timeout(std::time::Duration::from_secs(120)) {
        rest.push(l);
    }
    wait_ok(&mut child, "the launch");
    let needle =
        format!("applying hyperparameter change #1 lr=0.001 weight_decay=0 from step {from_step}");
    for w in ["[w0]", "[w1]"] {
        assert!(
            rest.iter().any(|l| l.starts_with(w) && l.contains(&needle)),
            "{w} did not apply the change at step {from_step}"
        );
    }
    // The logged learning rate after the change is about 100 times lower (0.1 -> 0.001).
    let lr_at = |l: &String| -> Option<(u64, f64)> {
        let step = l
            .split("step ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let lr = l
            .split(" lr ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some((step, lr))
    };
    let lrs: Vec<(u64, f64)> = rest
        .iter()
        .filter(|l| l.starts_with("[w0] step "))
        .filter_map(lr_at)
        .collect();
    println!("change from step {from_step}; logged (step, lr): {lrs:?}");
    assert!(
        lrs.iter().any(|&(s, lr)| s > from_step && lr < 1e-4),
        "{lrs:?}"
    );
    let m = final_manifest(dir);
    assert_eq!(m["changes"][0]["from_step"].as_u64(), Some(from_step));
    assert_eq!(m["changes"][0]["lr"].as_f64(), Some(0.001));
    let a = std::fs::read_to_string(dir.join("ckpt/replica-0.sha256")).expect("rank 0");
    let b = std::fs::read_to_string(dir.join("ckpt/replica-1.sha256")).expect("rank 1");
    assert_eq!(a, b, "replicas differ");
}

/// A worker hangs (SIGSTOP, after step 5 is committed): its peer blocks in a collective that
/// would wait 120 s for it. The hung worker's liveness heartbeats stop, the coordinator declares
/// it lost after `--heartbeat-timeout` (10 s), ends the generation, the survivor's liveness
/// thread aborts the blocked collective, and the group re-forms without the hung worker and
/// finishes the job, every sample once per epoch: hang detection in seconds, not minutes.
#[test]
fn a_hung_worker_is_detected_in_seconds_and_the_group_reforms() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    let (mut child, lines) = launch_streaming(dir, &["--min-workers", "1"]);
    until(&lines, "(step 5,");
    let victim = launched_worker_pid(dir, "w1");
    let stopped_at = std::time::Instant::now();
    run(Command::new("kill").args(["-STOP", &victim]));
    let seen = until(&lines, "Formed");
    let took = stopped_at.elapsed().as_secs_f64();
    println!("hung worker detected and group re-formed {took:.1} s after SIGSTOP");
    // The hung process is of no more use: end it (the launch goes on with 1 worker).
    run(Command::new("kill").args(["-KILL", &victim]));
    assert!(
        seen.iter().any(|l| l.contains("Lost") && l.contains("w1")),
        "{seen:#?}"
    );
    assert!(took < 30.0, "took {took:.1} s");
    wait_ok(&mut child, "the launch");
    assert_finished_exactly_once(dir, 1);
}

/// Makes a CA, a server certificate for localhost/127.0.0.1 and a client certificate, with the
/// openssl command line (PEM files in `dir`).
fn make_certs(dir: &Path) {
    let sh = |script: &str| {
        let out = run(Command::new("sh").arg("-c").arg(script).current_dir(dir));
        assert!(out.status.success(), "openssl failed: {script}");
    };
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj '/CN=axial test CA'",
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write");
        sh(&format!(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {name}.key -out {name}.csr -subj '/CN={name}' && \
             openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 -extfile {name}.ext"
        ));
    }
}

/// The control plane over mutual TLS: a coordinator served with a certificate and a client CA
/// refuses a plain-text worker and a TLS worker without a client certificate, serves its HTTP
/// endpoints over HTTPS with the same certificate (not in clear text), and a worker with a
/// client certificate trains the job to its end.
#[test]
fn mutual_tls_control_plane() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    make_certs(dir);
    std::fs::write(dir.join("job.toml"), JOB).expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let http_port = free_port();
    let mut server = Command::new(bin("axial-coordinator"))
        .args(["serve", "--workers", "1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--http", &format!("127.0.0.1:{http_port}"), "--token-file"])
        .arg(dir.join("token"))
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .arg("--tls-client-ca")
        .arg(dir.join("ca.pem"))
        .arg(dir.join("job.toml"))
        .spawn()
        .expect("serve");
    let worker = |url: &str, tls: &[&str]| {
        let mut cmd = Command::new(bin("axial-worker"));
        cmd.args(["join", "--coordinator", url, "--worker-id", "w0"])
            .args(["--wait-coordinator", "3", "--token-file"])
            .arg(dir.join("token"));
        for a in tls {
            if a.starts_with("--") {
                cmd.arg(a);
            } else {
                cmd.arg(dir.join(a));
            }
        }
        run(&mut cmd)
    };
    let plain = worker(&format!("http://127.0.0.1:{port}"), &[]);
    assert!(!plain.status.success(), "a plain-text worker got through");
    // The HTTP endpoints are served over TLS with the same certificate.
    let curl = |url: String| {
        run(Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(dir.join("ca.pem"))
            .arg(url))
    };
    let status = curl(format!("https://127.0.0.1:{http_port}/api/status"));
    assert!(
        status.status.success()
            && String::from_utf8_lossy(&status.stdout).contains("\"generation\""),
        "no status over HTTPS"
    );
    let clear = curl(format!("http://127.0.0.1:{http_port}/api/status"));
    assert!(
        !String::from_utf8_lossy(&clear.stdout).contains("\"generation\""),
        "the status page answered in clear text"
    );
    let https = format!("https://127.0.0.1:{port}");
    let anonymous = worker(&https, &["--tls-ca", "ca.pem"]);
    assert!(
        !anonymous.status.success(),
        "a worker without a client certificate got through"
    );
    let good = worker(
        &https,
        &[
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "client.pem",
            "--tls-key",
            "client.key",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = server.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            panic!("the coordinator did not finish");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        good.status.success(),
        "the worker with a client certificate failed"
    );
    assert!(status.success());
    let m = final_manifest(dir);
    assert_eq!(m["position"]["samples_seen"].as_u64(), Some(400));
}

/// `launch --max-restarts 1`: a worker killed mid-run (SIGKILL after step 5 is committed) is
/// started again under its id; the group re-forms with both workers, resumes from the last
/// checkpoint, and the job ends on 2 workers with every sample consumed once per epoch.
#[test]
fn a_crashed_worker_is_restarted_and_rejoins() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    let (mut child, lines) = launch_streaming(dir, &["--max-restarts", "1"]);
    until(&lines, "(step 5,");
    run(Command::new("kill").args(["-9", &launched_worker_pid(dir, "w1")]));
    let seen = until(&lines, "world: 2");
    assert!(
        seen.iter()
            .any(|l| l.contains("starting it again (restart 1 of 1)")),
        "{seen:#?}"
    );
    wait_ok(&mut child, "the launch");
    assert_finished_exactly_once(dir, 2);
}

/// `join --local-ranks 2`: one process on a machine runs two ranks (one per device; here both
/// on the CPU), each with its own worker id and metrics port; a served job of two workers forms
/// from that one command, trains to the end with identical replicas, and both processes exit 0.
#[test]
fn one_join_with_local_ranks_runs_a_rank_per_device() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let (mut coordinator, lines) = serve(dir, port, false);
    until(&lines, "listening on");
    let mut node = Command::new(bin("axial-worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .arg("--token-file")
        .arg(dir.join("token"))
        .args([
            "--worker-id",
            "node",
            "--local-ranks",
            "2",
            "--device",
            "cpu",
        ])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .spawn()
        .expect("join");
    let seen = until(&lines, "Formed");
    assert!(
        seen.last().is_some_and(|l| l.contains("world: 2")),
        "{seen:#?}"
    );
    wait_ok(&mut node, "join --local-ranks 2");
    wait_ok(&mut coordinator, "the coordinator");
    let m = final_manifest(dir);
    assert_eq!(m["world"].as_u64(), Some(2));
    assert_eq!(m["position"]["samples_seen"].as_u64(), Some(800));
    let a = std::fs::read_to_string(dir.join("ckpt/replica-0.sha256")).expect("rank 0");
    let b = std::fs::read_to_string(dir.join("ckpt/replica-1.sha256")).expect("rank 1");
    assert_eq!(a, b, "replicas differ");
}

/// `join --local-ranks 2` with one local rank hit by `fault` once the group has committed a
/// checkpoint; `extra` flags for the node. Returns the node's exit status, its stderr and the
/// run's folder (the coordinator is stopped).
fn local_rank_fault(
    name: &str,
    fault: libc::c_int,
    extra: &[&str],
) -> (std::process::ExitStatus, String, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), long_job()).expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let (mut coordinator, lines) = serve(dir, port, false);
    until(&lines, "listening on");
    let mut node = Command::new(bin("axial-worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(["--worker-id", name, "--local-ranks", "2", "--device", "cpu"])
        .args(["--metrics-listen", ""])
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("join");
    let node_lines = stream_lines(node.stderr.take().expect("stderr"));
    until(&lines, "committed");
    let rank1 = format!("{name}-1");
    let pids = pids_with(&["--worker-id", &rank1]);
    assert_eq!(pids.len(), 1, "local rank 1: {pids:?}");
    // SAFETY of the test: a signal to our own grandchild.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pids[0] as libc::pid_t, fault);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(150);
    let status = loop {
        if let Some(status) = node.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = node.kill();
            let _ = coordinator.kill();
            panic!("the node never ended (a survivor waits alone for its sibling)");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let text: Vec<String> = node_lines.try_iter().collect();
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    (status, text.join("\n"), tmp)
}

/// A local rank that crashes is started again under its id: the group re-forms and the job
/// ends with every sample once and identical replicas. (Before, the parent recorded the
/// failure and waited, the survivor re-joined alone, and the node hung for ever.)
#[test]
fn a_crashed_local_rank_is_started_again_and_the_job_finishes() {
    let (status, stderr, tmp) = local_rank_fault("crashed", libc::SIGKILL, &[]);
    assert!(status.success(), "the node failed: {status}\n{stderr}");
    assert!(stderr.contains("starting it again"), "{stderr}");
    let m = final_manifest(tmp.path());
    assert_eq!(m["position"]["samples_seen"].as_u64(), Some(800));
    assert_each_sample_once(tmp.path(), 2, 400);
    let a = std::fs::read_to_string(tmp.path().join("ckpt/replica-0.sha256")).expect("rank 0");
    let b = std::fs::read_to_string(tmp.path().join("ckpt/replica-1.sha256")).expect("rank 1");
    assert_eq!(a, b, "replicas differ");
}

/// A local rank that hangs (SIGSTOP: every thread stopped, no exit) falls silent on its
/// liveness pipe: the parent kills it after --hang-timeout and starts it again.
#[test]
fn a_hung_local_rank_is_killed_and_started_again() {
    let (status, stderr, tmp) = local_rank_fault("hung", libc::SIGSTOP, &["--hang-timeout", "4"]);
    assert!(status.success(), "the node failed: {status}\n{stderr}");
    assert!(stderr.contains("was silent for 4 s"), "{stderr}");
    assert_each_sample_once(tmp.path(), 2, 400);
}

/// Past --max-restarts the node's processes end together and the parent exits non-zero,
/// naming the rank, so that the scheduler restarts the pod.
#[test]
fn a_local_rank_past_its_restarts_ends_the_node() {
    let (status, stderr, _tmp) =
        local_rank_fault("doomed", libc::SIGKILL, &["--max-restarts", "0"]);
    assert!(!status.success());
    assert!(stderr.contains("local rank 1"), "{stderr}");
    assert!(
        pids_with(&["--worker-id", "doomed-0"]).is_empty(),
        "the sibling outlived the node"
    );
}

/// Training heartbeats far apart (here only the last step reports, after more than the
/// coordinator's keepalive allows an idle connection: 3 s interval + 5 s timeout): the
/// worker's connection is kept alive between its calls, and the job finishes in its first
/// generation. (On a runtime that drove the connection only during calls, every generation
/// ended at its first report with "transport error".)
#[test]
fn reports_far_apart_keep_the_connection_and_the_generation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = JOB
        .replace("train = 200", "train = 1280")
        .replace("image_size = 32", "image_size = 96")
        .replace("epochs = 2", "epochs = 1")
        .replace("log_every = 4", "log_every = 1000")
        .replace("every_steps = 5", "every_steps = 0");
    std::fs::write(tmp.path().join("job.toml"), job).expect("write");
    let started = std::time::Instant::now();
    let log = tmp.path().join("launch.log");
    let mut child = Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", "2"])
        .arg("--worker-bin")
        .arg(bin("axial-worker"))
        .arg(tmp.path().join("job.toml"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("launch");
    // Without the fix the generations end one after another, for ever: bounded here.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > std::time::Duration::from_secs(150) {
            let _ = child.kill();
            let _ = child.wait();
            for pid in pids_with(&[&tmp.path().display().to_string()]) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let seconds = started.elapsed().as_secs_f64();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !stderr.contains("joining again"),
        "a generation ended:\n{stderr}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "launch failed or did not end in 150 s:\n{stderr}"
    );
    assert!(
        seconds > 10.0,
        "the run took {seconds:.1} s: too short to leave the connection idle past the keepalive"
    );
}

/// A CPU quota of `percent` of a core for the processes put in it (a cgroup: v1 `cpu` or v2
/// `cpu.max`), removed on drop; none where cgroups cannot be made (not root).
struct Quota(std::path::PathBuf);

impl Quota {
    fn new(percent: u64) -> Result<Self, String> {
        let name = format!("axial-e2e-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let (dir, files) =
            if v1.is_dir() && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                let d = v1.join(&name);
                let files = vec![
                    ("cpu.cfs_period_us", "100000".to_string()),
                    ("cpu.cfs_quota_us", (percent * 1000).to_string()),
                ];
                (d, files)
            } else {
                let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu");
                let d = Path::new("/sys/fs/cgroup").join(&name);
                (d, vec![("cpu.max", format!("{} 100000", percent * 1000))])
            };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let quota = Quota(dir);
        for (f, v) in files {
            std::fs::write(quota.0.join(f), v).map_err(|e| format!("{f}: {e}"))?;
        }
        Ok(quota)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("into the cgroup");
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `[train] rebalance`: one of two workers held to a quarter of a core. The coordinator
/// measures both ranks' own work per step, splits the global batch by speed (the slow rank
/// gets less) for a step both hear of first, and both plan the rest of the epoch again; the
/// job finishes with every sample once per epoch and the replicas bit-identical.
#[test]
fn a_straggler_gets_less_of_the_batch_and_every_sample_is_seen_once() {
    let quota = match Quota::new(25) {
        Ok(q) => q,
        Err(e) => {
            println!("skipped: no CPU quota for the straggler ({e})");
            return;
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let job = long_job().replace(
        "log_every = 4",
        "log_every = 2\nsync_bn = \"all\"\nrebalance = true",
    );
    std::fs::write(dir.join("job.toml"), job).expect("write");
    std::fs::write(dir.join("token"), "a-test-token-of-enough-length").expect("write");
    let port = free_port();
    let (mut coordinator, lines) = serve(dir, port, false);
    until(&lines, "listening on");
    let fast = join(dir, port, 0);
    let slow = join(dir, port, 1);
    quota.add(slow.id());
    let split = until(&lines, "the batch split by speed");
    let decided = split.last().expect("a line").clone();
    println!("{decided}");
    for (i, mut w) in [fast, slow].into_iter().enumerate() {
        wait_ok(&mut w, &format!("worker w{i}"));
    }
    wait_ok(&mut coordinator, "the coordinator");
    // Rank 0 says where the split applies; the shares are for [w0's rank, w1's rank].
    let logs: String = (0..2)
        .map(|i| std::fs::read_to_string(dir.join(format!("w{i}.log"))).expect("log"))
        .collect();
    assert!(logs.contains("the batch split by speed"), "{logs}");
    let shares: Vec<u64> = decided
        .split('[')
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("shares")
        .split(", ")
        .map(|v| v.parse().expect("share"))
        .collect();
    assert_eq!(shares.iter().sum::<u64>(), 16, "{decided}");
    assert_ne!(shares, [8, 8], "{decided}");
    assert_finished_exactly_once(dir, 2);
    let a = std::fs::read_to_string(dir.join("ckpt/replica-0.sha256")).expect("rank 0");
    let b = std::fs::read_to_string(dir.join("ckpt/replica-1.sha256")).expect("rank 1");
    assert_eq!(a, b, "replicas differ");
}
