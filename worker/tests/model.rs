//! The model's structure and maths, independent of the fixture: parameter counts of the presets,
//! the seed layout against the official one, span semantics, a finite-difference gradient
//! check, and weights files (round trip and bad files).

use axial_common::{ModelConfig, ModelSpec, Span, Variant};
use axial_worker::Error;
use axial_worker::model::attention::{AttentionConfig, AxialAttention, Axis, Convention};
use axial_worker::model::{Model, cross_entropy};
use tch::{Device, Kind, Tensor, nn};

fn config(toml: &str) -> ModelConfig {
    ModelSpec::from_toml_document(&format!("[model]\n{toml}"), "test")
        .and_then(|s| s.resolve())
        .unwrap_or_else(|e| panic!("{toml}: {e}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Random values in every float variable (BN affine and running statistics too), so that
/// eval mode and every batch norm matter.
/// The tests of this file draw from libtorch's one global generator (seeded by `Model::new`
/// and `manual_seed`); they run one at a time, so that each one's draws are its own and the
/// same on every run (the finite-difference check failed once on inputs another test's
/// draws had shifted: a ReLU kink inside the difference step).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn randomize(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if !matches!(t.kind(), Kind::Float | Kind::Double) {
                continue;
            }
            let r = if name.ends_with("running_var") {
                t.rand_like() + 0.5
            } else {
                t.randn_like() * 0.5
            };
            t.copy_(&r);
        }
    });
}

#[test]
fn preset_parameter_counts_equal_the_reference() {
    let _rng = one_at_a_time();
    let cases: &[(&str, &str, i64)] = &[
        ("axial26s", "", 5_944_936),
        ("axial50s", "", 11_586_216),
        ("axial50m", "", 25_179_400),
        ("axial50l", "", 43_973_480),
        ("axial26s", "num_classes = 10\nimage_size = 32", 4_896_394),
        ("axial26s", "num_classes = 10\nimage_size = 64", 4_902_026),
        ("seed26", "", 10_930_440),
        ("seed50", "", 19_349_320),
        (
            "seed26",
            "attention = [false, false, true, true]",
            11_101_960,
        ),
        ("seed26", "num_classes = 10\nimage_size = 32", 8_877_354),
        ("resnet26", "", 13_696_552),
        ("resnet50", "", 25_557_032),
    ];
    for (arch, extra, want) in cases {
        let cfg = config(&format!("arch = \"{arch}\"\n{extra}"));
        let got = Model::new(&cfg, Device::Cpu, 0).parameter_count();
        println!("{arch} {extra:?}: {got}");
        assert_eq!(got, *want, "{arch} {extra:?}");
    }
}

fn layer(vs: &nn::VarStore, name: &str, cfg: AttentionConfig) -> AxialAttention {
    AxialAttention::new(&vs.root() / name, cfg)
}

fn attention_config(convention: Convention, span: i64, axis: Axis) -> AttentionConfig {
    AttentionConfig {
        in_planes: 16,
        out_planes: 32,
        heads: 4,
        span,
        axis,
        stride: 1,
        convention,
        output_bn: false,
    }
}

/// MODEL.md §2 row 6: official -> seed is "swap the q and k chunks of every head in the qkv
/// weight and its BN, flip the table". The seed layer must then compute the same function.
#[test]
fn seed_layer_with_converted_weights_equals_the_official_layer() {
    let _rng = one_at_a_time();
    tch::manual_seed(7);
    for axis in [Axis::Height, Axis::Width] {
        let vs_off = nn::VarStore::new(Device::Cpu);
        let off = layer(
            &vs_off,
            "l",
            attention_config(Convention::Official, 7, axis),
        );
        randomize(&vs_off);
        let vs_seed = nn::VarStore::new(Device::Cpu);
        let seed = layer(&vs_seed, "l", attention_config(Convention::Seed, 7, axis));
        let (g, gp) = (4, 8);
        let swap_qk = |t: &Tensor| {
            let rest: Vec<i64> = t.size()[1..].to_vec();
            let heads = t.view([&[g, 2 * gp][..], &rest].concat().as_slice());
            let parts = heads.split_with_sizes([gp / 2, gp / 2, gp], 1);
            Tensor::cat(&[&parts[1], &parts[0], &parts[2]], 1).view(t.size().as_slice())
        };
        let src = vs_off.variables();
        tch::no_grad(|| {
            for (name, mut dst) in vs_seed.variables() {
                let s = &src[&name];
                let converted =
                    if name.starts_with("l.qkv_transform") || name.starts_with("l.bn_qkv.") {
                        if s.dim() == 0 {
                            s.shallow_clone()
                        } else {
                            swap_qk(s)
                        }
                    } else if name == "l.relative" {
                        s.flip([1])
                    } else {
                        s.shallow_clone()
                    };
                dst.copy_(&converted);
            }
        });
        let x = Tensor::randn([2, 16, 7, 7], (Kind::Float, Device::Cpu));
        for train in [false, true] {
            let a = off.forward_t(&x, train, None);
            let b = seed.forward_t(&x, train, None);
            let err = max_abs_diff(&a, &b);
            println!("{axis:?} train={train}: max diff {err:.3e}");
            assert!(
                err <= 1e-6,
                "{axis:?} train={train}: seed and official differ by {err}"
            );
        }
        // A seed layer with the official weights unconverted computes something else.
        let vs_raw = nn::VarStore::new(Device::Cpu);
        let raw = layer(&vs_raw, "l", attention_config(Convention::Seed, 7, axis));
        tch::no_grad(|| {
            for (name, mut dst) in vs_raw.variables() {
                dst.copy_(&src[&name]);
            }
        });
        let err = max_abs_diff(
            &off.forward_t(&x, false, None),
            &raw.forward_t(&x, false, None),
        );
        assert!(err > 1e-3, "unconverted weights should differ (diff {err})");
    }
}

