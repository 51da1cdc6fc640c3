//! Parity with the authors' PyTorch implementation (shared/fixtures, see its README):
//! eval logits, train logits, loss, every gradient and the updated running statistics of a
//! quarter-width axial26 at 32 px, from the reference's own weights and input.

use std::collections::HashMap;
use std::path::PathBuf;

use axial_common::ModelSpec;
use axial_worker::model::Model;
use tch::{Device, Kind, Tensor};

fn fixture() -> HashMap<String, Tensor> {
    let dir = std::env::var_os("AXIAL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../../shared/fixtures"));
    let path = dir.join("axial26-quarter-official-32px.safetensors");
    let tensors = Tensor::read_safetensors(&path).unwrap_or_else(|e| {
        panic!(
            "the parity fixture is needed at {} (set AXIAL_FIXTURES): {e}",
            path.display()
        )
    });
    tensors.into_iter().collect()
}

fn model() -> Model {
    let spec = ModelSpec::from_toml_document(
        "[model]\nvariant = \"official\"\nlayers = [1, 2, 4, 1]\nwidth = 0.25\nheads = 8\nnum_classes = 10\nimage_size = 32\n",
        "fixture",
    )
    .expect("parses");
    Model::new(&spec.resolve().expect("valid"), Device::Cpu, 0)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_kind(Kind::Double).abs().max().double_value(&[])
}

/// One pass of the fixture's procedure (load the state, eval forward, train forward, loss,
/// backward), in float32 or float64: logits (eval, train), the loss, every gradient and
/// running statistic under the reference's names.
struct Pass {
    logits_eval: Tensor,
    logits_train: Tensor,
    loss: Tensor,
    values: HashMap<String, Tensor>,
}

fn pass(fx: &HashMap<String, Tensor>, double: bool) -> Pass {
    let mut model = model();
    assert_eq!(
        model.parameter_count(),
        1_240_778,
        "parameter count of the fixture model"
    );
    let state: Vec<(String, Tensor)> = fx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("state.")
                .map(|n| (n.to_owned(), v.shallow_clone()))
        })
        .collect();
    let n_state = state.len();
    model
        .load_state_dict(state)
        .unwrap_or_else(|m| panic!("fixture state does not load:\n{m}"));
    // Our export has exactly the reference's keys.
    assert_eq!(model.state_dict().len(), n_state);
    let mut input = fx["input"].shallow_clone();
    if double {
        model.vs.double();
        input = input.to_kind(Kind::Double);
    }
    // Eval mode: running statistics.
    let logits_eval = tch::no_grad(|| model.net.forward_t(&input, false));
    // Train mode: batch statistics, then loss and backward.
    let logits_train = model.net.forward_t(&input, true);
    let loss = axial_worker::model::cross_entropy(&logits_train, &fx["labels"]);
    loss.backward();
    let names =
        axial_worker::model::weights::NameTable::for_variant(axial_common::Variant::Official);
    let mut values = HashMap::new();
    for (name, var) in model.vs.variables() {
        if var.requires_grad() {
            values.insert(format!("grad.{}", names.external(&name)), var.grad());
        }
    }
    for (name, value) in model.state_dict() {
        values.insert(format!("after_train.{name}"), value);
    }
    Pass {
        logits_eval,
        logits_train: logits_train.detach(),
        loss: loss.detach().reshape([1]),
        values,
    }
}

/// Logits and loss within the fixture's tolerances. Gradients within 1e-3 of each tensor's
/// largest value and running statistics within 1e-5, or, where the float32 rounding of this
/// train-mode pass is larger than that (about 30 batch norms in a row amplify it; some bias
/// gradients are zero in exact arithmetic and pure rounding in float32), within 6x our own
/// float32-vs-float64 difference: the fixture is a float32 run too and carries the same kind
/// of noise, while a different computation misses by orders of magnitude.
#[test]
fn official_model_matches_the_pytorch_reference() {
    let fx = fixture();
    let ours = pass(&fx, false);
    let exact = pass(&fx, true);
    let e_eval = max_abs_diff(&ours.logits_eval, &fx["logits_eval"]);
    let e_train = max_abs_diff(&ours.logits_train, &fx["logits_train"]);
    let e_loss = max_abs_diff(&ours.loss, &fx["loss_train"]);
    println!("max |logits_eval - ref|  = {e_eval:.3e}");
    println!("max |logits_train - ref| = {e_train:.3e}");
    println!("|loss - ref|             = {e_loss:.3e}");
    let ref_scale = |t: &Tensor| 1.0 + max_abs(t);
    assert!(
        e_eval <= 1e-4 * ref_scale(&fx["logits_eval"]),
        "eval logits differ by {e_eval}"
    );
    assert!(
        e_train <= 1e-4 * ref_scale(&fx["logits_train"]),
        "train logits differ by {e_train}"
    );
    assert!(
        e_loss <= 1e-4 * ref_scale(&fx["loss_train"]),
        "loss differs by {e_loss}"
    );
    let mut counts = (0, 0);
    let mut worst = (0.0f64, String::new());
    let mut by_noise = 0;
    for (key, reference) in &fx {
        let grad = key.starts_with("grad.");
        if !(grad || key.starts_with("after_train.")) {
            continue;
        }
        let value = ours
            .values
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in our pass"));
        let err = max_abs_diff(value, reference);
        // The float32 noise: the larger of our float32 run's and the fixture's distance to our
        // float64 result (a gradient that is exactly 0, like bn_similarity's bias under the
        // softmax, is pure noise in both float32 runs, of different sizes).
        let noise = max_abs_diff(value, &exact.values[key])
            .max(max_abs_diff(reference, &exact.values[key]));
        let bound = if grad {
            1e-3 * max_abs(reference).max(1e-12)
        } else {
            1e-5
        };
        assert!(
            err <= bound.max(6.0 * noise),
            "{key} differs by {err:.3e} (bound {bound:.3e}, float32 noise {noise:.3e})"
        );
        if err > bound {
            by_noise += 1;
            if err / noise > worst.0 {
                worst = (err / noise, key.clone());
            }
        }
        if grad {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    println!(
        "gradients: {}, running statistics: {}; {by_noise} within the float32 noise rather than the fixed bound (at most {:.1}x, {})",
        counts.0, counts.1, worst.0, worst.1
    );
    assert_eq!(counts, (193, 207));
}

/// This crate's directory: the one `cargo test` names at run time, else the one baked in at
/// compile time (a target dir shared with a checkout elsewhere reuses executables built there).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
