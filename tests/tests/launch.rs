//! `axial-coordinator launch`: a coordinator and two worker processes train a job together;
//! the replicas end bit-identical, every checkpoint is committed by the coordinator after both
//! ranks voted, and a worker with a wrong token is refused.

use std::path::Path;
use std::process::Command;

use axial_e2e::{bin, run};

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
    // The orphaned workers fail at their next heartbeat or collective.
    std::thread::sleep(std::time::Duration::from_secs(4));
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
    }
}
