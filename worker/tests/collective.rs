//! Collectives across processes on loopback (Gloo through libtorch's c10d): every test spawns
//! this test binary again as rank 0 and rank 1 (`AXIAL_CHILD_*` variables select the part a
//! child plays), and checks what the ranks wrote.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use axial_common::ModelSpec;
use axial_common::job::SyncBn;
use axial_worker::collective::ddp::{
    BUCKET_BYTES, allreduce_gradients, average_buffers, broadcast_state,
};
use axial_worker::collective::{
    Backend, KeyValue, KvOp, KvReply, Local, ProcessGroup, Store, nccl_compiled,
};
use axial_worker::model::batch_norm::SyncContext;
use axial_worker::model::{Model, cross_entropy};
use axial_worker::train::optim::Optimizer;
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(5);

struct Child_ {
    rank: usize,
    port: u16,
    out: PathBuf,
}

/// In a child: which rank it plays, the store port, where to write.
fn child() -> Option<Child_> {
    let rank = std::env::var("AXIAL_CHILD_RANK").ok()?.parse().ok()?;
    let port = std::env::var("AXIAL_CHILD_PORT").ok()?.parse().ok()?;
    let out = PathBuf::from(std::env::var("AXIAL_CHILD_OUT").ok()?);
    Some(Child_ { rank, port, out })
}

