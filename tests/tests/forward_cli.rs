//! `axial-worker forward` reproduces the exact (float64) results of the PyTorch twin from the
//! files a user has (the authors' fixture, the seed layout), and turns bad input into clear
//! errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use axial_e2e::{bin, fixtures_dir, run};
use axial_worker::parity::{Fixture, ensure_fixtures};
use tch::Tensor;

const MODEL: &str = "[model]\nvariant = \"official\"\nlayers = [1, 2, 4, 1]\nwidth = 0.25\nheads = 8\nnum_classes = 10\nimage_size = 32\n";

struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
    fixture: HashMap<String, Tensor>,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// Splits the fixture into the files a user would have: model table, weights, input, labels.
fn files() -> Files {
    let fixture_path = fixtures_dir().join("axial26-quarter-official-32px.safetensors");
    let fixture: HashMap<String, Tensor> = Tensor::read_safetensors(&fixture_path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", fixture_path.display()))
        .into_iter()
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_owned();
    std::fs::write(root.join("model.toml"), MODEL).expect("write");
    let state: Vec<(String, Tensor)> = fixture
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("state.")
                .map(|n| (n.to_owned(), v.shallow_clone()))
        })
        .collect();
    Tensor::write_safetensors(&state, root.join("weights.safetensors")).expect("write");
    Tensor::write_safetensors(
        &[("input", &fixture["input"])],
        root.join("input.safetensors"),
    )
    .expect("write");
    Tensor::write_safetensors(
        &[("labels", &fixture["labels"])],
        root.join("labels.safetensors"),
    )
    .expect("write");
    Files {
        _dir: dir,
        root,
        fixture,
    }
}

fn forward(f: &Files, extra: &[&str], output: &Path) -> std::process::Output {
    run(Command::new(bin("axial-worker"))
        .arg("forward")
        .arg("--model")
        .arg(f.path("model.toml"))
        .arg("--weights")
        .arg(f.path("weights.safetensors"))
        .arg("--input")
        .arg(f.path("input.safetensors"))
        .arg("--output")
        .arg(output)
        .args(["--device", "cpu"])
        .args(extra))
}

/// Runs `axial-worker forward` on a parity case's files (eval, then train with labels) and
/// holds its logits, loss, gradients and running statistics to the exact values
/// (`axial_worker::parity`: within 3x PyTorch's own float32 distance to the float64 twin).
fn forward_matches_the_exact_values(case: &str) {
    let dir = std::env::var_os("AXIAL_PARITY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("parity-fixtures"));
    let dir = ensure_fixtures(&axial_e2e::repo_root(), &dir).unwrap_or_else(|e| panic!("{e}"));
    let fx = Fixture::load(&dir, case).unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| tmp.path().join(name);
    std::fs::write(path("model.toml"), &fx.model).expect("write");
    let state: Vec<(&str, &Tensor)> = fx.state.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&state, path("weights.safetensors")).expect("write");
    Tensor::write_safetensors(&[("input", &fx.input)], path("input.safetensors")).expect("write");
    Tensor::write_safetensors(&[("labels", &fx.labels)], path("labels.safetensors"))
        .expect("write");
    let run_forward = |extra: &[&str], out: &Path| -> HashMap<String, Tensor> {
        let status = run(Command::new(bin("axial-worker"))
            .arg("forward")
            .arg("--model")
            .arg(path("model.toml"))
            .arg("--weights")
            .arg(path("weights.safetensors"))
            .arg("--input")
            .arg(path("input.safetensors"))
            .arg("--output")
            .arg(out)
            .args(["--device", "cpu"])
            .args(extra))
        .status;
        assert!(status.success(), "axial-worker forward failed");
        Tensor::read_safetensors(out)
            .expect("read")
            .into_iter()
            .collect()
    };
    let eval = run_forward(&[], &path("eval.safetensors"));
    assert!(!eval.contains_key("loss"), "no labels, no loss");
    let labels = path("labels.safetensors");
    let mut ours = run_forward(
        &["--train", "--labels", labels.to_str().expect("utf8")],
        &path("train.safetensors"),
    );
    assert_eq!(ours["loss"].size(), [1]);
    let logits = ours.remove("logits").expect("logits");
    ours.insert("logits_train".to_owned(), logits);
    ours.insert("logits_eval".to_owned(), eval["logits"].shallow_clone());
    let report = fx.compare(&ours);
    println!("{report}");
    assert!(report.failures().is_empty(), "{report}");
    assert!(
        report.rows.len() > 100,
        "{} results compared",
        report.rows.len()
    );
}

#[test]
fn forward_reproduces_the_authors_fixture_exactly() {
    forward_matches_the_exact_values("authors");
}

/// The seed project's layout, trained as a new user trains it (the fused core's lengths 16,
/// 8, 4 and 2).
#[test]
fn forward_reproduces_the_seed_layout_exactly() {
    forward_matches_the_exact_values("seed-64px");
}

fn fails_with(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail");
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr does not mention {n:?}: {stderr}"
        );
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let f = files();
    let out = f.path("out.safetensors");

    // An input file without `input`, and one of the wrong shape.
    Tensor::write_safetensors(
        &[("pixels", &f.fixture["input"])],
        f.path("input.safetensors"),
    )
    .expect("write");
    fails_with(
        &forward(&f, &[], &out),
        &["no tensor named \"input\"", "pixels"],
    );
    let flat = f.fixture["input"].flatten(1, -1);
    Tensor::write_safetensors(&[("input", &flat)], f.path("input.safetensors")).expect("write");
    fails_with(&forward(&f, &[], &out), &["[N, 3, H, W]", "[4, 3072]"]);
    Tensor::write_safetensors(
        &[("input", &f.fixture["input"])],
        f.path("input.safetensors"),
    )
    .expect("write");

    // Labels out of range.
    let labels = Tensor::from_slice(&[0i64, 1, 2, 10]);
    Tensor::write_safetensors(&[("labels", &labels)], f.path("labels.safetensors")).expect("write");
    let labels_path = f.path("labels.safetensors");
    fails_with(
        &forward(&f, &["--labels", labels_path.to_str().expect("utf8")], &out),
        &["10 classes"],
    );

    // A model table with a bad key, and one that does not fit the weights.
    std::fs::write(
        f.path("model.toml"),
        MODEL.replace("heads = 8", "heads = 8\nheds = 3"),
    )
    .expect("write");
    fails_with(&forward(&f, &[], &out), &["model.toml", "heds"]);
    std::fs::write(
        f.path("model.toml"),
        MODEL.replace("num_classes = 10", "num_classes = 7"),
    )
    .expect("write");
    fails_with(
        &forward(&f, &[], &out),
        &["do not fit", "fc.weight", "[7, 512]", "[10, 512]"],
    );
    std::fs::write(
        f.path("model.toml"),
        MODEL.replace("\"official\"", "\"seed\""),
    )
    .expect("write");
    fails_with(
        &forward(&f, &[], &out),
        &[
            "seed layout",
            "missing keys",
            "unexpected keys",
            "hight_block",
        ],
    );

    // Nothing was written by any failed run.
    assert!(!out.exists());
}
