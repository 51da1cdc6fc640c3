//! GPU: mixed precision that really computes in the low dtype, fp16's loss scale at work, and
//! the CUDA-graph capture of the training step.
//! Compiled always; each test skips, saying why, without a CUDA device (scripts/gpu-check.sh
//! runs them where one is).

use axial_common::ModelSpec;
use axial_common::job::Precision;
use axial_worker::model::Model;
use axial_worker::train::graph::GraphedStep;
use axial_worker::train::optim::Optimizer;
use axial_worker::train::precision::set_autocast_dtype;
use axial_worker::train::step::{LossScale, Step};
use tch::{Device, Kind, Tensor};

/// The GPU tests one at a time: a CUDA-graph capture (global capture mode) fails when another
/// thread calls into CUDA meanwhile.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny_model_on(device: Device) -> Model {
    let cfg = ModelSpec::from_toml_document(
        "[model]\nvariant = \"official\"\nlayers = [1, 1, 1, 1]\nwidth = 0.125\nnum_classes = 10\nimage_size = 32\n",
        "test",
    )
    .and_then(|s| s.resolve())
    .expect("config");
    Model::new(&cfg, device, 1)
}

/// bf16 and fp16 autocast: the logits come out in that dtype (the convolutions and matmuls ran
/// in it), while the weights stay float32; without autocast, float32.
#[test]
fn gpu_autocast_computes_in_the_low_precision_dtype() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cuda(0);
    let model = tiny_model_on(dev);
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, dev));
    for (precision, kind) in [
        (Precision::Bf16, Kind::BFloat16),
        (Precision::Fp16, Kind::Half),
    ] {
        set_autocast_dtype(precision).expect("autocast dtype");
        let logits = tch::autocast(true, || model.net.forward_t(&x, true));
        println!("{precision:?}: logits {:?}", logits.kind());
        assert_eq!(logits.kind(), kind, "{precision:?}");
    }
    let plain = model.net.forward_t(&x, true);
    assert_eq!(plain.kind(), Kind::Float);
    assert!(
        model
            .vs
            .variables()
            .values()
            .all(|t| t.kind() == Kind::Float)
    );
}

/// fp16 with the training step's loss scale: a scale so large that the half-precision
/// backward overflows makes the step skip its update and halve the scale; at the usual
/// 2^16 the steps go through and the weights stay finite.
#[test]
fn gpu_fp16_loss_scale_moves_on_overflow() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set_autocast_dtype(Precision::Fp16).expect("fp16");
    let dev = Device::Cuda(0);
    let model = tiny_model_on(dev);
    let mut opt = Optimizer::new(&Default::default(), model.named_parameters());
    let mut step = Step::local(&model.net, dev);
    step.autocast = true;
    let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, dev));
    let y = Tensor::randint(10, [8], (Kind::Int64, dev));
    let mut scale = LossScale::new(true);
    scale.scale = 2f64.powi(100);
    step.micro_batch(&x, &y, 8, 8.0, &scale, true, None)
        .expect("micro-batch");
    let stepped = step
        .update(&mut opt, &mut scale, 0.0, 0.1, None)
        .expect("update");
    println!(
        "scale 2^100: stepped {stepped}, scale now 2^{}",
        scale.scale.log2()
    );
    assert!(!stepped, "an overflowing fp16 step must be skipped");
    assert_eq!(scale.scale, 2f64.powi(99), "the scale halves on overflow");
    let mut scale = LossScale::new(true);
    let mut stepped = 0;
    for _ in 0..4 {
        step.micro_batch(&x, &y, 8, 8.0, &scale, true, None)
            .expect("micro-batch");
        stepped += usize::from(
            step.update(&mut opt, &mut scale, 0.0, 0.1, None)
                .expect("update"),
        );
    }
    println!(
        "scale 2^16: {stepped} of 4 steps taken, scale now {}",
        scale.scale
    );
    assert!(stepped >= 1, "no fp16 step went through at 2^16");
    assert!(
        model
            .vs
            .variables()
            .values()
            .all(|t| t.isfinite().all().int64_value(&[]) == 1)
    );
}

/// `[train] cuda_graphs`: the captured step computes what the uncaptured one does. Two models
/// from one seed take the same steps, one through [`GraphedStep`] (3 warm-up passes, the
/// capture, replays; a short batch in between runs uncaptured; the gradients moved into
/// bucket storage make it capture again), the other as usual: the losses and the weights
/// agree, to float rounding of the GPU's kernels.
#[test]
fn gpu_cuda_graph_step_matches_the_uncaptured_step() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cuda(0);
    let plain = tiny_model_on(dev);
    let graphed = tiny_model_on(dev);
    let mut opt_plain = Optimizer::new(&Default::default(), plain.named_parameters());
    let mut opt_graphed = Optimizer::new(&Default::default(), graphed.named_parameters());
    let watched = graphed.vs.variables().into_values().collect();
    let graph = GraphedStep::new(dev, 8, watched).expect("a CUDA graph");
    let mut step = Step::local(&graphed.net, dev);
    step.graph = Some(&graph);
    let eager = Step::local(&plain.net, dev);
    tch::manual_seed(7);
    let mut worst = 0f64;
    for i in 0..10 {
        if i == 7 {
            // A group forms: the gradients move into their buckets, on both models.
            opt_plain.define_grads();
            opt_plain.bucket_grads(1 << 20);
            opt_graphed.define_grads();
            opt_graphed.bucket_grads(1 << 20);
        }
        let n = if i == 5 { 3 } else { 8 };
        let x = Tensor::randn([n, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [n], (Kind::Int64, Device::Cpu));
        let mut losses = Vec::new();
        for (s, opt) in [(&eager, &mut opt_plain), (&step, &mut opt_graphed)] {
            let mut scale = LossScale::new(false);
            let loss = s
                .micro_batch(&x, &y, n as usize, n as f64, &scale, true, None)
                .expect("micro-batch")
                .expect("a loss");
            s.update(opt, &mut scale, 0.0, 0.05, None).expect("update");
            losses.push(loss.double_value(&[]));
        }
        let diff = (losses[0] - losses[1]).abs();
        println!(
            "step {i} (batch {n}, captures {}): loss {:.6} vs {:.6}, diff {diff:.2e}",
            graph.captures(),
            losses[0],
            losses[1]
        );
        assert!(diff <= 1e-4 * losses[0].abs().max(1.0), "step {i}");
        worst = worst.max(diff);
    }
    assert_eq!(
        graph.captures(),
        2,
        "captured once warm, again after the gradients moved"
    );
    let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
    assert!(graph.replays(&x), "a full batch replays");
    assert!(!graph.replays(&x.narrow(0, 0, 3)), "a short one does not");
    let a = plain.vs.variables();
    let b = graphed.vs.variables();
    let mut max = 0f64;
    for (name, t) in &a {
        let d = (t - &b[name]).abs().max().double_value(&[]);
        max = max.max(d);
    }
    println!("weights after 10 steps: max difference {max:.2e}; worst loss difference {worst:.2e}");
    assert!(max <= 1e-4, "weights differ by {max}");
}