fn spawn(test: &str, rank: usize, port: u16, out: &Path, env: &[(&str, &str)]) -> Child {
    Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .envs(env.iter().copied())
        .env("AXIAL_CHILD_RANK", rank.to_string())
        .env("AXIAL_CHILD_PORT", port.to_string())
        .env("AXIAL_CHILD_OUT", out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Starts rank 0 (which picks the store port and prints it), then rank 1; waits for both.
fn run_pair(test: &str) -> PathBuf {
    run_pair_with(test, &[])
}

/// [`run_pair`] with extra environment for both ranks (`AXIAL_SHM=0`: sums over Gloo).
fn run_pair_with(test: &str, env: &[(&str, &str)]) -> PathBuf {
    let out = tempfile::tempdir().expect("tempdir").keep();
    let mut r0 = spawn(test, 0, 0, &out, env);
    let mut lines = BufReader::new(r0.stdout.take().expect("stdout")).lines();
    let port: u16 = loop {
        let line = lines
            .next()
            .expect("rank 0 ended before printing its port")
            .expect("line");
        // libtest may have printed "test name ... " on the same line first.
        if let Some(at) = line.find("AXIAL_PORT=") {
            break line[at + "AXIAL_PORT=".len()..]
                .trim()
                .parse()
                .expect("port");
        }
    };
    let mut r1 = spawn(test, 1, port, &out, env);
    let deadline = Instant::now() + Duration::from_secs(90);
    for (rank, c) in [(0, &mut r0), (1, &mut r1)] {
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                assert!(status.success(), "rank {rank} of {test} failed: {status}");
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("rank {rank} of {test} hung");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::spawn(move || for _ in lines {});
    out
}

fn join(c: &Child_) -> ProcessGroup {
    join_with(c, Backend::Gloo)
}

fn join_with(c: &Child_, backend: Backend) -> ProcessGroup {
    let store = Store::new("127.0.0.1", c.port, c.rank, 2, TIMEOUT).expect("store");
    if c.rank == 0 {
        println!("AXIAL_PORT={}", store.port());
    }
    ProcessGroup::new(
        &store,
        backend,
        &Local::Host("127.0.0.1".into()),
        Device::Cuda(0),
    )
    .expect("join the group")
}

#[test]
fn allreduce_and_broadcast_across_two_processes() {
    if let Some(c) = child() {
        let pg = join(&c);
        let a = Tensor::full([4], (c.rank + 1) as f64, (Kind::Float, Device::Cpu));
        let b = Tensor::full([1_000_000], c.rank as f64, (Kind::Float, Device::Cpu));
        pg.allreduce_sum(&[a.shallow_clone(), b.shallow_clone()])
            .expect("all-reduce");
        assert_eq!(Vec::<f32>::try_from(&a).expect("vec"), vec![3.0; 4]);
        assert_eq!(b.sum(Kind::Double).double_value(&[]), 1_000_000.0);
        let x = Tensor::full([3], (10 * c.rank) as f64 + 7.0, (Kind::Float, Device::Cpu));
        pg.broadcast(&x, 0).expect("broadcast");
        assert_eq!(Vec::<f32>::try_from(&x).expect("vec"), vec![7.0; 3]);
        pg.barrier().expect("barrier");
        std::fs::write(c.out.join(format!("ok{}", c.rank)), "ok").expect("write");
        return;
    }
    let out = run_pair("allreduce_and_broadcast_across_two_processes");
    assert!(out.join("ok0").exists() && out.join("ok1").exists());
}

fn tiny_model(seed: i64) -> Model {
    tiny_model_on(seed, Device::Cpu)
}

fn tiny_model_on(seed: i64, device: Device) -> Model {
    let cfg = ModelSpec::from_toml_document(
        "[model]\nvariant = \"official\"\nlayers = [1, 1, 1, 1]\nwidth = 0.125\nnum_classes = 10\nimage_size = 32\nzero_init_residual = false\n",
        "test",
    )
    .and_then(|s| s.resolve())
    .expect("config");
    Model::new(&cfg, device, seed)
}

fn params(model: &Model) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// DDP: different initial weights and different data on each rank; after rank 0's state is
/// broadcast and a few steps with all-reduced gradients, every weight, buffer and optimizer
/// state is bit-identical on both ranks. Rank 0 has 5 samples a step, rank 1 has 3.
#[test]
fn replicas_stay_bit_identical() {
    if let Some(c) = child() {
        let pg = Arc::new(join(&c));
        let model = tiny_model(100 + c.rank as i64);
        model
            .net
            .set_sync_bn(Some(SyncContext::new(pg.clone())), SyncBn::Attention);
        let mut all: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        broadcast_state(
            &pg,
            &all.iter()
                .map(|(_, t)| t.shallow_clone())
                .collect::<Vec<_>>(),
        )
        .expect("broadcast");
        let mut opt = Optimizer::new(&Default::default(), params(&model));
        let buffers: Vec<Tensor> = all
            .iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(_, t)| t.shallow_clone())
            .collect();
        tch::manual_seed(7 + c.rank as i64);
        let (local, global) = ([5i64, 3][c.rank], 8.0);
        for _ in 0..3 {
            let x = Tensor::randn([local, 3, 32, 32], (Kind::Float, Device::Cpu));
            let y = Tensor::randint(10, [local], (Kind::Int64, Device::Cpu));
            let loss = cross_entropy(&model.net.forward_t(&x, true), &y) * (local as f64 / global);
            opt.zero_grad();
            loss.backward();
            allreduce_gradients(&pg, &opt.grads(), BUCKET_BYTES).expect("gradients");
            opt.step(0.05);
            average_buffers(&pg, &buffers).expect("buffers");
        }
        let mut state = model.state_dict();
        state.extend(opt.state_tensors());
        Tensor::write_safetensors(&state, c.out.join(format!("rank{}.safetensors", c.rank)))
            .expect("write");
        return;
    }
    let out = run_pair("replicas_stay_bit_identical");
    let a = std::fs::read(out.join("rank0.safetensors")).expect("rank 0 state");
    let b = std::fs::read(out.join("rank1.safetensors")).expect("rank 1 state");
    let n = Tensor::read_safetensors(out.join("rank0.safetensors"))
        .expect("read")
        .len();
    println!(
        "{n} tensors (weights, buffers, momentum), {} bytes: identical = {}",
        a.len(),
        a == b
    );
    assert!(n > 100);
    assert!(a == b, "replicas differ after 3 steps");
}

/// An uneven step (3 samples on rank 0, 1 on rank 1) gives exactly the gradient of the mean
/// loss over all 4 samples, as one process computes it.
#[test]
fn uneven_step_gives_the_exact_global_mean_gradient() {
    if let Some(c) = child() {
        let pg = join(&c);
        let model = tiny_model(5);
        let mut g = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        tch::manual_seed(11);
        g = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)) + g.zeros_like();
        let y = Tensor::from_slice(&[1i64, 4, 7, 2]);
        // Eval-mode batch norm: each sample's loss is independent of the others.
        let full = cross_entropy(&model.net.forward_t(&g, false), &y);
        let p = params(&model);
        let reference: Vec<Tensor> = Tensor::run_backward(
            &[full],
            &p.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>(),
            false,
            false,
        );
        let (from, n) = [(0, 3), (3, 1)][c.rank];
        let loss = cross_entropy(
            &model.net.forward_t(&g.narrow(0, from, n), false),
            &y.narrow(0, from, n),
        ) * (n as f64 / 4.0);
        let opt = Optimizer::new(&Default::default(), p);
        opt.zero_grad();
        loss.backward();
        let grads = opt.grads();
        allreduce_gradients(&pg, &grads, 1 << 16).expect("gradients"); // small buckets: several
        // Relative to each tensor's scale, floored at 1e-3 of the largest gradient: some
        // gradients are zero up to round-off (a bias in front of a softmax).
        let global = reference
            .iter()
            .map(|t| t.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        let mut worst = 0f64;
        for (ours, want) in grads.iter().zip(&reference) {
            let scale = want.abs().max().double_value(&[]).max(1e-3 * global);
            worst = worst.max((ours - want).abs().max().double_value(&[]) / scale);
        }
        std::fs::write(c.out.join(format!("err{}", c.rank)), worst.to_string()).expect("write");
        return;
    }
    let out = run_pair("uneven_step_gives_the_exact_global_mean_gradient");
    for r in 0..2 {
        let e: f64 = std::fs::read_to_string(out.join(format!("err{r}")))
            .expect("err")
            .parse()
            .expect("f64");
        println!("rank {r}: worst relative gradient error {e:.2e}");
        assert!(e < 1e-4, "rank {r}: {e}");
    }
}

/// The batch split by speed (`[train] rebalance`): one training step (the loop's `Step`,
/// synchronized batch norm everywhere) with rank 0 on 6 samples and rank 1 on 2 updates the
/// weights as the even 4 + 4 split does, and the synchronized norms' time is counted apart.
/// (With the norms' sums accumulated in float32 this split differed by 2.5e-3 of the largest
/// update: E[x^2] - E[x]^2 cancels; they are accumulated in float64.)
#[test]
fn a_step_split_by_shares_equals_the_even_split() {
    use axial_common::plan::StepPlan;
    use axial_worker::train::step::{LossScale, Reduce, Step};
    if let Some(c) = child() {
        let pg = Arc::new(join(&c));
        let ctx = SyncContext::new(pg.clone());
        tch::manual_seed(31);
        let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
        let even = StepPlan::even(0, 2, 4, 8);
        let mut updates = Vec::new();
        for plan in [even.clone(), even.with_shares(&[6, 2]).expect("shares")] {
            let model = tiny_model(5);
            model.net.set_sync_bn(Some(ctx.clone()), SyncBn::All);
            let before: Vec<Tensor> = params(&model).iter().map(|(_, t)| t.copy()).collect();
            let mut opt = Optimizer::new(&Default::default(), params(&model));
            let step = Step {
                net: &model.net,
                device: Device::Cpu,
                autocast: false,
                label_smoothing: 0.0,
                reduce: Reduce::AfterBackward(&pg),
                sync: Some(&ctx),
                buffers: &[],
                graph: None,
            };
            let (a, b) = plan.range(0, c.rank as u64);
            let (a, n) = (a as i64, (b - a) as i64);
            let mut scale = LossScale::new(false);
            let metrics = axial_worker::metrics::WorkerMetrics::new("test");
            step.micro_batch(
                &x.narrow(0, a, n),
                &y.narrow(0, a, n),
                n as usize,
                8.0,
                &scale,
                true,
                Some(&metrics),
            )
            .expect("micro-batch");
            assert!(
                step.update(&mut opt, &mut scale, 0.0, 0.1, None)
                    .expect("update")
            );
            assert!(metrics.take_phase_sums()[5] > 0.0, "no sync_wait counted");
            let after = params(&model);
            updates.push(
                before
                    .iter()
                    .zip(&after)
                    .map(|(b, (_, a))| a - b)
                    .collect::<Vec<_>>(),
            );
        }
        let largest = updates[0]
            .iter()
            .map(|t| t.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        let worst = updates[0]
            .iter()
            .zip(&updates[1])
            .map(|(e, s)| (e - s).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
            / largest;
        std::fs::write(c.out.join(format!("shares{}", c.rank)), worst.to_string()).expect("write");
        return;
    }
    let out = run_pair("a_step_split_by_shares_equals_the_even_split");
    for r in 0..2 {
        let e: f64 = std::fs::read_to_string(out.join(format!("shares{r}")))
            .expect("report")
            .parse()
            .expect("f64");
        println!("rank {r}: update split 6 + 2 vs 4 + 4, worst difference {e:.2e} of the largest");
        assert!(e < 1e-4, "rank {r}: {e}");
    }
}

/// A collective whose peer died fails within its timeout instead of hanging: over Gloo (the
/// connection closes) and over shared memory (the waiting rank sees the peer's process gone
/// within some 20 ms).
#[test]
fn dead_peer_fails_within_the_timeout() {
    if let Some(c) = child() {
        let pg = join(&c);
        if c.rank == 1 {
            std::process::exit(0); // dies without a word
        }
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let r = pg.allreduce_sum(&[Tensor::ones([16], (Kind::Float, Device::Cpu))]);
        let took = t.elapsed();
        let msg = match r {
            Ok(()) => panic!("all-reduce with a dead peer succeeded"),
            Err(e) => e.to_string(),
        };
        std::fs::write(
            c.out.join("dead"),
            format!("{:.2}\n{}\n{msg}", took.as_secs_f64(), pg.shared_memory()),
        )
        .expect("write");
        std::process::exit(0); // do not wait for the dead peer in the group's destructor
    }
    for shm in ["1", "0"] {
        let out = run_pair_with("dead_peer_fails_within_the_timeout", &[("AXIAL_SHM", shm)]);
        let text = std::fs::read_to_string(out.join("dead")).expect("rank 0 reported");
        let mut lines = text.splitn(3, '\n');
        let secs: f64 = lines.next().and_then(|s| s.parse().ok()).expect("seconds");
        let used_shm: bool = lines
            .next()
            .and_then(|s| s.parse().ok())
            .expect("transport");
        let msg = lines.next().unwrap_or_default();
        println!(
            "AXIAL_SHM={shm}: all-reduce with a dead peer failed after {secs:.2} s (shared memory: {used_shm}): {msg}"
        );
        assert_eq!(used_shm, shm == "1", "AXIAL_SHM={shm}");
        assert!(secs <= TIMEOUT.as_secs_f64() + 5.0, "took {secs} s");
        assert!(msg.contains("all-reduce"));
        if used_shm {
            assert!(
                secs < 1.0,
                "shared memory noticed the dead peer after {secs} s"
            );
            assert!(msg.contains("gone"), "{msg}");
        }
    }
}

/// Aborting a group (the coordinator ended the generation) ends a shared-memory wait at once,
/// on this rank and on the peer waiting in the same sum.
#[test]
fn aborting_ends_a_shared_memory_wait() {
    if let Some(c) = child() {
        let pg = Arc::new(join(&c));
        assert!(pg.shared_memory(), "the ranks share this host");
        let report = if c.rank == 0 {
            // Waits for rank 1, which never comes; aborted from another thread.
            let aborter = {
                let pg = pg.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    pg.abort();
                })
            };
            let t = Instant::now();
            let x = Tensor::ones([8], (Kind::Double, Device::Cpu));
            let r = pg.allreduce_sum_differentiable(&x);
            aborter.join().expect("aborter");
            format!(
                "{:.3} {}",
                t.elapsed().as_secs_f64(),
                r.err().map(|e| e.to_string()).unwrap_or_default()
            )
        } else {
            // Arrives late, after rank 0 has aborted the segment: refused at once.
            std::thread::sleep(Duration::from_millis(800));
            let t = Instant::now();
            let x = Tensor::ones([8], (Kind::Double, Device::Cpu));
            let r = pg.allreduce_sum_differentiable(&x);
            format!(
                "{:.3} {}",
                t.elapsed().as_secs_f64(),
                r.err().map(|e| e.to_string()).unwrap_or_default()
            )
        };
        std::fs::write(c.out.join(format!("abort{}", c.rank)), report).expect("write");
        std::process::exit(0);
    }
    let out = run_pair("aborting_ends_a_shared_memory_wait");
    for r in 0..2 {
        let text = std::fs::read_to_string(out.join(format!("abort{r}"))).expect("report");
        println!("rank {r}: {text}");
        let (secs, msg) = text.split_once(' ').expect("two parts");
        let secs: f64 = secs.parse().expect("seconds");
        assert!(msg.contains("aborted"), "rank {r}: {msg}");
        // Rank 0 waited 0.3 s for the abort; rank 1 found it aborted.
        assert!(
            secs < if r == 0 { 0.6 } else { 0.1 },
            "rank {r} took {secs} s"
        );
    }
}

/// Synchronized batch norm: 2 ranks x batch 4 train like 1 rank x batch 8 — logits, loss,
/// gradients and running statistics.
#[test]
fn sync_batch_norm_matches_one_big_batch() {
    if let Some(c) = child() {
        let pg = Arc::new(join(&c));
        let ctx = SyncContext::new(pg.clone());
        let model = tiny_model(5);
        model.net.set_sync_bn(Some(ctx.clone()), SyncBn::All);
        tch::manual_seed(21);
        let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
        let (from, n) = (4 * c.rank as i64, 4);
        let logits = model.net.forward_t(&x.narrow(0, from, n), true);
        let loss = cross_entropy(&logits, &y.narrow(0, from, n)) * 0.5;
        let opt = Optimizer::new(&Default::default(), params(&model));
        opt.zero_grad();
        loss.backward();
        assert!(ctx.take_error().is_none());
        let grads = opt.grads();
        allreduce_gradients(&pg, &grads, BUCKET_BYTES).expect("gradients");
        let total_loss = loss.detach().reshape([1]);
        pg.allreduce_sum(std::slice::from_ref(&total_loss))
            .expect("loss");

        // One process, the whole batch, plain batch norm.
        let single = tiny_model(5);
        let logits_full = single.net.forward_t(&x, true);
        let loss_full = cross_entropy(&logits_full, &y);
        let opt_full = Optimizer::new(&Default::default(), params(&single));
        loss_full.backward();
        let rel = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().max().double_value(&[]).max(1e-12);
            (a - b).abs().max().double_value(&[]) / scale
        };
        let global = opt_full
            .grads()
            .iter()
            .map(|t| t.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        let grad_err = grads
            .iter()
            .zip(opt_full.grads())
            .map(|(a, b)| {
                let scale = b.abs().max().double_value(&[]).max(1e-3 * global);
                (a - &b).abs().max().double_value(&[]) / scale
            })
            .fold(0.0, f64::max);
        let stats_err = model
            .state_dict()
            .iter()
            .zip(single.state_dict())
            .filter(|((name, _), _)| name.contains("running"))
            .map(|((_, a), (_, b))| (a - &b).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        let report = format!(
            "{:.2e} {:.2e} {:.2e} {:.2e}",
            rel(&logits, &logits_full.narrow(0, from, n)),
            (total_loss - loss_full.reshape([1]))
                .abs()
                .double_value(&[0]),
            grad_err,
            stats_err
        );
        std::fs::write(c.out.join(format!("syncbn{}", c.rank)), report).expect("write");
        return;
    }
    let out = run_pair("sync_batch_norm_matches_one_big_batch");
    for r in 0..2 {
        let text = std::fs::read_to_string(out.join(format!("syncbn{r}"))).expect("report");
        let e: Vec<f64> = text.split(' ').map(|v| v.parse().expect("f64")).collect();
        println!(
            "rank {r}: logits {:.2e}, loss {:.2e}, gradients {:.2e}, running stats {:.2e}",
            e[0], e[1], e[2], e[3]
        );
        assert!(
            e[0] < 1e-4 && e[1] < 1e-5 && e[2] < 1e-3 && e[3] < 1e-5,
            "rank {r}: {text}"
        );
    }
}

/// Synchronized batch norm (every norm, `sync_bn = "all"`) on 2 ranks with uneven shares
/// equals one rank on the whole batch, against the exact values: the PyTorch twin in float64
/// on the whole batch (`axial_worker::parity`, the bound of the parity tests). Eval and train
/// logits, the loss, every gradient (all-reduced) and every running statistic, through the
/// fused attention core (which sums the statistics over the group itself) and through the
/// separate operations.
#[test]
fn synchronized_step_matches_the_exact_big_batch() {
    const CASES: [(&str, i64); 3] = [
        ("seed-hybrid-odd", 2),
        ("official-odd", 1),
        ("seed-64px", 3),
    ];
    let fixtures = || {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("parity-fixtures");
        let checkout = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        axial_worker::parity::ensure_fixtures(&checkout, &dir).unwrap_or_else(|e| panic!("{e}"))
    };
    if let Some(c) = child() {
        let pg = Arc::new(join(&c));
        let ctx = SyncContext::new(pg.clone());
        let mut report = String::new();
        for (case, first) in CASES {
            let fx = axial_worker::parity::Fixture::load(&fixtures(), case).expect("fixture");
            for fused in [true, false] {
                axial_worker::model::attention_core::set_enabled(fused);
                let spec = ModelSpec::from_toml_document(&fx.model, case).expect("model");
                let model = Model::new(&spec.resolve().expect("valid"), Device::Cpu, 0);
                let state = fx.state.iter().map(|(k, v)| (k.clone(), v.shallow_clone()));
                model.load_state_dict(state.collect()).expect("state");
                model.net.set_sync_bn(Some(ctx.clone()), SyncBn::All);
                let n = fx.input.size()[0];
                let (from, len) = if c.rank == 0 {
                    (0, first)
                } else {
                    (first, n - first)
                };
                let x = fx.input.narrow(0, from, len);
                let y = fx.labels.narrow(0, from, len);
                // Each rank's rows of the logits, summed into the whole batch's.
                let whole = |part: &Tensor| {
                    let all = Tensor::zeros([n, part.size()[1]], (Kind::Float, Device::Cpu));
                    all.narrow(0, from, len).copy_(part);
                    pg.allreduce_sum(std::slice::from_ref(&all))
                        .expect("logits");
                    all
                };
                let logits_eval = whole(&tch::no_grad(|| model.net.forward_t(&x, false)));
                let before = axial_worker::model::attention_core::calls();
                let logits = model.net.forward_t(&x, true);
                let ran = axial_worker::model::attention_core::calls() - before;
                assert_eq!(
                    ran > 0,
                    fused,
                    "{case}: the fused core ran {ran} times (fused: {fused})"
                );
                let loss = cross_entropy(&logits, &y) * (len as f64 / n as f64);
                loss.backward();
                assert!(ctx.take_error().is_none());
                let mut ours = std::collections::HashMap::new();
                let names = axial_worker::model::weights::NameTable::for_variant(
                    model.net.config().variant,
                );
                let mut grads = Vec::new();
                for (name, var) in params(&model) {
                    grads.push(var.grad());
                    ours.insert(format!("grad.{}", names.external(&name)), var.grad());
                }
                allreduce_gradients(&pg, &grads, BUCKET_BYTES).expect("gradients");
                let loss = loss.detach().reshape([1]);
                pg.allreduce_sum(std::slice::from_ref(&loss)).expect("loss");
                ours.insert("loss".into(), loss);
                ours.insert("logits_eval".into(), logits_eval);
                ours.insert("logits_train".into(), whole(&logits.detach()));
                for (name, value) in model.state_dict() {
                    if name.contains("running_") || name.ends_with("num_batches_tracked") {
                        ours.insert(format!("after_train.{name}"), value);
                    }
                }
                let r = fx.compare(&ours);
                println!("[rank {} fused {fused}] {r}", c.rank);
                let worst = r.worst().expect("rows");
                report += &format!(
                    "{case} fused {fused}: {} of {} outside the bound (worst {:.2} of its bound: {})\n",
                    r.failures().len(),
                    r.rows.len(),
                    worst.ratio(),
                    worst.key
                );
                if !r.failures().is_empty() {
                    report += &r.to_string();
                }
            }
        }
        std::fs::write(c.out.join(format!("exact{}", c.rank)), report).expect("write");
        return;
    }
    fixtures();
    for shm in ["1", "0"] {
        let out = run_pair_with(
            "synchronized_step_matches_the_exact_big_batch",
            &[("AXIAL_SHM", shm)],
        );
        for r in 0..2 {
            let text = std::fs::read_to_string(out.join(format!("exact{r}"))).expect("report");
            println!("AXIAL_SHM={shm}, rank {r}:\n{text}");
            assert_eq!(text.matches(": 0 of ").count(), 6, "rank {r}:\n{text}");
        }
    }
}

/// Why a GPU test cannot run here, if it cannot.
fn no_gpu_reason() -> Option<&'static str> {
    if !tch::Cuda::is_available() {
        return Some("no CUDA device");
    }
    if !nccl_compiled() {
        return Some("this build has no NCCL backend (slim libtorch or headers missing)");
    }
    None
}

/// Without a GPU, asking for NCCL fails at once with a message that says so (and never hangs
/// or aborts the process).
#[test]
fn nccl_without_a_gpu_fails_cleanly() {
    if tch::Cuda::is_available() {
        println!("skipped: a CUDA device is present (gpu_nccl_world_one_smoke covers NCCL)");
        return;
    }
    let store = Store::new("127.0.0.1", 0, 0, 1, TIMEOUT).expect("store");
    let err = ProcessGroup::nccl(&store, 0).expect_err("NCCL without a GPU");
    println!("NCCL compiled in: {}; error: {err}", nccl_compiled());
    let text = err.to_string();
    if nccl_compiled() {
        assert!(text.contains("GPU"), "{text}");
    } else {
        assert!(text.contains("no NCCL backend"), "{text}");
    }
}

/// NCCL with world size 1 on the GPU: all-reduce (coalesced list), broadcast, the SyncBN path
/// (the differentiable all-reduce in forward and backward) against plain batch norm, and a few
/// training steps that lower the loss on a fixed batch.
#[test]
fn gpu_nccl_world_one_smoke() {
    if let Some(why) = no_gpu_reason() {
        println!("skipped: {why}");
        return;
    }
    let dev = Device::Cuda(0);
    let store = Store::new("127.0.0.1", 0, 0, 1, TIMEOUT).expect("store");
    let pg = Arc::new(ProcessGroup::nccl(&store, 0).expect("NCCL group"));
    assert_eq!(pg.backend(), Backend::Nccl);
    let a = Tensor::full([4], 3.0, (Kind::Float, dev));
    let b = Tensor::arange(1000, (Kind::Float, dev));
    pg.allreduce_sum(&[a.shallow_clone(), b.shallow_clone()])
        .expect("all-reduce");
    assert_eq!(
        Vec::<f32>::try_from(&a.to(Device::Cpu)).expect("vec"),
        vec![3.0; 4]
    );
    assert_eq!(b.sum(Kind::Double).double_value(&[]), 499_500.0);
    pg.broadcast(&a, 0).expect("broadcast");
    pg.barrier().expect("barrier");

    // SyncBN through NCCL equals plain batch norm at world size 1.
    let synced = tiny_model_on(5, dev);
    let ctx = SyncContext::new(pg.clone());
    synced.net.set_sync_bn(Some(ctx.clone()), SyncBn::All);
    let plain = tiny_model_on(5, dev);
    tch::manual_seed(3);
    let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, dev));
    let y = Tensor::randint(10, [8], (Kind::Int64, dev));
    let l1 = cross_entropy(&synced.net.forward_t(&x, true), &y);
    let l2 = cross_entropy(&plain.net.forward_t(&x, true), &y);
    let o1 = Optimizer::new(&Default::default(), params(&synced));
    let o2 = Optimizer::new(&Default::default(), params(&plain));
    l1.backward();
    l2.backward();
    assert!(ctx.take_error().is_none());
    let loss_err = (&l1 - &l2).abs().double_value(&[]);
    let grad_err = o1
        .grads()
        .iter()
        .zip(o2.grads())
        .map(|(a, b)| (a - &b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    println!("NCCL SyncBN vs plain BN: loss {loss_err:.2e}, gradients {grad_err:.2e}");
    assert!(loss_err < 1e-5 && grad_err < 1e-4);

    // A few data-parallel steps on a fixed batch.
    let mut opt = Optimizer::new(&Default::default(), params(&synced));
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = cross_entropy(&synced.net.forward_t(&x, true), &y);
        opt.zero_grad();
        loss.backward();
        allreduce_gradients(&pg, &opt.grads(), BUCKET_BYTES).expect("gradients");
        opt.step(0.05);
        losses.push(loss.double_value(&[]));
    }
    println!("NCCL training losses: {losses:.3?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[7] < losses[0], "{losses:?}");
}

/// Two processes sharing the GPU through Gloo with CUDA tensors (staged through the host):
/// all-reduce, broadcast and the differentiable all-reduce's forward and backward.
#[test]
fn gpu_gloo_with_cuda_tensors_across_two_processes() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    if let Some(c) = child() {
        let dev = Device::Cuda(0);
        let pg = join_with(&c, Backend::Gloo);
        let a = Tensor::full([4], (c.rank + 1) as f64, (Kind::Float, dev));
        pg.allreduce_sum(std::slice::from_ref(&a))
            .expect("all-reduce");
        assert_eq!(a.device(), dev);
        assert_eq!(
            Vec::<f32>::try_from(&a.to(Device::Cpu)).expect("vec"),
            vec![3.0; 4]
        );
        let x = Tensor::full([3], (10 * c.rank) as f64 + 7.0, (Kind::Float, dev));
        pg.broadcast(&x, 0).expect("broadcast");
        assert_eq!(
            Vec::<f32>::try_from(&x.to(Device::Cpu)).expect("vec"),
            vec![7.0; 3]
        );
        let v = Tensor::full([2], (c.rank + 1) as f64, (Kind::Float, dev)).set_requires_grad(true);
        let s = pg.allreduce_sum_differentiable(&v).expect("differentiable");
        (&s * &s).sum(Kind::Float).backward();
        // d/dv_r of sum over ranks of (v_0 + v_1)^2 = 2 * 2 * (1 + 2) = 12.
        assert_eq!(
            Vec::<f32>::try_from(&v.grad().to(Device::Cpu)).expect("vec"),
            vec![12.0; 2]
        );
        std::fs::write(c.out.join(format!("ok{}", c.rank)), "ok").expect("write");
        return;
    }
    let out = run_pair("gpu_gloo_with_cuda_tensors_across_two_processes");
    assert!(out.join("ok0").exists() && out.join("ok1").exists());
    println!("Gloo with CUDA tensors: both ranks agree");
}

