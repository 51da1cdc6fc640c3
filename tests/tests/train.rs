//! `axial-worker train`: a run stopped and resumed ends bit-identical to one that was not
//! stopped; resume refuses another model; `predict` reads the checkpoint.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use axial_e2e::{bin, run};
use tch::Tensor;

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
loader_threads = 2
[data.augment]
crop_scale = [0.5, 1.0]
[train]
epochs = 2
batch_size = 16
seed = 3
threads = 2
log_every = 4
[checkpoint]
dir = "ckpt"
every_steps = 4
keep = 2
[metrics]
listen = ""
"#;

fn write_job(dir: &Path, text: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let p = dir.join("job.toml");
    std::fs::write(&p, text).expect("write");
    p
}

fn train(job: &Path, extra: &[&str]) -> std::process::Output {
    run(Command::new(bin("axial-worker"))
        .arg("train")
        .arg(job)
        .args(extra))
}

fn newest_checkpoint(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("ckpt dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").exists())
        .collect();
    v.sort();
    v.pop().expect("a checkpoint")
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .expect("read")
        .into_iter()
        .collect()
}

#[test]
fn stopped_and_resumed_run_ends_bit_identical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let straight = write_job(&tmp.path().join("straight"), JOB);
    let resumed = write_job(&tmp.path().join("resumed"), JOB);
    assert!(train(&straight, &[]).status.success());
    // Stop mid-epoch 1 (13 steps per epoch), after a periodic checkpoint, then resume twice:
    // once more mid-run, then to the end.
    let out = train(&resumed, &["--stop-after-steps", "6"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped after 6 steps"));
    assert!(
        train(&resumed, &["--resume", "--stop-after-steps", "15"])
            .status
            .success()
    );
    let out = train(&resumed, &["--resume"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));

    let a = newest_checkpoint(&straight.with_file_name("ckpt"));
    let b = newest_checkpoint(&resumed.with_file_name("ckpt"));
    assert_eq!(a.file_name(), b.file_name(), "same final step");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (ta, tb) = (tensors(&a.join(file)), tensors(&b.join(file)));
        assert_eq!(ta.len(), tb.len(), "{file}");
        assert!(!ta.is_empty());
        for (name, t) in &ta {
            assert!(t.equal(&tb[name]), "{file}: {name} differs after resume");
        }
        assert_eq!(
            std::fs::read(a.join(file)).expect("read"),
            std::fs::read(b.join(file)).expect("read"),
            "{file} bytes"
        );
    }
    let text = std::fs::read_to_string(straight.with_file_name("ckpt").join("summary.json"))
        .expect("summary");
    let summary: serde_json::Value = serde_json::from_str(&text).expect("json");
    for key in [
        "val_top1",
        "val_top5",
        "val_loss",
        "steps",
        "samples_seen",
        "wall_seconds",
    ] {
        assert!(
            summary.get(key).is_some_and(|v| v.is_number()),
            "summary.json lacks {key}: {text}"
        );
    }
    assert!((0.0..=1.0).contains(&summary["val_top1"].as_f64().expect("number")));
    // 200 samples in steps of 16: 12 full steps and one of 8, every sample once per epoch.
    assert_eq!(summary["steps"].as_u64(), Some(26));
    assert_eq!(summary["samples_seen"].as_u64(), Some(400));
    // keep = 2
    let kept = std::fs::read_dir(straight.with_file_name("ckpt"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ckpt-"))
        .count();
    assert_eq!(kept, 2);

    // predict reads the checkpoint and prints five classes per image.
    let png = tmp.path().join("img.png");
    image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 6) as u8, 128])
    })
    .save(&png)
    .expect("png");
    let out = run(Command::new(bin("axial-worker"))
        .args(["predict", "--device", "cpu", "--checkpoint"])
        .arg(straight.with_file_name("ckpt"))
        .arg(&png));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains('%')).count(),
        5,
        "{stdout}"
    );
    assert!(
        stdout.contains("disk") || stdout.contains("ring") || stdout.contains("square"),
        "class names: {stdout}"
    );
}

