//! Distributed training throughput on one machine: `--world N` processes (this binary started
//! again per rank) in a Gloo group on loopback, each with `--threads` intra-op threads and
//! `--batch` images, running the training loop's own step (`train::step::Step`: forward in
//! train mode with the attention norms synchronized as `--sync-bn` says, backward with the
//! gradient buckets all-reduced as it runs, SGD with Nesterov and weight decay, running
//! statistics averaged). `--world 1` is one process with no group: the scaling baseline.
//!
//! `cargo bench -p axial-worker --bench train_dist [-- --world 2 --threads 1 --batch 8
//!  --sizes 32,64 --sync-bn attention|none|all --iters 30 --warmup 5 --arch axial26s
//!  --fused-attention true]`
//!
//! Rank 0 prints one table row per size: the median step time over the ranks' slowest
//! (every rank waits for the others in the collectives), global images per second, and the
//! synchronized norms' share: their all-reduces per step, the time inside them per step, and
//! per all-reduce (most of it is waiting for the slower rank; the rest is the transport).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axial_common::ModelSpec;
use axial_common::job::SyncBn;
use axial_common::model::ImageSize;
use axial_worker::collective::ddp::{BUCKET_BYTES, broadcast_state};
use axial_worker::collective::reducer::Reducer;
use axial_worker::collective::{Backend, Local, ProcessGroup, Store};
use axial_worker::model::Model;
use axial_worker::model::batch_norm::SyncContext;
use axial_worker::train::recipe_sgd;
use axial_worker::train::step::{LossScale, Reduce, Step};
use tch::{Device, Kind, Tensor};