/// The overlapped path (hooks start each bucket's all-reduce during backward, with the
/// synchronized batch norm's own all-reduces in between) leaves exactly the gradients the
/// after-backward bucketed all-reduce leaves, on both ranks, across two steps and with small
/// buckets (many in flight at once).
#[test]
fn overlapped_allreduce_equals_allreduce_after_backward() {
    use axial_worker::collective::reducer::Reducer;
    if let Some(c) = child() {
        let pg = Arc::new(join(&c));
        let model = tiny_model(11);
        let ctx = SyncContext::new(pg.clone());
        model.net.set_sync_bn(Some(ctx.clone()), SyncBn::Attention);
        let opt = Optimizer::new(&Default::default(), params(&model));
        opt.define_grads();
        let reducer = Reducer::new(pg.clone(), &opt.params(), 64 * 1024).expect("reducer");
        // The same model with its gradients in their buckets' storage, as training places them
        // (reduced in place, no flattening): the same sums, bit for bit.
        let placed_model = tiny_model(11);
        placed_model
            .net
            .set_sync_bn(Some(ctx.clone()), SyncBn::Attention);
        let mut placed = Optimizer::new(&Default::default(), params(&placed_model));
        placed.define_grads();
        placed.bucket_grads(64 * 1024);
        let placed_reducer =
            Reducer::new(pg.clone(), &placed.params(), 64 * 1024).expect("reducer");
        let mut worst = 0.0f64;
        let mut worst_placed = 0.0f64;
        for step in 0..2 {
            tch::manual_seed(40 + step + 10 * c.rank as i64);
            let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
            let y = Tensor::randint(10, [4], (Kind::Int64, Device::Cpu));
            // Overlapped.
            opt.zero_grad();
            reducer.arm();
            cross_entropy(&model.net.forward_t(&x, true), &y).backward();
            reducer.finish().expect("finish");
            let (early, total) = reducer.overlapped();
            assert!(
                total > 3 && early + 1 >= total,
                "{early} of {total} buckets started in backward"
            );
            let overlapped: Vec<Tensor> = opt.grads().iter().map(Tensor::copy).collect();
            // After backward.
            opt.zero_grad();
            cross_entropy(&model.net.forward_t(&x, true), &y).backward();
            let grads = opt.grads();
            allreduce_gradients(&pg, &grads, 64 * 1024).expect("gradients");
            for (a, b) in overlapped.iter().zip(&grads) {
                worst = worst.max((a - b).abs().max().double_value(&[]));
            }
            // In bucket storage: overlapped, then after backward.
            placed.zero_grad();
            placed_reducer.arm();
            cross_entropy(&placed_model.net.forward_t(&x, true), &y).backward();
            placed_reducer.finish().expect("finish");
            let in_place: Vec<Tensor> = placed.grads().iter().map(Tensor::copy).collect();
            placed.zero_grad();
            cross_entropy(&placed_model.net.forward_t(&x, true), &y).backward();
            allreduce_gradients(&pg, &placed.grads(), 64 * 1024).expect("gradients");
            for ((a, b), c) in overlapped.iter().zip(&in_place).zip(&placed.grads()) {
                worst_placed = worst_placed.max((a - b).abs().max().double_value(&[]));
                worst_placed = worst_placed.max((a - c).abs().max().double_value(&[]));
            }
        }
        assert!(ctx.take_error().is_none());
        std::fs::write(
            c.out.join(format!("overlap{}", c.rank)),
            format!("{worst:e} {worst_placed:e}"),
        )
        .expect("write");
        return;
    }
    let out = run_pair("overlapped_allreduce_equals_allreduce_after_backward");
    for r in 0..2 {
        let text = std::fs::read_to_string(out.join(format!("overlap{r}"))).expect("report");
        let (worst, placed) = text.split_once(' ').expect("two numbers");
        let (worst, placed): (f64, f64) =
            (worst.parse().expect("f64"), placed.parse().expect("f64"));
        println!(
            "rank {r}: overlapped vs after backward, max |diff| = {worst:e}; gradients in bucket storage vs separate: {placed:e}"
        );
        assert_eq!(worst, 0.0, "rank {r}");
        assert_eq!(placed, 0.0, "rank {r}: in bucket storage");
    }
}

