//! `axial-coordinator validate`: a good job prints resolved, a bad one names its key.

use std::process::Command;

#[test]
fn validate_prints_the_resolved_job_or_names_the_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.toml");
    let text = "[model]\narch = \"axial26s\"\nnum_classes = 10\n[data]\nformat = \"builtin\"\ntrain = 100\nval = 10\nimage_size = 32\n";
    std::fs::write(&job, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_axial-coordinator"))
        .arg("validate")
        .arg(&job)
        .output()
        .expect("run");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("is valid")
            && stdout.contains("weight_decay = 0.00008")
            && stdout.contains("[schedule]"),
        "{stdout}"
    );

    std::fs::write(
        &job,
        text.replace("train = 100", "train = 100\nshuffle = true"),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_axial-coordinator"))
        .arg("validate")
        .arg(&job)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shuffle"));
}