struct Args {
    world: usize,
    threads: i32,
    batch: i64,
    sizes: Vec<i64>,
    sync_bn: SyncBn,
    iters: usize,
    warmup: usize,
    arch: String,
    fused_attention: bool,
    /// Gradients summed over ranks: "overlapped" (the training loop's default), "after"
    /// backward, or "none" (each rank steps alone: the compute alone, for the breakdown).
    reduce: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        world: 2,
        threads: 1,
        batch: 8,
        sizes: vec![32, 64],
        sync_bn: SyncBn::Attention,
        iters: 30,
        warmup: 5,
        arch: "axial26s".into(),
        fused_attention: true,
        reduce: "overlapped".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--world" => a.world = value.parse().map_err(|e| bad(&e))?,
            "--threads" => a.threads = value.parse().map_err(|e| bad(&e))?,
            "--batch" => a.batch = value.parse().map_err(|e| bad(&e))?,
            "--sizes" => {
                a.sizes = value
                    .split(',')
                    .map(|s| s.parse().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            "--sync-bn" => {
                a.sync_bn = match value.as_str() {
                    "none" => SyncBn::None,
                    "attention" => SyncBn::Attention,
                    "all" => SyncBn::All,
                    _ => return Err(format!("--sync-bn {value}: none, attention or all")),
                }
            }
            "--iters" => a.iters = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => a.warmup = value.parse().map_err(|e| bad(&e))?,
            "--arch" => a.arch = value,
            "--fused-attention" => a.fused_attention = value.parse().map_err(|e| bad(&e))?,
            "--reduce" => {
                if !["overlapped", "after", "none"].contains(&value.as_str()) {
                    return Err(format!("--reduce {value}: overlapped, after or none"));
                }
                a.reduce = value
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.world == 0 || a.iters == 0 || a.batch < 1 {
        return Err("--world, --iters and --batch must be at least 1".into());
    }
    Ok(a)
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("train_dist bench: {e}");
    std::process::exit(1)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("train_dist bench: {e}");
        std::process::exit(2)
    });
    match std::env::var("AXIAL_BENCH_RANK") {
        Ok(rank) => rank_main(&args, rank.parse().unwrap_or_else(|e| fail(e))),
        Err(_) if args.world == 1 => rank_main(&args, 0),
        Err(_) => launch(&args),
    }
}

/// Starts every rank (rank 0 first: it hosts the store and prints its port) and relays rank
/// 0's table.
fn launch(args: &Args) {
    let exe = std::env::current_exe().unwrap_or_else(|e| fail(e));
    let spawn = |rank: usize, port: u16| {
        Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("AXIAL_BENCH_RANK", rank.to_string())
            .env("AXIAL_BENCH_PORT", port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| fail(e))
    };
    let mut r0 = spawn(0, 0);
    let mut lines = BufReader::new(r0.stdout.take().unwrap_or_else(|| fail("no stdout"))).lines();
    let port: u16 = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(p) = line.strip_prefix("AXIAL_PORT=") {
                    break p.trim().parse().unwrap_or_else(|e| fail(e));
                }
                println!("{line}");
            }
            _ => fail("rank 0 ended before printing its port"),
        }
    };
    let mut others: Vec<_> = (1..args.world).map(|r| spawn(r, port)).collect();
    for line in lines.map_while(Result::ok) {
        println!("{line}");
    }
    let mut ok = r0.wait().map(|s| s.success()).unwrap_or(false);
    for c in &mut others {
        ok &= c.wait().map(|s| s.success()).unwrap_or(false);
    }
    if !ok {
        fail("a rank failed");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rank_main(args: &Args, rank: usize) {
    axial_worker::keep_freed_memory();
    axial_worker::model::attention_core::set_enabled(args.fused_attention);
    tch::set_num_threads(args.threads);
    let group = (args.world > 1).then(|| {
        let port = std::env::var("AXIAL_BENCH_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let store = Store::new("127.0.0.1", port, rank, args.world, Duration::from_secs(60))
            .unwrap_or_else(|e| fail(e));
        if rank == 0 {
            println!("AXIAL_PORT={}", store.port());
        }
        Arc::new(
            ProcessGroup::new(
                &store,
                Backend::Gloo,
                &Local::Host("127.0.0.1".into()),
                Device::Cpu,
            )
            .unwrap_or_else(|e| fail(e)),
        )
    });
    if rank == 0 {
        println!(
            "{} | {} process(es) x {} thread(s) | batch {} per process | sync_bn {:?} | fused attention {} | gradients {} | median of {} after {} warm-up",
            args.arch,
            args.world,
            args.threads,
            args.batch,
            args.sync_bn,
            args.fused_attention,
            args.reduce,
            args.iters,
            args.warmup
        );
        println!(
            "| input | step ms | images/s | sync all-reduces/step | sync ms/step | us per sync all-reduce |"
        );
        println!("|---|---|---|---|---|---|");
    }
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
        let config = spec.resolve().unwrap_or_else(|e| fail(e));
        let model = Model::new(&config, Device::Cpu, 0);
        let mut opt = recipe_sgd(&model);
        let mut all: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let buffers: Vec<Tensor> = all
            .iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let mut sync = None;
        let mut reducer = None;
        if let Some(g) = &group {
            let state: Vec<Tensor> = all.iter().map(|(_, t)| t.shallow_clone()).collect();
            broadcast_state(g, &state).unwrap_or_else(|e| fail(e));
            if std::env::var("X_NOBUCKET").is_err() {
                opt.define_grads();
                opt.bucket_grads(BUCKET_BYTES);
            }
            let ctx = SyncContext::new(g.clone());
            model.net.set_sync_bn(Some(ctx.clone()), args.sync_bn);
            sync = (args.sync_bn != SyncBn::None).then_some(ctx);
            if std::env::var("X_NOREDUCER").is_err() {
                reducer = Some(
                    Reducer::new(g.clone(), &opt.params(), BUCKET_BYTES)
                        .unwrap_or_else(|e| fail(e)),
                );
            }
        }
        let step = Step {
            net: &model.net,
            device: Device::Cpu,
            autocast: false,
            label_smoothing: 0.0,
            reduce: match (&reducer, &group, args.reduce.as_str()) {
                (Some(r), Some(g), "overlapped") => Reduce::Overlapped(r, g),
                (_, Some(g), "after") => Reduce::AfterBackward(g),
                _ => Reduce::Local,
            },
            sync: sync.as_deref(),
            buffers: &buffers,
            graph: None,
        };
        tch::manual_seed(100 + rank as i64);
        let x = Tensor::randn([args.batch, 3, size, size], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [args.batch], (Kind::Int64, Device::Cpu));
        let global = (args.batch as usize * args.world) as f64;
        let mut times = Vec::with_capacity(args.iters);
        let (mut calls, mut waited) = (0u64, 0.0f64);
        for i in 0..args.warmup + args.iters {
            let (c0, w0) = group
                .as_ref()
                .map_or((0, 0.0), |g| (g.sync_calls(), g.sync_wait_seconds()));
            let t = Instant::now();
            let mut scale = LossScale::new(false);
            step.micro_batch(&x, &y, args.batch as usize, global, &scale, true, None)
                .and_then(|_| step.update(&mut opt, &mut scale, 0.0, 0.1, None))
                .unwrap_or_else(|e| fail(e));
            // The step of the slowest rank: the others waited for it.
            let each = Tensor::zeros([args.world as i64], (Kind::Double, Device::Cpu));
            let _ = each.get(rank as i64).fill_(t.elapsed().as_secs_f64());
            if let Some(g) = &group {
                g.allreduce_sum(std::slice::from_ref(&each))
                    .unwrap_or_else(|e| fail(e));
            }
            if i >= args.warmup {
                times.push(each.max().double_value(&[]));
                if let Some(g) = &group {
                    calls += g.sync_calls() - c0;
                    waited += g.sync_wait_seconds() - w0;
                }
            }
        }
        if rank == 0 {
            let ms = median(times) * 1e3;
            let n = args.iters as f64;
            let per_step = calls as f64 / n;
            println!(
                "| {size}x{size} | {ms:.1} | {:.1} | {per_step:.0} | {:.2} | {:.0} |",
                global / (ms / 1e3),
                waited * 1e3 / n,
                if calls > 0 {
                    waited * 1e6 / calls as f64
                } else {
                    0.0
                }
            );
        }
    }
}