/// An in-memory key-value store, as the coordinator's rendezvous store behaves (values wait
/// for their key), that counts the operations made through it.
#[derive(Default)]
struct MemoryStore {
    keys: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    changed: std::sync::Condvar,
    ops: std::sync::atomic::AtomicUsize,
}

/// A handle on a shared [`MemoryStore`] (each rank's store holds one).
struct Shared(Arc<MemoryStore>);

impl KeyValue for Shared {
    fn apply(&self, op: KvOp, timeout: Duration) -> Result<KvReply, String> {
        self.0.apply(op, timeout)
    }
}

impl MemoryStore {
    fn apply(&self, op: KvOp, timeout: Duration) -> Result<KvReply, String> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let mut keys = self.keys.lock().map_err(|e| e.to_string())?;
        let reply = match op {
            KvOp::Set { key, value } => {
                keys.insert(key, value);
                KvReply::Done
            }
            KvOp::Get { key } => loop {
                if let Some(v) = keys.get(&key) {
                    break KvReply::Value(v.clone());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break KvReply::TimedOut;
                }
                keys = self
                    .changed
                    .wait_timeout(keys, left)
                    .map_err(|e| e.to_string())?
                    .0;
            },
            KvOp::Wait { keys: wanted } => loop {
                if wanted.iter().all(|k| keys.contains_key(k)) {
                    break KvReply::Done;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break KvReply::TimedOut;
                }
                keys = self
                    .changed
                    .wait_timeout(keys, left)
                    .map_err(|e| e.to_string())?
                    .0;
            },
            KvOp::Add { key, amount } => {
                let now: i64 = keys
                    .get(&key)
                    .and_then(|v| String::from_utf8_lossy(v).parse().ok())
                    .unwrap_or(0)
                    + amount;
                keys.insert(key, now.to_string().into_bytes());
                KvReply::Number(now)
            }
            KvOp::Check { keys: wanted } => {
                KvReply::Number(i64::from(wanted.iter().all(|k| keys.contains_key(k))))
            }
            KvOp::Delete { key } => KvReply::Number(i64::from(keys.remove(&key).is_some())),
            KvOp::CompareSet {
                key,
                expected,
                value,
            } => match keys.get(&key).cloned() {
                Some(current) if current == expected => {
                    keys.insert(key, value.clone());
                    KvReply::Value(value)
                }
                Some(current) => KvReply::Value(current),
                None if expected.is_empty() => {
                    keys.insert(key, value.clone());
                    KvReply::Value(value)
                }
                None => KvReply::Value(expected),
            },
            KvOp::NumKeys => KvReply::Number(keys.len() as i64),
        };
        self.changed.notify_all();
        Ok(reply)
    }
}