/// An axis shorter than the table uses its centre: identical to a layer whose table is exactly
/// that long.
#[test]
fn axis_shorter_than_the_span_equals_the_global_layer() {
    let _rng = one_at_a_time();
    tch::manual_seed(3);
    for convention in [Convention::Official, Convention::Seed] {
        let vs_wide = nn::VarStore::new(Device::Cpu);
        let wide = layer(&vs_wide, "l", attention_config(convention, 9, Axis::Height));
        randomize(&vs_wide);
        let vs_exact = nn::VarStore::new(Device::Cpu);
        let exact = layer(
            &vs_exact,
            "l",
            attention_config(convention, 5, Axis::Height),
        );
        let src = vs_wide.variables();
        tch::no_grad(|| {
            for (name, mut dst) in vs_exact.variables() {
                let s = &src[&name];
                // Table of K = 9 has 17 columns; its centre 9 (offsets -4..=4) are K = 5's.
                let s = if name == "l.relative" {
                    s.narrow(1, 4, 9)
                } else {
                    s.shallow_clone()
                };
                dst.copy_(&s);
            }
        });
        let x = Tensor::randn([2, 16, 5, 3], (Kind::Float, Device::Cpu));
        for train in [false, true] {
            let a = wide.forward_t(&x, train, None);
            let b = exact.forward_t(&x, train, None);
            assert!(
                a.equal(&b),
                "{convention:?} train={train}: differs by {}",
                max_abs_diff(&a, &b)
            );
        }
    }
}

#[test]
fn axis_longer_than_the_span_attends_within_the_window() {
    let _rng = one_at_a_time();
    tch::manual_seed(5);
    let span = 3;
    let cfg = config(&format!(
        "arch = \"axial26s\"\nwidth = 0.25\nnum_classes = 4\nimage_size = 64\nspan = {span}"
    ));
    assert_eq!(cfg.span, Span::Window(span));
    let model = Model::new(&cfg, Device::Cpu, 0);
    // A non-square input, larger than the span on both axes in the first stages.
    let x = Tensor::randn([2, 3, 64, 48], (Kind::Float, Device::Cpu));
    let (logits, maps) = tch::no_grad(|| model.net.forward_with_attention(&x, true));
    assert_eq!(logits.size(), [2, 4]);
    assert_eq!(maps.len(), model.net.attention_layers().len());
    let mut windowed = 0;
    for map in &maps {
        let len = *map.weights.size().last().expect("dims");
        let i = Tensor::arange(len, (Kind::Int64, Device::Cpu));
        let outside = (i.unsqueeze(1) - i.unsqueeze(0)).abs().gt(span - 1);
        let leaked = map.weights.masked_select(&outside.expand_as(&map.weights));
        if len > span {
            windowed += 1;
            let leaked_max = leaked.abs().max().double_value(&[]);
            assert_eq!(leaked_max, 0.0, "{}: weight outside the window", map.layer);
        }
        let rows = map.weights.sum_dim_intlist(-1, false, None);
        assert!(
            max_abs_diff(&rows, &rows.ones_like()) < 1e-5,
            "{}: rows must sum to 1",
            map.layer
        );
        assert!(!map.weights.requires_grad(), "attention maps are detached");
    }
    assert!(
        windowed >= 4,
        "the test must exercise windowed layers, saw {windowed}"
    );
    // Attention maps never become parameters.
    assert_eq!(
        model.vs.variables().len(),
        Model::new(&cfg, Device::Cpu, 0).vs.variables().len()
    );
}