#[test]
fn resume_refuses_another_model_and_bad_jobs_fail_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), JOB);
    assert!(train(&job, &["--stop-after-steps", "2"]).status.success());
    std::fs::write(&job, JOB.replace("width = 0.125", "width = 0.25")).expect("write");
    let out = train(&job, &["--resume"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another model") && err.contains("width"),
        "{err}"
    );
    // The checkpoint that was refused is still there, untouched.
    assert!(
        newest_checkpoint(&tmp.path().join("ckpt"))
            .join("model.safetensors")
            .exists()
    );
    // So is a resume on other training data, or with another seed: the ledger's prefix would
    // name other samples.
    for (from, to, what) in [
        (
            "train = 200",
            "train = 208",
            "samples 200 in the checkpoint, 208 now",
        ),
        ("seed = 3", "seed = 4", "seed 3 in the checkpoint, 4 now"),
    ] {
        std::fs::write(&job, JOB.replace(from, to)).expect("write");
        let out = train(&job, &["--resume"]);
        assert!(!out.status.success(), "{to}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("other training data") && err.contains(what),
            "{err}"
        );
    }
    // A fresh run (no --resume) in the folder of another run's checkpoints is refused, naming
    // them, and they stay.
    std::fs::write(&job, JOB).expect("write");
    let out = train(&job, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds the checkpoints") && err.contains("ckpt-0000000002"),
        "{err}"
    );
    assert!(
        newest_checkpoint(&tmp.path().join("ckpt"))
            .join("model.safetensors")
            .exists()
    );

    std::fs::write(
        &job,
        JOB.replace("batch_size = 16", "batch_size = 16\nbach = 1"),
    )
    .expect("write");
    let out = train(&job, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bach"));
}

/// SIGTERM to `train` (a preempted node, a time limit): it checkpoints after the step in
/// progress and exits 0; `--resume` then ends bit-identical to a run that was never stopped.
#[test]
fn a_terminated_run_checkpoints_and_resumes_bit_identical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let straight = write_job(&tmp.path().join("straight"), JOB);
    let stopped = write_job(&tmp.path().join("stopped"), JOB);
    assert!(train(&straight, &[]).status.success());
    let child = Command::new(bin("axial-worker"))
        .arg("train")
        .arg(&stopped)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("train");
    // Let it train a few steps (the first periodic checkpoint is at step 4).
    let ckpt = tmp.path().join("stopped/ckpt");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ckpt.join("ckpt-0000000004/manifest.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint at step 4"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{stderr}");
    assert!(out.status.success(), "exit {}", out.status);
    assert!(stderr.contains("terminated (SIGTERM)"), "{stderr}");
    assert!(stdout.contains("stopped after"), "{stdout}");
    assert!(train(&stopped, &["--resume"]).status.success());
    let a =
        tensors(&newest_checkpoint(&tmp.path().join("straight/ckpt")).join("model.safetensors"));
    let b = tensors(&newest_checkpoint(&ckpt).join("model.safetensors"));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(
            t.equal(&b[name]),
            "{name} differs after SIGTERM and --resume"
        );
    }
}

/// `[train] cuda_graphs = true` where `device = "auto"` finds no GPU: `train` stops before
/// the first step with an error that names the setting (not a silent uncaptured run), and
/// writes no checkpoint.
#[test]
fn cuda_graphs_without_a_gpu_is_refused_naming_the_setting() {
    if tch::Cuda::is_available() {
        println!("skipped: this machine has a GPU (gpu_mixed_precision_trains runs the graphs)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(
        tmp.path(),
        &JOB.replace(
            "seed = 3",
            "seed = 3\ndevice = \"auto\"\ncuda_graphs = true",
        ),
    );
    let out = train(&job, &["--stop-after-steps", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("train.cuda_graphs"), "{stderr}");
    assert!(stderr.contains("CUDA"), "{stderr}");
    let ckpt = tmp.path().join("ckpt");
    let saved = std::fs::read_dir(&ckpt).map_or(0, |d| d.count());
    assert_eq!(saved, 0, "nothing written under {}", ckpt.display());
}

/// GPU: a few steps in bf16 and fp16 autocast on CUDA, and in bf16 with the step captured as
/// a CUDA graph (`cuda_graphs`: 3 warm-up passes, the capture, replays). Compiled always;
/// skipped without a GPU.
#[test]
fn gpu_mixed_precision_trains() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device (tch::Cuda::is_available() is false)");
        return;
    }
    for (precision, graphs) in [("bf16", false), ("fp16", false), ("bf16", true)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        // After `seed` (the first "threads = 2" is [data]'s loader_threads).
        let text = JOB.replace(
            "seed = 3",
            &format!(
                "seed = 3\ndevice = \"cuda\"\nprecision = \"{precision}\"\ncuda_graphs = {graphs}"
            ),
        );
        let job = write_job(tmp.path(), &text);
        let out = train(&job, &["--stop-after-steps", "8"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{precision}, cuda_graphs {graphs}:\n{stderr}");
        assert!(out.status.success(), "{precision}, cuda_graphs {graphs}");
        assert!(!stderr.contains("not captured"), "{stderr}");
        let model = tensors(&newest_checkpoint(&tmp.path().join("ckpt")).join("model.safetensors"));
        assert!(
            model
                .values()
                .all(|t| t.isfinite().all().int64_value(&[]) == 1),
            "{precision}: non-finite weights"
        );
    }
}
