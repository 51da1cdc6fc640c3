//! A real Prometheus (Debian's `prometheus`) scrapes a running `launch`: the coordinator and
//! both workers, found through the target file `launch --prometheus-targets` writes and the
//! file-discovery section of the shipped `deploy/prometheus/prometheus.yml` (its Kubernetes
//! section cut, since Debian's build has no Kubernetes discovery), with the shipped alert rules
//! loaded. The test asks Prometheus, over its HTTP API, for the step counters, the losses and
//! the coordinator's view, and after the end for `axial_coordinator_job_finished`.
//!
//! Skips, saying why, when `prometheus` is not installed (scripts/test.sh installs it).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axial_e2e::{
    bin, free_port, free_port_pair, http_get, program, repo_root, stream_lines, url_encode,
};

const JOB: &str = r#"
[model]
variant = "official"
layers = [1, 1, 1, 1]
width = 0.125
num_classes = 10
[data]
format = "builtin"
train = 6400
val = 48
image_size = 32
loader_threads = 1
[train]
epochs = 2
batch_size = 8
seed = 5
threads = 1
log_every = 2
[checkpoint]
dir = "ckpt"
every_steps = 20
keep = 2
"#;

/// The shipped config with its file discovery pointed at `targets`: Kubernetes section cut,
/// 1 s intervals, the rules by absolute path. Every edit must apply, so that a change to the
/// shipped file shows here.
fn config_from_shipped(targets: &Path) -> String {
    let root = repo_root();
    let shipped = std::fs::read_to_string(root.join("deploy/prometheus/prometheus.yml"))
        .expect("deploy/prometheus/prometheus.yml");
    let k8s = shipped
        .find("  # --- Kubernetes")
        .expect("a Kubernetes section");
    let files = shipped
        .find("  # --- Slurm")
        .expect("a file-discovery section");
    let mut text = format!("{}{}", &shipped[..k8s], &shipped[files..]);
    let rules = root.join("deploy/prometheus/alerts.yml");
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_owned()),
        (
            "evaluation_interval: 15s",
            "evaluation_interval: 1s".to_owned(),
        ),
        ("  - alerts.yml", format!("  - {}", rules.display())),
        (
            "- /etc/prometheus/axial/*.json",
            format!("- {}\n        refresh_interval: 1s", targets.display()),
        ),
    ] {
        assert!(text.contains(from), "the shipped config lost {from:?}");
        text = text.replace(from, &to);
    }
    text
}

/// The result vector of an instant query.
fn query(prom: &str, q: &str) -> Vec<serde_json::Value> {
    let Some((200, body)) = http_get(prom, &format!("/api/v1/query?query={}", url_encode(q)))
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Polls `q` until `ok` holds for its result (or panics after `secs`).
fn wait_for(
    prom: &str,
    q: &str,
    secs: u64,
    ok: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = query(prom, q);
        if ok(&r) {
            println!(
                "prometheus: {q} = {}",
                serde_json::to_string(&r).unwrap_or_default()
            );
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{q}: never as expected; last {r:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_coordinator_and_the_workers() {
    let Some(prometheus) = program("prometheus") else {
        println!("SKIPPED: no `prometheus` on the PATH (Debian's prometheus package)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), JOB).expect("write");
    let targets = dir.join("targets.json");
    std::fs::write(dir.join("prometheus.yml"), config_from_shipped(&targets)).expect("write");
    let prom = format!("127.0.0.1:{}", free_port());
    let _prometheus = Killed(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
            .spawn()
            .expect("start prometheus"),
    );
    let http = free_port();
    let metrics = free_port_pair();
    let mut launch = Killed(
        Command::new(bin("axial-coordinator"))
            .current_dir(dir)
            .args(["launch", "--workers", "2", "--linger", "6"])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--metrics-port", &metrics.to_string()])
            .arg("--prometheus-targets")
            .arg(&targets)
            .arg("--worker-bin")
            .arg(bin("axial-worker"))
            .arg("job.toml")
            .stderr(Stdio::piped())
            .spawn()
            .expect("launch"),
    );
    let _lines = stream_lines(launch.0.stderr.take().expect("stderr"));

    // Prometheus is up, with the shipped rules loaded.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(&prom, "/-/ready").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "Prometheus not ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, rules) = http_get(&prom, "/api/v1/rules").expect("rules");
    for alert in [
        "AxialCoordinatorDown",
        "AxialTrainingStalled",
        "AxialLossNotFinite",
    ] {
        assert!(rules.contains(alert), "rule {alert} not loaded: {rules}");
    }

    // While the job trains: every target up, both workers' steps and losses, the coordinator's.
    let up = wait_for(&prom, "up", 60, |r| {
        r.len() == 3 && r.iter().all(|s| value(s) == 1.0)
    });
    let jobs: Vec<&str> = up
        .iter()
        .filter_map(|s| s["metric"]["job"].as_str())
        .collect();
    assert_eq!(
        jobs.iter().filter(|j| **j == "axial-worker").count(),
        2,
        "{jobs:?}"
    );
    assert!(jobs.contains(&"axial-coordinator"), "{jobs:?}");
    let steps = wait_for(&prom, "axial_worker_steps_total", 60, |r| {
        r.len() == 2 && r.iter().all(|s| value(s) >= 4.0)
    });
    let mut ids: Vec<&str> = steps
        .iter()
        .filter_map(|s| s["metric"]["worker"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["w0", "w1"], "series labelled by worker id");
    wait_for(&prom, "axial_worker_loss", 30, |r| {
        r.len() == 2 && r.iter().all(|s| value(s).is_finite() && value(s) > 0.0)
    });
    wait_for(&prom, "sum(axial_worker_rank)", 30, |r| {
        r.len() == 1 && value(&r[0]) == 1.0
    });
    wait_for(&prom, "axial_coordinator_global_step", 30, |r| {
        r.len() == 1 && value(&r[0]) >= 4.0
    });
    wait_for(
        &prom,
        "axial_coordinator_workers{state=\"running\"}",
        30,
        |r| r.len() == 1 && value(&r[0]) == 2.0,
    );
    wait_for(&prom, "rate(axial_worker_samples_total[5s])", 30, |r| {
        r.len() == 2 && r.iter().all(|s| value(s) > 0.0)
    });

    // The end: the job finished, scraped while the coordinator lingers.
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = launch.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the job did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "launch failed: {status}");
    wait_for(
        &prom,
        "max_over_time(axial_coordinator_job_finished[5m])",
        10,
        |r| r.len() == 1 && value(&r[0]) == 1.0,
    );
    // 800 steps in all: the coordinator heard of the last one; the workers were scraped until
    // near their end (they exit without waiting for a last scrape).
    wait_for(
        &prom,
        "max_over_time(axial_coordinator_global_step[5m])",
        10,
        |r| r.len() == 1 && value(&r[0]) == 800.0,
    );
    wait_for(
        &prom,
        "max_over_time(axial_worker_steps_total[5m])",
        10,
        |r| r.len() == 2 && r.iter().all(|s| (600.0..=800.0).contains(&value(s))),
    );
}