#[test]
fn non_square_global_model_runs() {
    let _rng = one_at_a_time();
    let cfg = config("arch = \"axial26s\"\nwidth = 0.25\nnum_classes = 3\nimage_size = [32, 64]");
    let model = Model::new(&cfg, Device::Cpu, 0);
    let logits = model.net.forward_t(
        &Tensor::randn([2, 3, 32, 64], (Kind::Float, Device::Cpu)),
        true,
    );
    assert_eq!(logits.size(), [2, 3]);
}

/// Central differences in float64 against autograd, in train mode (batch statistics), on a tiny
/// network of each layout.
#[test]
fn gradients_match_finite_differences() {
    let _rng = one_at_a_time();
    for (variant, extra) in [
        ("official", "width = 0.125\nheads = 2"),
        (
            "seed",
            "width = 0.125\nheads = 2\nattention = [true, false, true, true]",
        ),
    ] {
        let cfg = config(&format!(
            "variant = \"{variant}\"\nlayers = [1, 1, 1, 1]\nnum_classes = 3\nimage_size = 32\nspan = 3\nzero_init_residual = false\n{extra}"
        ));
        let mut model = Model::new(&cfg, Device::Cpu, 11);
        model.vs.double();
        randomize(&model.vs);
        let x = Tensor::randn([3, 3, 32, 32], (Kind::Double, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 2, 1]);
        let loss_at = |model: &Model| {
            tch::no_grad(|| cross_entropy(&model.net.forward_t(&x, true), &y).double_value(&[]))
        };
        cross_entropy(&model.net.forward_t(&x, true), &y).backward();
        let vars = model.vs.variables();
        let mut names: Vec<&String> = vars.keys().filter(|n| vars[*n].requires_grad()).collect();
        names.sort();
        let mut checked = 0;
        let mut nonzero = 0;
        let h = 1e-6;
        for name in names.iter().filter(|n| {
            [
                "relative",
                "qkv_transform",
                "conv1.weight",
                "bn_similarity.weight",
                "fc.bias",
                "bn_output.bias",
                "conv2.weight",
            ]
            .iter()
            .any(|k| n.contains(k))
        }) {
            let var = &vars[*name];
            let grad = var.grad().flatten(0, -1);
            let flat = var.flatten(0, -1);
            let n = flat.size()[0];
            for idx in [0, n / 2, n - 1] {
                let orig = flat.double_value(&[idx]);
                let set = |v: f64| {
                    tch::no_grad(|| {
                        let _ = flat.get(idx).fill_(v);
                    })
                };
                set(orig + h);
                let up = loss_at(&model);
                set(orig - h);
                let down = loss_at(&model);
                set(orig);
                let numeric = (up - down) / (2.0 * h);
                let analytic = grad.double_value(&[idx]);
                // Relative error, with an absolute floor for gradients that are zero up to
                // round-off (a bias in front of a train-mode batch norm): there the central
                // difference is round-off over h, measured up to 1.6e-7 (the inputs are drawn
                // from the global generator, which tests running at the same time share).
                let err = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-2);
                assert!(
                    err < 1e-4,
                    "{variant} {name}[{idx}]: autograd {analytic:.8e} vs numeric {numeric:.8e}"
                );
                if analytic.abs() > 1e-3 {
                    nonzero += 1;
                }
                checked += 1;
            }
        }
        println!("{variant}: checked {checked} coordinates, {nonzero} with |gradient| > 1e-3");
        assert!(
            checked >= 30 && nonzero >= 15,
            "{variant}: only {checked} coordinates checked, {nonzero} non-zero"
        );
    }
}

fn all_equal(a: &Model, b: &Model) -> bool {
    let (sa, sb) = (a.state_dict(), b.state_dict());
    sa.len() == sb.len()
        && sa
            .iter()
            .zip(&sb)
            .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
}

