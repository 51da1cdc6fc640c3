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
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
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

#[test]
fn official_model_matches_the_pytorch_reference() {
    let fx = fixture();
    let model = model();
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

    let input = &fx["input"];
    let labels = &fx["labels"];

    // Eval mode: running statistics.
    let logits_eval = tch::no_grad(|| model.net.forward_t(input, false));
    let e_eval = max_abs_diff(&logits_eval, &fx["logits_eval"]);

    // Train mode: batch statistics, then loss and backward.
    let logits_train = model.net.forward_t(input, true);
    let e_train = max_abs_diff(&logits_train, &fx["logits_train"]);
    let loss = axial_worker::model::cross_entropy(&logits_train, labels);
    let e_loss = max_abs_diff(&loss.reshape([1]), &fx["loss_train"]);
    loss.backward();

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

    // Every gradient, relative to the tensor's largest magnitude.
    let names =
        axial_worker::model::weights::NameTable::for_variant(axial_common::Variant::Official);
    let mut worst_grad = (0.0f64, String::new());
    let mut n_grads = 0;
    for (name, var) in model.vs.variables() {
        if !var.requires_grad() {
            continue;
        }
        let key = format!("grad.{}", names.external(&name));
        let reference = fx
            .get(&key)
            .unwrap_or_else(|| panic!("fixture has no {key}"));
        let rel = max_abs_diff(&var.grad(), reference) / max_abs(reference).max(1e-12);
        if rel > worst_grad.0 {
            worst_grad = (rel, key.clone());
        }
        n_grads += 1;
    }
    println!(
        "gradients: {n_grads}, worst relative error {:.3e} ({})",
        worst_grad.0, worst_grad.1
    );
    assert_eq!(
        n_grads,
        fx.keys().filter(|k| k.starts_with("grad.")).count()
    );
    assert!(
        worst_grad.0 <= 1e-3,
        "gradient {} differs by {:.3e} of its scale",
        worst_grad.1,
        worst_grad.0
    );

    // Running statistics and num_batches_tracked after the one train-mode forward.
    let mut worst_stat = (0.0f64, String::new());
    let mut n_stats = 0;
    for (name, value) in model.state_dict() {
        let key = format!("after_train.{name}");
        let Some(reference) = fx.get(&key) else {
            continue;
        };
        let err = max_abs_diff(&value, reference);
        if err > worst_stat.0 {
            worst_stat = (err, key.clone());
        }
        n_stats += 1;
    }
    println!(
        "running statistics: {n_stats}, worst abs error {:.3e} ({})",
        worst_stat.0, worst_stat.1
    );
    assert_eq!(
        n_stats,
        fx.keys().filter(|k| k.starts_with("after_train.")).count()
    );
    assert!(
        worst_stat.0 <= 1e-5,
        "{} differs by {:.3e}",
        worst_stat.1,
        worst_stat.0
    );
}