/// Gloo bootstraps through a store made in Rust (the path every worker takes, with the
/// coordinator's store behind it): two ranks in two threads form a group, all-reduce, and the
/// store saw the operations; a store that never answers fails the group's set-up within the
/// timeout instead of hanging.
#[test]
fn gloo_forms_through_a_key_value_store_made_in_rust() {
    let memory = Arc::new(MemoryStore::default());
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let memory = memory.clone();
            std::thread::spawn(move || {
                let store = Store::key_value(Box::new(Shared(memory)), rank, 2, TIMEOUT);
                let pg = ProcessGroup::gloo(&store, &Local::Host("127.0.0.1".into()))
                    .expect("group through the key-value store");
                let t = Tensor::full([3], (rank + 1) as f64, (Kind::Float, Device::Cpu));
                pg.allreduce_sum(&[t.shallow_clone()]).expect("all-reduce");
                t.double_value(&[0])
            })
        })
        .collect();
    for r in ranks {
        assert_eq!(r.join().expect("rank thread"), 3.0);
    }
    let ops = memory.ops.load(std::sync::atomic::Ordering::Relaxed);
    println!("store operations for a 2-rank Gloo group: {ops}");
    assert!(ops >= 4, "{ops}");

    // Rank 1 of 2 alone: its peer's address never appears.
    let lonely = Store::key_value(
        Box::new(Shared(Arc::new(MemoryStore::default()))),
        1,
        2,
        Duration::from_secs(2),
    );
    let start = Instant::now();
    let err = ProcessGroup::gloo(&lonely, &Local::Host("127.0.0.1".into())).expect_err("no peer");
    println!("{err} (after {:.1} s)", start.elapsed().as_secs_f64());
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// Evaluation in a group: each of two ranks evaluates its half of the validation split and the
/// sums are all-reduced. Every rank gets the single-rank result: the same counts exactly, the
/// same loss up to float64 rounding.
#[test]
fn sharded_evaluation_equals_one_rank_evaluating_everything() {
    use axial_worker::data::SplitKind;
    use axial_worker::data::augment::Transform;
    use axial_worker::data::builtin::Builtin;
    use axial_worker::train::eval::{EvalOptions, evaluate};
    let source = || -> Arc<dyn axial_worker::data::Source> {
        Arc::new(Builtin::new(75, 32, 5, SplitKind::Val))
    };
    let transform = || Transform::new(32, axial_common::job::AugmentConfig::default());
    let opts = EvalOptions {
        batch_size: 16,
        threads: 1,
        prefetch: 2,
    };
    let alone = evaluate(
        &tiny_model(11).net,
        source(),
        transform(),
        opts,
        Device::Cpu,
        None,
    )
    .expect("evaluate");
    let memory = Arc::new(MemoryStore::default());
    // Made here, one after the other: the seeded initialization draws from one global
    // generator.
    let models: Vec<Model> = (0..2).map(|_| tiny_model(11)).collect();
    let ranks: Vec<_> = models
        .into_iter()
        .enumerate()
        .map(|(rank, model)| {
            let memory = memory.clone();
            std::thread::spawn(move || {
                let store = Store::key_value(Box::new(Shared(memory)), rank, 2, TIMEOUT);
                let pg =
                    ProcessGroup::gloo(&store, &Local::Host("127.0.0.1".into())).expect("group");
                evaluate(
                    &model.net,
                    source(),
                    transform(),
                    opts,
                    Device::Cpu,
                    Some(&pg),
                )
                .expect("evaluate")
            })
        })
        .collect();
    for r in ranks {
        let shared = r.join().expect("rank");
        println!("one rank: {alone:?}\ntwo ranks: {shared:?}");
        assert_eq!(shared.samples, 75);
        assert_eq!((shared.top1, shared.top5), (alone.top1, alone.top5));
        assert!((shared.loss - alone.loss).abs() <= 1e-6 * alone.loss.abs().max(1.0));
    }
}

