//! Real data, stored as users store it: the 1,797 handwritten digits that scikit-learn ships
//! (UCI optical digits, 8x8 greyscale scans), written by `scripts/real-data.py` as a
//! class-sorted image folder (1,498 train, 299 val). `axial-worker train` must reach the
//! accuracy that the PyTorch twin of the same model reaches with the same recipe and the same
//! batches (`scripts/compare-with-pytorch.sh` prints both side by side), and every batch it
//! trained on must mix the classes.
//!
//! The data is made once into `${XDG_CACHE_HOME:-~/.cache}/axial/data/digits` (the wheel is
//! fetched from the Python package registry on the first run).

use std::path::{Path, PathBuf};
use std::process::Command;

use axial_e2e::{bin, repo_root, run};

/// The job: `examples/digits.toml` (the official layout with one block per stage at width
/// 0.25, 32 px, the default SGD recipe, 6 epochs), its data and checkpoints moved.
fn digits_job(data: &Path, dir: &Path) -> PathBuf {
    let example = repo_root().join("examples/digits.toml");
    let text = std::fs::read_to_string(&example).expect("examples/digits.toml");
    let data = data.display().to_string();
    let text = text
        .replace("\"data/digits/", &format!("\"{data}/"))
        .replace("\"../runs/digits\"", "\"ckpt\"")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"\"");
    assert!(text.contains(&data) && text.contains("\"ckpt\""), "{text}");
    let job = dir.join("digits.toml");
    std::fs::write(&job, text).expect("write job");
    job
}

/// Validation top-1 of the PyTorch twin (`scripts/pytorch/train.py`) on this job, replaying
/// axial's batches from the same initial weights: 0.9666 after epoch 6 (measured 2026-11-29,
/// torch 2.11 on CPU; axial's own run gave the same figure, epoch by epoch). axial must reach
/// it, less 2 points for kernels that round differently on other CPUs.
const PYTORCH_TOP1: f64 = 0.9666;

fn digits() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME")
        .join("axial/data/digits");
    let script = repo_root().join("scripts/real-data.py");
    let out = run(Command::new("python3")
        .arg(&script)
        .arg("digits")
        .arg(&cache));
    assert!(
        out.status.success(),
        "scripts/real-data.py could not make the digits data set (python3 and the Python \
         package registry are needed once)"
    );
    cache
}

/// Labels by sample index, as an image folder lists them: class folders sorted, files sorted.
fn folder_labels(root: &Path) -> Vec<usize> {
    let sorted = |dir: &Path| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    };
    let mut labels = Vec::new();
    for (class, dir) in sorted(root).into_iter().filter(|p| p.is_dir()).enumerate() {
        let n = sorted(&dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .count();
        labels.extend(std::iter::repeat_n(class, n));
    }
    labels
}

#[test]
fn class_sorted_handwritten_digits_train_to_the_pytorch_accuracy() {
    let data = digits();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = digits_job(&data, tmp.path());
    let out = run(Command::new(bin("axial-worker")).arg("train").arg(&job));
    assert!(out.status.success(), "training failed");

    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("ckpt/summary.json")).expect("summary"),
    )
    .expect("json");
    let top1 = summary["val_top1"].as_f64().expect("val_top1");
    let history: Vec<String> = summary["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| format!("{:.4}", e["val_top1"].as_f64().unwrap_or(0.0)))
        .collect();
    println!("val top-1 per epoch: {}", history.join(" "));
    assert!(
        top1 >= PYTORCH_TOP1 - 0.02,
        "val top-1 {top1:.4} after 6 epochs; the PyTorch twin reaches {PYTORCH_TOP1}"
    );

    // Every micro-batch trained on mixed the classes (the folder is class-sorted).
    let labels = folder_labels(&data.join("train"));
    assert_eq!(labels.len(), 1498);
    let log = std::fs::read_to_string(tmp.path().join("ckpt/samples/train.log")).expect("log");
    let mut batches = 0;
    let mut distinct_total = 0;
    for line in log.lines() {
        let mut classes: Vec<usize> = line
            .split_whitespace()
            .skip(3)
            .map(|i| labels[i.parse::<usize>().expect("index")])
            .collect();
        if classes.len() < 32 {
            continue; // the last, smaller step of an epoch
        }
        classes.sort();
        classes.dedup();
        distinct_total += classes.len();
        batches += 1;
    }
    let mean = distinct_total as f64 / batches as f64;
    let uniform = 10.0 * (1.0 - 0.9f64.powi(32));
    println!("distinct classes per batch of 32: {mean:.2} (a uniform shuffle: {uniform:.2})");
    assert!(batches >= 6 * 46, "{batches} full batches logged");
    assert!(
        mean > 0.95 * uniform,
        "{mean:.2} distinct classes per batch"
    );
}
