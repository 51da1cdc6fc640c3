//! Every rank runs the same collectives in every step, even with nothing to train on. A rank
//! whose micro-batch is empty once skipped its forward pass, so its peers' synchronized batch
//! norms waited for a partner that never came (until the collective timeout, then again in
//! every re-formed group). Each test here hung that way; each must now finish, with identical
//! replicas and every sample consumed exactly once.

use std::path::Path;
use std::process::Command;

use axial_e2e::{assert_each_sample_once, bin, run};

/// A job of `train` built-in samples per epoch, 2 epochs, `batch` x `accumulate` per rank.
fn job(data: &str, batch: usize, accumulate: usize) -> String {
    format!(
        r#"
[model]
variant = "official"
layers = [1, 1, 1, 1]
width = 0.125
num_classes = 10
[data]
{data}
image_size = 32
loader_threads = 1
log_samples = true
[train]
epochs = 2
batch_size = {batch}
accumulate = {accumulate}
seed = 3
threads = 1
log_every = 2
[checkpoint]
dir = "ckpt"
keep = 2
[metrics]
listen = ""
"#
    )
}

fn launch(dir: &Path, workers: usize, extra: &[&str]) -> std::process::Output {
    run(Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", &workers.to_string(), "--worker-bin"])
        .arg(bin("axial-worker"))
        .arg(dir.join("job.toml"))
        .args(extra))
}

fn assert_replicas_equal(dir: &Path, world: usize) {
    let prints: Vec<String> = (0..world)
        .map(|r| {
            std::fs::read_to_string(dir.join(format!("ckpt/replica-{r}.sha256")))
                .unwrap_or_else(|_| panic!("rank {r}'s fingerprint"))
        })
        .collect();
    assert!(prints.iter().all(|p| *p == prints[0]), "{prints:?}");
}

/// 35 samples on 2 ranks, 4 micro-batches of 4 per rank: the last step's 3 samples split 2 + 1,
/// so rank 0 has micro-batches of 0, 1, 0, 1 samples and rank 1 of 0, 0, 0, 1.
#[test]
fn an_uneven_last_step_smaller_than_accumulate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = "format = \"builtin\"\ntrain = 35\nval = 16";
    std::fs::write(tmp.path().join("job.toml"), job(data, 4, 4)).expect("job");
    let out = launch(tmp.path(), 2, &[]);
    assert!(out.status.success(), "launch failed");
    assert_replicas_equal(tmp.path(), 2);
    assert_each_sample_once(tmp.path(), 2, 35);
}

/// An image folder where 20 of 24 images cannot be decoded: many micro-batches of one rank
/// hold no sample while the other rank's do.
#[test]
fn micro_batches_whose_every_sample_fails_to_decode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let folder = tmp.path().join("images");
    let mut png = Vec::new();
    image::RgbImage::from_fn(12, 12, |x, y| {
        image::Rgb([(x * 20) as u8, (y * 20) as u8, 90])
    })
    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
    .expect("encode");
    for i in 0..24 {
        let class = folder.join(format!("c{}", i % 2));
        std::fs::create_dir_all(&class).expect("mkdir");
        let bytes: &[u8] = if i < 4 {
            &png
        } else {
            b"\x89PNG\r\n\x1a\nnot really a png"
        };
        std::fs::write(class.join(format!("{i:02}.png")), bytes).expect("write");
    }
    let data = format!(
        "format = \"imagefolder\"\ntrain = \"{0}\"\nval = \"{0}\"",
        folder.display()
    );
    std::fs::write(tmp.path().join("job.toml"), job(&data, 2, 1)).expect("job");
    let out = launch(tmp.path(), 2, &[]);
    assert!(out.status.success(), "launch failed");
    assert_replicas_equal(tmp.path(), 2);
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("ckpt/summary.json")).expect("summary"),
    )
    .expect("json");
    println!("summary: {summary}");
    assert!(summary["skipped_samples"].as_u64() >= Some(40), "{summary}");
}

/// One worker stops with one sample of the epoch left; the job resumes on two: the last step
/// of that epoch gives rank 1 nothing.
#[test]
fn a_resume_onto_more_ranks_than_samples_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = "format = \"builtin\"\ntrain = 33\nval = 16";
    std::fs::write(tmp.path().join("job.toml"), job(data, 8, 1)).expect("job");
    let alone = run(Command::new(bin("axial-worker"))
        .arg("train")
        .arg(tmp.path().join("job.toml"))
        .args(["--stop-after-steps", "4"]));
    assert!(alone.status.success());
    let out = launch(tmp.path(), 2, &["--resume"]);
    assert!(out.status.success(), "launch --resume failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming from"), "{stderr}");
    assert_replicas_equal(tmp.path(), 2);
    assert_each_sample_once(tmp.path(), 2, 33);
}
