//! CPU (or CUDA) training throughput of the Axial-ResNet, measured as in
//! shared/reference/MODEL.md §7: axial26s with spans scaled to the input, 10 classes, batch 16,
//! float32, 2 intra-op threads, random data; a step is the training loop's own step
//! (`train::step::Step`: forward, cross-entropy, backward, update with SGD, Nesterov, weight
//! decay). 5 warm-up steps, then the median of 30.
//!
//! `cargo bench -p axial-worker --bench train_step [-- --sizes 32,64 --iters 30 --arch axial26s
//!  --batch 16 --threads 2 --device cpu --amp none|bf16|fp16 --cuda-graphs false|true
//!  --profile 0 --profile-shapes true --fused-attention true]`
//!
//! `--fused-attention false` runs the attention layers' core as separate ATen operations
//! instead of the fused CPU operator (model::attention_core), for an A/B in one binary.
//!
//! `--cuda-graphs true` (CUDA only) runs the step as `[train] cuda_graphs` does: the warm-up
//! steps include the passes before the capture, the timed ones replay the graph.
//!
//! `--profile N` then runs N more training steps under libtorch's operator profiler and prints
//! the 40 operators with the most self time per step, by name and input shapes
//! (`--profile-shapes false`: by name only; recording shapes slows element-wise operators
//! with a scalar argument several-fold).
//!
//! Columns: the median step and eval-forward times, and the process's peak RSS (VmHWM) after
//! the size's runs (run one size per process to compare it with another program's); on CUDA
//! also the allocator's peak.

use std::time::Instant;

use axial_common::ModelSpec;
use axial_common::job::Precision;
use axial_common::model::ImageSize;
use axial_worker::forward::parse_device;
use axial_worker::model::Model;
use axial_worker::train::graph::{GraphedStep, WARMUP_PASSES};
use axial_worker::train::recipe_sgd;
use axial_worker::train::step::{LossScale, Step};
use tch::{Device, Kind, Tensor};