#[test]
fn weights_round_trip_under_pytorch_names() {
    let _rng = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    for (arch, must_have) in [
        (
            "axial26s",
            &[
                "layer1.0.hight_block.relative",
                "layer1.0.hight_block.flatten_index",
                "layer4.0.width_block.bn_output.running_var",
                "layer2.0.conv_down.weight",
                "fc.bias",
            ][..],
        ),
        (
            "seed26",
            &[
                "layer1.0.height_block.rel_encoding",
                "layer1.0.height_block.kqv_conv.weight",
                "layer1.0.width_block.distance_matrix",
                "layer1.0.conv3.weight",
                "layer1.0.bn3.num_batches_tracked",
            ][..],
        ),
        (
            "resnet26",
            &[
                "layer1.0.conv2.weight",
                "layer2.0.downsample.1.running_mean",
            ][..],
        ),
    ] {
        let cfg = config(&format!(
            "arch = \"{arch}\"\nwidth = 0.25\nnum_classes = 5\nimage_size = 32"
        ));
        let a = Model::new(&cfg, Device::Cpu, 1);
        randomize(&a.vs);
        let path = dir.path().join(format!("{arch}.safetensors"));
        a.save_weights(&path).expect("save");
        let names: Vec<String> = Tensor::read_safetensors(&path)
            .expect("read")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for key in must_have {
            assert!(
                names.iter().any(|n| n == key),
                "{arch}: {key} not in the file"
            );
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("hight") && arch != "axial26s")
        );
        let b = Model::new(&cfg, Device::Cpu, 2);
        assert!(!all_equal(&a, &b));
        b.load_weights(&path).expect("load");
        assert!(
            all_equal(&a, &b),
            "{arch}: state differs after the round trip"
        );
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let (ya, yb) = tch::no_grad(|| (a.net.forward_t(&x, false), b.net.forward_t(&x, false)));
        assert!(ya.equal(&yb));
    }
}

#[test]
fn bad_weight_files_get_errors_that_list_every_problem() {
    let _rng = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config("arch = \"axial26s\"\nwidth = 0.25\nnum_classes = 5\nimage_size = 32");
    let model = Model::new(&cfg, Device::Cpu, 1);
    let before = model.state_dict();
    let unchanged = |m: &Model| {
        m.state_dict()
            .iter()
            .zip(&before)
            .all(|((_, a), (_, b))| a.equal(b))
    };

    // Not there; not safetensors.
    let err = model
        .load_weights(&dir.path().join("nope.safetensors"))
        .expect_err("missing file");
    assert!(matches!(err, Error::Read { .. }), "{err}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is not a safetensors file").expect("write");
    let err = model.load_weights(&junk).expect_err("junk");
    assert!(err.to_string().contains("junk.safetensors"), "{err}");

    // One missing, one unexpected, one mis-shaped, one wrong dtype, one wrong index buffer.
    let mut state = model.state_dict();
    state.retain(|(n, _)| n != "fc.bias");
    state.push((
        "layer9.0.conv.weight".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    for (n, t) in state.iter_mut() {
        match n.as_str() {
            "fc.weight" => *t = Tensor::zeros([5, 7], (Kind::Float, Device::Cpu)),
            "conv1.weight" => *t = t.to_kind(Kind::Int64),
            "layer1.0.hight_block.flatten_index" => *t = t.flip([0]),
            _ => {}
        }
    }
    let bad = dir.path().join("bad.safetensors");
    axial_worker::model::weights::write_tensors_atomic(&bad, &state).expect("write");
    let err = model.load_weights(&bad).expect_err("mismatch").to_string();
    println!("{err}");
    for needle in [
        "fc.bias",
        "layer9.0.conv.weight",
        "fc.weight",
        "[5, 7]",
        "conv1.weight",
        "layer1.0.hight_block.flatten_index",
    ] {
        assert!(err.contains(needle), "error does not name {needle}: {err}");
    }
    assert!(unchanged(&model), "a failed load must not change the model");

    // A seed checkpoint into an official model: the names say so.
    let seed = Model::new(
        &config("arch = \"seed26\"\nwidth = 0.25\nnum_classes = 5\nimage_size = 32"),
        Device::Cpu,
        1,
    );
    let seed_path = dir.path().join("seed.safetensors");
    seed.save_weights(&seed_path).expect("save");
    let err = model
        .load_weights(&seed_path)
        .expect_err("wrong layout")
        .to_string();
    assert!(
        err.contains("official layout") && err.contains("kqv_conv"),
        "{err}"
    );
    assert!(unchanged(&model));

    // A DDP-prefixed file loads.
    let prefixed: Vec<(String, Tensor)> = before
        .iter()
        .map(|(n, t)| (format!("module.{n}"), t.shallow_clone()))
        .collect();
    model
        .load_state_dict(prefixed)
        .expect("module. prefix is stripped");
    let _ = Variant::Official;
}
