//! The dashboard in a real browser: a two-worker `launch` trains while headless Chromium (the
//! Debian `chromium` package) opens the URL that `launch` prints, runs the page's script
//! against the live `/api/status`, and the test reads the rendered DOM (the job running, both
//! workers, the step, drawn charts, the per-rank phase table) and takes a screenshot, saved in
//! the test's temp dir and copied to `target/tmp/dashboard.png` for a person to look at.
//!
//! Skips, saying why, when `chromium` is not installed (scripts/test.sh installs it).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axial_e2e::{bin, http_get, program, stream_lines, until};

const JOB: &str = r#"
[model]
variant = "official"
layers = [1, 1, 1, 1]
width = 0.125
num_classes = 10
[data]
format = "builtin"
train = 1600
val = 48
image_size = 32
loader_threads = 1
[train]
epochs = 2
batch_size = 8
seed = 9
threads = 1
log_every = 2
[checkpoint]
dir = "ckpt"
every_steps = 20
keep = 2
[metrics]
listen = ""
"#;

/// Headless Chromium on `url` with a fresh profile, nothing fetched but the page; the page's
/// script gets `budget_ms` of virtual time (its polls of /api/status run in it).
fn chromium(chromium: &Path, profile: &Path, url: &str, budget_ms: u64, out: &[&str]) -> String {
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,1500",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(out)
        .arg(url)
        .stderr(Stdio::piped())
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the element with `id` in `dom` (its first child text; "" if none).
fn text_of(dom: &str, id: &str) -> String {
    let Some(at) = dom.find(&format!("id=\"{id}\"")) else {
        return String::new();
    };
    let rest = &dom[at..];
    let start = rest.find('>').map_or(rest.len(), |i| i + 1);
    let end = rest[start..].find('<').map_or(rest.len(), |i| start + i);
    rest[start..end].to_owned()
}

/// The `data-points` of the chart `id` and whether a line was drawn in it.
fn chart(dom: &str, id: &str) -> (usize, bool) {
    let Some(at) = dom.find(&format!("id=\"{id}\"")) else {
        return (0, false);
    };
    let rest = &dom[at..];
    let end = rest.find("</svg>").unwrap_or(rest.len());
    let svg = &rest[..end];
    let points = svg
        .split("data-points=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (points, svg.contains("<path d=\"M"))
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_dashboard_renders_a_running_job_in_headless_chromium() {
    let Some(browser) = program("chromium") else {
        println!("SKIPPED: no `chromium` on the PATH (Debian's chromium package)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("job.toml"), JOB).expect("write");
    let mut launch = Killed(
        Command::new(bin("axial-coordinator"))
            .current_dir(dir)
            .args(["launch", "--workers", "2"])
            .arg("--worker-bin")
            .arg(bin("axial-worker"))
            .arg("job.toml")
            .stderr(Stdio::piped())
            .spawn()
            .expect("launch"),
    );
    let lines = stream_lines(launch.0.stderr.take().expect("stderr"));
    // launch prints the dashboard's URL.
    let seen = until(&lines, "dashboard on http://");
    let url = seen
        .last()
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .expect("a URL")
        .to_owned();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();

    // Wait until there is something to draw: a few logged steps from both ranks.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status: Option<serde_json::Value> = http_get(&addr, "/api/status")
            .filter(|(code, _)| *code == 200)
            .and_then(|(_, body)| serde_json::from_str(&body).ok());
        if let Some(s) = status
            && s["history"].as_array().is_some_and(|h| h.len() >= 4)
            && s["ranks"].as_array().is_some_and(|r| r.len() == 2)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no progress to show");
        std::thread::sleep(Duration::from_millis(300));
    }

    let dom = chromium(
        &browser,
        &dir.join("profile-dom"),
        &url,
        4000,
        &["--dump-dom"],
    );
    assert!(
        dom.contains("data-rendered=\""),
        "the page's script did not render:\n{dom}"
    );
    assert_eq!(text_of(&dom, "state"), "(running)", "{dom}");
    assert_eq!(text_of(&dom, "workercount"), "2");
    assert_eq!(text_of(&dom, "world"), "2");
    let step: u64 = text_of(&dom, "step").parse().expect("a step number");
    assert!(step >= 4, "step {step}");
    assert_eq!(text_of(&dom, "total"), "200");
    let (points, drawn) = chart(&dom, "chart-loss");
    assert!(
        points >= 4 && drawn,
        "loss chart: {points} points, drawn {drawn}"
    );
    let (points, drawn) = chart(&dom, "chart-ips");
    assert!(points >= 4 && drawn, "throughput chart: {points} points");
    let (_, drawn) = chart(&dom, "chart-lr");
    assert!(drawn, "learning-rate chart");
    // Both workers listed with their state, and the per-rank phase breakdown.
    for w in ["w0", "w1"] {
        assert!(
            dom.contains(&format!("<td>{w}</td><td class=\"running\">running</td>")),
            "{w}"
        );
    }
    let ranks = dom.split("id=\"ranks\"").nth(1).unwrap_or("");
    assert_eq!(
        ranks
            .split("</tbody>")
            .next()
            .unwrap_or("")
            .matches("<tr")
            .count(),
        2,
        "two ranks in the phase table"
    );
    assert!(text_of(&dom, "skew").contains("median / slowest speed"));
    assert!(
        dom.contains("Formed: generation 1, world: 2"),
        "the timeline"
    );
    assert!(
        text_of(&dom, "error").is_empty(),
        "{}",
        text_of(&dom, "error")
    );

    let shot = dir.join("dashboard.png");
    chromium(
        &browser,
        &dir.join("profile-shot"),
        &url,
        4000,
        &[&format!("--screenshot={}", shot.display())],
    );
    let image = image::open(&shot).expect("a PNG screenshot").to_rgb8();
    let colours: std::collections::HashSet<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    println!(
        "screenshot: {} ({}x{}, {} colours)",
        shot.display(),
        image.width(),
        image.height(),
        colours.len()
    );
    assert!(colours.len() > 16, "a blank screenshot");
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    if std::fs::copy(&shot, &keep).is_ok() {
        println!("screenshot kept at {}", keep.display());
    }

    // The job ends normally while the dashboard was read.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Some(s) = launch.0.try_wait().expect("wait") {
            assert!(s.success(), "launch failed: {s}");
            break;
        }
        assert!(Instant::now() < deadline, "the job did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
}
