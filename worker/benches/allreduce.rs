//! Gradient all-reduce across 2 local processes (Gloo over loopback, through libtorch c10d):
//! the bucketed DDP path (~25 MB buckets, reverse parameter order; gradients as separate
//! tensors, and as training places them, in their bucket's storage) against one all-reduce of
//! a flat buffer of the same size, for the gradients of axial26s and axial50s
//! (224 px, 1000 classes), and the share of a training step it would take. Then whole
//! data-parallel steps on both ranks (64 px, batch 16 per rank, synchronized attention batch
//! norm), with the gradient all-reduce after backward against overlapped with it (hooks).
//!
//! `cargo bench -p axial-worker --bench allreduce [-- --iters 10]`
//!
//! The bench spawns itself as rank 1 (AXIAL_BENCH_RANK), so both ranks run the same code. Both
//! ranks use one intra-op thread (two processes share the two cores), the step time too.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axial_common::ModelConfig;
use axial_common::job::SyncBn;
use axial_worker::collective::ddp::{BUCKET_BYTES, allreduce_gradients, buckets, into_buckets};
use axial_worker::collective::reducer::Reducer;
use axial_worker::collective::{Local, ProcessGroup, Store};
use axial_worker::model::batch_norm::SyncContext;
use axial_worker::model::{Model, cross_entropy};
use axial_worker::train::{recipe_sgd, train_step};
use tch::{Device, Kind, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn grads_like(arch: &str) -> Vec<Tensor> {
    let Ok(cfg) = ModelConfig::preset(arch) else {
        eprintln!("allreduce bench: unknown preset {arch}");
        std::process::exit(2);
    };
    let model = Model::new(&cfg, Device::Cpu, 0);
    let mut vars: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.iter().map(|(_, t)| t.detach().randn_like()).collect()
}

fn run(rank: usize, port: u16, iters: usize) {
    let store = match Store::new("127.0.0.1", port, rank, 2, Duration::from_secs(60)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("allreduce bench: {e}");
            std::process::exit(1);
        }
    };
    if rank == 0 {
        println!("AXIAL_PORT={}", store.port());
        let child = Command::new(std::env::current_exe().expect("exe"))
            .args(std::env::args().skip(1))
            .env("AXIAL_BENCH_RANK", "1")
            .env("AXIAL_BENCH_PORT", store.port().to_string())
            .stdout(Stdio::null())
            .spawn();
        if let Err(e) = child {
            eprintln!("allreduce bench: cannot start rank 1: {e}");
            std::process::exit(1);
        }
    }
    let pg = std::sync::Arc::new(
        ProcessGroup::gloo(&store, &Local::Host("127.0.0.1".into())).unwrap_or_else(|e| {
            eprintln!("allreduce bench: {e}");
            std::process::exit(1);
        }),
    );
    if rank == 0 {
        println!("2 processes, Gloo over loopback, median of {iters}");
        println!(
            "| model | gradient MB | buckets | bucketed, separate tensors ms | bucketed, in bucket storage ms | bucketed GB/s | flat ms | flat GB/s | bucketed / flat | train step ms (64 px, b16) | all-reduce share |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for arch in ["axial26s", "axial50s"] {
        let grads = grads_like(arch);
        let bytes: usize = grads.iter().map(|t| t.numel() * 4).sum();
        let flat = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
        // As training places them (Optimizer::bucket_grads): in their bucket's storage.
        let placed: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
        into_buckets(&placed, BUCKET_BYTES);
        let mut separate = Vec::new();
        let mut bucketed = Vec::new();
        let mut raw = Vec::new();
        for i in 0..iters + 2 {
            let _ = pg.barrier();
            let t = Instant::now();
            if let Err(e) = allreduce_gradients(&pg, &grads, BUCKET_BYTES) {
                eprintln!("allreduce bench: {e}");
                std::process::exit(1);
            }
            let s = t.elapsed().as_secs_f64();
            let _ = pg.barrier();
            let t = Instant::now();
            if let Err(e) = allreduce_gradients(&pg, &placed, BUCKET_BYTES) {
                eprintln!("allreduce bench: {e}");
                std::process::exit(1);
            }
            let b = t.elapsed().as_secs_f64();
            let _ = pg.barrier();
            let t = Instant::now();
            if let Err(e) = pg.allreduce_sum(std::slice::from_ref(&flat)) {
                eprintln!("allreduce bench: {e}");
                std::process::exit(1);
            }
            let f = t.elapsed().as_secs_f64();
            if i >= 2 {
                separate.push(s);
                bucketed.push(b);
                raw.push(f);
            }
        }
        // The step it would be part of (rank 0 only; rank 1 waits at the barrier).
        let step_ms = if rank == 0 {
            let mut cfg = ModelConfig::preset(arch).expect("preset");
            cfg.num_classes = 10;
            cfg.image_size = axial_common::model::ImageSize {
                height: 64,
                width: 64,
            };
            let model = Model::new(&cfg, Device::Cpu, 0);
            let mut opt = recipe_sgd(&model);
            let x = Tensor::randn([16, 3, 64, 64], (Kind::Float, Device::Cpu));
            let y = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
            let times: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let _ = train_step(&model.net, &mut opt, &x, &y, 0.1);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            median(times) * 1e3
        } else {
            0.0
        };
        let _ = pg.barrier();
        if rank == 0 {
            let (s, b, f) = (median(separate), median(bucketed), median(raw));
            let gb = bytes as f64 / 1e9;
            println!(
                "| {arch} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2}x | {step_ms:.0} | {:.0}% |",
                bytes as f64 / 1e6,
                buckets(&grads, BUCKET_BYTES).len(),
                s * 1e3,
                b * 1e3,
                gb / b,
                f * 1e3,
                gb / f,
                b / f,
                100.0 * b * 1e3 / (step_ms + b * 1e3)
            );
        }
    }
    overlap_table(&pg, rank, iters.min(6));
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("allreduce bench: {e}");
    std::process::exit(1)
}

/// Whole data-parallel steps on both ranks: all-reduce after backward vs overlapped.
fn overlap_table(pg: &std::sync::Arc<ProcessGroup>, rank: usize, iters: usize) {
    if rank == 0 {
        println!();
        println!(
            "Data-parallel step on 2 ranks (64 px, batch 16 per rank, SyncBN attention, SGD), median of {iters}"
        );
        println!(
            "| model | all-reduce after backward, step ms | overlapped, step ms | buckets started during backward | difference |"
        );
        println!("|---|---|---|---|---|");
    }
    for arch in ["axial26s", "axial50s"] {
        let mut cfg = ModelConfig::preset(arch).unwrap_or_else(|e| fail(e));
        cfg.num_classes = 10;
        cfg.image_size = axial_common::model::ImageSize {
            height: 64,
            width: 64,
        };
        let model = Model::new(&cfg, Device::Cpu, 0);
        model
            .net
            .set_sync_bn(Some(SyncContext::new(pg.clone())), SyncBn::Attention);
        let mut opt = recipe_sgd(&model);
        opt.define_grads();
        opt.bucket_grads(BUCKET_BYTES);
        let reducer =
            Reducer::new(pg.clone(), &opt.params(), BUCKET_BYTES).unwrap_or_else(|e| fail(e));
        tch::manual_seed(rank as i64);
        let x = Tensor::randn([16, 3, 64, 64], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
        let mut step = |overlap: bool| {
            opt.zero_grad();
            if overlap {
                reducer.arm();
            }
            cross_entropy(&model.net.forward_t(&x, true), &y).backward();
            if overlap {
                reducer.finish().unwrap_or_else(|e| fail(e));
            } else {
                allreduce_gradients(pg, &opt.grads(), BUCKET_BYTES).unwrap_or_else(|e| fail(e));
            }
            opt.step(0.01);
        };
        let (mut after, mut overlapped) = (Vec::new(), Vec::new());
        for i in 0..iters + 1 {
            let _ = pg.barrier();
            let t = Instant::now();
            step(false);
            let a = t.elapsed().as_secs_f64();
            let _ = pg.barrier();
            let t = Instant::now();
            step(true);
            let o = t.elapsed().as_secs_f64();
            if i >= 1 {
                after.push(a);
                overlapped.push(o);
            }
        }
        if rank == 0 {
            let (a, o) = (median(after) * 1e3, median(overlapped) * 1e3);
            let (early, total) = reducer.overlapped();
            println!(
                "| {arch} | {a:.0} | {o:.0} | {early} of {total} | {:+.1}% |",
                100.0 * (o - a) / a
            );
        }
    }
}

fn main() {
    let iters: usize = std::env::args()
        .skip_while(|a| a != "--iters")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    tch::set_num_threads(1);
    match std::env::var("AXIAL_BENCH_RANK")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
    {
        Some(rank) => {
            let port = std::env::var("AXIAL_BENCH_PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            run(rank, port, iters)
        }
        None => run(0, 0, iters),
    }
}