/// Aborting a Gloo group cuts the group's own connections and nothing else of the process: a
/// socket that another thread duplicated while the group was forming (a tokio runtime starting
/// duplicates the process's signal self-pipe, a Unix socket all runtimes share) keeps working.
/// Shutting that one down once ended every runtime of a worker with "EOF on self-pipe".
#[test]
fn aborting_a_group_cuts_only_its_own_connections() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    if let Some(c) = child() {
        let (mut sender, receiver) = UnixStream::pair().expect("socket pair");
        let formed = Arc::new(AtomicBool::new(false));
        let dups = {
            let (formed, receiver) = (formed.clone(), receiver.try_clone().expect("dup"));
            std::thread::spawn(move || {
                let mut dups = Vec::new();
                while !formed.load(Ordering::Relaxed) {
                    dups.push(receiver.try_clone().expect("dup"));
                    std::thread::sleep(Duration::from_millis(2));
                }
                dups
            })
        };
        let pg = join(&c);
        formed.store(true, Ordering::Relaxed);
        let dups = dups.join().expect("dup thread");
        pg.barrier().expect("barrier");
        pg.abort();
        let after = pg.allreduce_sum(&[Tensor::ones([4], (Kind::Float, Device::Cpu))]);
        let wrote = sender.write_all(b"x");
        let mut byte = [0u8; 1];
        // A duplicate made while the group was forming (rank 0 waits there for rank 1 to start).
        let dup = dups.last().unwrap_or(&receiver);
        let read = match wrote {
            Ok(()) => dup.try_clone().expect("dup").read(&mut byte),
            Err(e) => Err(e),
        };
        std::fs::write(
            c.out.join(format!("abort{}", c.rank)),
            format!(
                "{} dups\nall-reduce after abort: {}\nread from the pair: {read:?} {byte:?}",
                dups.len(),
                if after.is_err() {
                    "failed"
                } else {
                    "succeeded"
                }
            ),
        )
        .expect("write");
        drop(pg);
        axial_worker::collective::exit(0);
    }
    let out = run_pair("aborting_a_group_cuts_only_its_own_connections");
    for rank in 0..2 {
        let text = std::fs::read_to_string(out.join(format!("abort{rank}"))).expect("report");
        println!("rank {rank}: {text}");
        assert!(text.contains("all-reduce after abort: failed"), "{text}");
        assert!(text.contains("read from the pair: Ok(1) [120]"), "{text}");
    }
}