struct Args {
    arch: String,
    sizes: Vec<i64>,
    batch: i64,
    iters: usize,
    warmup: usize,
    threads: i32,
    device: Device,
    amp: Precision,
    cuda_graphs: bool,
    profile: usize,
    profile_shapes: bool,
    fused_attention: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        arch: "axial26s".into(),
        sizes: vec![32, 64],
        batch: 16,
        iters: 30,
        warmup: 5,
        threads: 2,
        device: Device::Cpu,
        amp: Precision::Fp32,
        cuda_graphs: false,
        profile: 0,
        profile_shapes: true,
        fused_attention: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // passed by cargo bench
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--arch" => a.arch = value,
            "--sizes" => {
                a.sizes = value
                    .split(',')
                    .map(|s| s.parse().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            "--batch" => a.batch = value.parse().map_err(|e| bad(&e))?,
            "--iters" => a.iters = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => a.warmup = value.parse().map_err(|e| bad(&e))?,
            "--threads" => a.threads = value.parse().map_err(|e| bad(&e))?,
            "--device" => a.device = parse_device(&value)?,
            "--amp" => {
                a.amp = match value.as_str() {
                    "none" | "fp32" => Precision::Fp32,
                    "bf16" => Precision::Bf16,
                    "fp16" => Precision::Fp16,
                    _ => return Err(format!("--amp {value}: none, bf16 or fp16")),
                }
            }
            "--cuda-graphs" => a.cuda_graphs = value.parse().map_err(|e| bad(&e))?,
            "--profile" => a.profile = value.parse().map_err(|e| bad(&e))?,
            "--profile-shapes" => a.profile_shapes = value.parse().map_err(|e| bad(&e))?,
            "--fused-attention" => a.fused_attention = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.cuda_graphs && !a.device.is_cuda() {
        return Err("--cuda-graphs true needs a CUDA device (--device cuda)".into());
    }
    if a.cuda_graphs && a.warmup <= WARMUP_PASSES {
        return Err(format!(
            "--cuda-graphs true needs more than {WARMUP_PASSES} warm-up steps (the passes before the capture)"
        ));
    }
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    Ok(a)
}

fn median_ms(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2] * 1e3
}

/// The training loop's own step ([`Step`]) on one process: forward, loss, backward, update.
fn step(
    model: &Model,
    opt: &mut axial_worker::train::optim::Optimizer,
    x: &Tensor,
    y: &Tensor,
    amp: Precision,
    graph: Option<&GraphedStep>,
) -> axial_worker::Result<Option<Tensor>> {
    let mut step = Step::local(&model.net, x.device());
    step.autocast = amp != Precision::Fp32;
    step.graph = graph;
    let n = x.size()[0] as usize;
    // fp16 with its loss scale, as training runs it (a fresh scale per step: the bench times
    // the work, and an overflow would only skip the update).
    let mut scale = LossScale::new(amp == Precision::Fp16);
    let loss = step.micro_batch(x, y, n, n as f64, &scale, true, None)?;
    step.update(opt, &mut scale, 0.0, 0.1, None)?;
    Ok(loss)
}

/// The process's peak resident set (VmHWM), MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("train_step bench: {e}");
            std::process::exit(2);
        }
    };
    axial_worker::keep_freed_memory();
    axial_worker::model::attention_core::set_enabled(args.fused_attention);
    tch::set_num_threads(args.threads);
    if args.amp != Precision::Fp32 {
        if !args.device.is_cuda() {
            eprintln!("train_step bench: --amp needs a CUDA device");
            std::process::exit(2);
        }
        if let Err(e) = axial_worker::train::precision::set_autocast_dtype(args.amp) {
            eprintln!("train_step bench: {e}");
            std::process::exit(1);
        }
    }
    println!(
        "{} | batch {} | {} threads | {:?} | {:?}{} | median of {} after {} warm-up",
        args.arch,
        args.batch,
        args.threads,
        args.device,
        args.amp,
        if args.cuda_graphs {
            " | CUDA graphs"
        } else {
            ""
        },
        args.iters,
        args.warmup
    );
    println!(
        "| input | params | train step ms | train images/s | eval forward images/s | peak RSS MB | peak GPU MB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &size in &args.sizes {
        let spec = ModelSpec {
            arch: Some(args.arch.clone()),
            num_classes: Some(10),
            image_size: Some(ImageSize {
                height: size,
                width: size,
            }),
            ..ModelSpec::default()
        };
        let config = match spec.resolve() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("train_step bench: {e}");
                std::process::exit(2);
            }
        };
        let model = Model::new(&config, args.device, 0);
        let mut opt = recipe_sgd(&model);
        let x = Tensor::randn([args.batch, 3, size, size], (Kind::Float, args.device));
        let y = Tensor::randint(10, [args.batch], (Kind::Int64, args.device));
        let graph = match args.cuda_graphs {
            true => {
                match GraphedStep::new(
                    args.device,
                    args.batch,
                    model.vs.variables().into_values().collect(),
                ) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        eprintln!("train_step bench: {e}");
                        std::process::exit(1);
                    }
                }
            }
            false => None,
        };
        if graph.is_some() {
            opt.keep_grads_in_place();
        }
        let mut train = Vec::with_capacity(args.iters);
        for i in 0..args.warmup + args.iters {
            let t = Instant::now();
            let loss = match step(&model, &mut opt, &x, &y, args.amp, graph.as_ref()) {
                Ok(loss) => loss,
                Err(e) => {
                    eprintln!("train_step bench: {e}");
                    std::process::exit(1);
                }
            };
            sync(args.device);
            if i >= args.warmup {
                train.push(t.elapsed().as_secs_f64());
            }
            drop(loss);
        }
        let mut eval = Vec::with_capacity(args.iters);
        tch::no_grad(|| {
            for i in 0..args.warmup + args.iters {
                let t = Instant::now();
                let _ = tch::autocast(args.amp != Precision::Fp32, || {
                    model.net.forward_t(&x, false)
                });
                sync(args.device);
                if i >= args.warmup {
                    eval.push(t.elapsed().as_secs_f64());
                }
            }
        });
        let (train_ms, eval_ms) = (median_ms(train), median_ms(eval));
        let per_s = |ms: f64| args.batch as f64 / (ms / 1e3);
        let gpu = match args.device {
            Device::Cuda(i) => axial_worker::metrics::cuda_memory(i)
                .map(|m| format!("{:.0}", m.peak_allocated as f64 / 1048576.0))
                .unwrap_or_else(|e| e),
            _ => "-".into(),
        };
        println!(
            "| {size}x{size} | {} | {train_ms:.1} | {:.1} | {:.1} | {:.0} | {gpu} |",
            model.parameter_count(),
            per_s(train_ms),
            per_s(eval_ms),
            peak_rss_mb()
        );
        if args.profile > 0
            && let Err(e) = profile(&args, &model, &mut opt, &x, &y, graph.as_ref())
        {
            eprintln!("train_step bench: --profile: {e}");
            std::process::exit(1);
        }
    }
}

/// `--profile N`: N training steps under the operator profiler; the top operators by self time.
fn profile(
    args: &Args,
    model: &Model,
    opt: &mut axial_worker::train::optim::Optimizer,
    x: &Tensor,
    y: &Tensor,
    graph: Option<&GraphedStep>,
) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("axial-bench-profile-{}.tsv", std::process::id()));
    axial_worker::profile::start(args.profile_shapes)?;
    let t = Instant::now();
    for _ in 0..args.profile {
        step(model, opt, x, y, args.amp, graph).map_err(|e| e.to_string())?;
        sync(args.device);
    }
    let wall = t.elapsed().as_secs_f64() * 1e3 / args.profile as f64;
    axial_worker::profile::stop(&path)?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    let rows = axial_worker::profile::summary(&text)?;
    let per_step = |ns: u64| ns as f64 / 1e6 / args.profile as f64;
    let total: f64 = rows.iter().map(|r| per_step(r.self_ns)).sum();
    println!(
        "\nprofile: {} steps, {wall:.1} ms/step under the profiler, {total:.1} ms/step of operator self time",
        args.profile
    );
    println!("| self ms/step | % | calls/step | operator | input shapes |");
    println!("|---|---|---|---|---|");
    for r in rows.iter().take(40) {
        let ms = per_step(r.self_ns);
        println!(
            "| {ms:.2} | {:.1} | {} | {} | {} |",
            100.0 * ms / total,
            r.calls / args.profile,
            r.name,
            r.shapes
        );
    }
    Ok(())
}
