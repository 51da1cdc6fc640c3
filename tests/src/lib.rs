//! Helpers for the end-to-end tests in `tests/tests/`: they run the real binaries, each test in
//! its own temp dir, and check what a user would check.
//!
//! The binaries are found beside the test executable (`target/<profile>/`); `scripts/test.sh`
//! builds them (`cargo build --workspace --bins`) before running the tests.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a workspace binary built by the same `cargo test` run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The shared parity fixtures (`../shared/fixtures` beside the checkout, or `AXIAL_FIXTURES`).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("AXIAL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

/// Runs a command and returns its output; prints both streams so a failing test shows them.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    println!(
        "$ {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
