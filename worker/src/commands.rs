//! The `train`, `predict` and `prepare` commands (their arguments and what they print).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use axial_common::JobConfig;
use tch::{Device, Kind, Tensor};

use crate::data::augment::Transform;
use crate::data::{Image, manifest};
use crate::metrics::{WorkerMetrics, serve};
use crate::model::Model;
use crate::train::checkpoint;
use crate::train::run::{RunOptions, run};

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The job file (TOML).
    pub job: PathBuf,
    /// Continue from the newest valid checkpoint in [checkpoint].dir.
    #[arg(long)]
    pub resume: bool,
    /// Write a checkpoint and stop once this many optimizer steps have been taken.
    #[arg(long, value_name = "STEPS")]
    pub stop_after_steps: Option<u64>,
    /// Print only errors.
    #[arg(long)]
    pub quiet: bool,
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let job = JobConfig::load(&args.job)?;
    let metrics = WorkerMetrics::new("local");
    metrics.world_size.set(1.0);
    if let Some(addr) = job.metrics_addr() {
        // A port taken is a warning: training does not need /metrics.
        match serve(addr, metrics.handle()) {
            Ok(bound) if !args.quiet => eprintln!("metrics: http://{bound}/metrics"),
            Ok(_) => {}
            Err(e) => eprintln!("WARNING: no /metrics: [metrics] listen = {addr}: {e}"),
        }
    }
    // SIGTERM (a preempted node, a time limit): checkpoint after the step in progress, stop.
    let terminate = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, terminate.clone())
        .context("a SIGTERM handler")?;
    let opts = RunOptions {
        resume: args.resume,
        resume_from: None,
        stop_after_steps: args.stop_after_steps,
        quiet: args.quiet,
        sample_log: ("train".into(), 0),
        generation: 0,
        terminate: Some(terminate),
    };
    let s = run(&job, &opts, &metrics, None)?;
    println!(
        "{} after {} steps ({} samples) in {:.1} s ({:.1} images/s): val top-1 {:.2}%, top-5 {:.2}%, loss {:.4}{}",
        if s.stopped_early { "stopped" } else { "done" },
        s.steps,
        s.samples_seen,
        s.wall_seconds,
        s.images_per_second,
        100.0 * s.val_top1,
        100.0 * s.val_top5,
        s.val_loss,
        if s.skipped_samples > 0 {
            format!(", {} samples skipped", s.skipped_samples)
        } else {
            String::new()
        }
    );
    if let Some(c) = &s.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    println!(
        "summary: {}",
        job.checkpoint.dir.join("summary.json").display()
    );
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct PredictArgs {
    /// A checkpoint folder (ckpt-*) or a run's checkpoint dir (its newest checkpoint is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// JPEG or PNG images.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    let folder = if args.checkpoint.join("manifest.json").is_file() {
        args.checkpoint.clone()
    } else {
        checkpoint::list(&args.checkpoint)
            .into_iter()
            .next()
            .with_context(|| {
                format!(
                    "{}: no checkpoint (ckpt-*/manifest.json) here",
                    args.checkpoint.display()
                )
            })?
    };
    checkpoint::verify(&folder).map_err(|why| anyhow::anyhow!("{}: {why}", folder.display()))?;
    let job = JobConfig::parse(
        &std::fs::read_to_string(folder.join("job.toml"))
            .with_context(|| format!("{}/job.toml", folder.display()))?,
        &folder.join("job.toml").display().to_string(),
        &folder,
    )?;
    let device = crate::forward::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let model = Model::new(&job.model, device, 0);
    model.load_weights(&folder.join("model.safetensors"))?;
    let classes = class_names(&job);
    let transform = Transform::new(job.image_size() as u32, job.data.augment.clone());
    for path in &args.images {
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let image =
            Image::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut pixels = vec![0f32; transform.len()];
        transform.eval(&image, &mut pixels);
        let s = job.image_size();
        let x = Tensor::from_slice(&pixels)
            .view([1, 3, s, s])
            .to_device(device);
        let probs = tch::no_grad(|| model.net.forward_t(&x, false).softmax(-1, Kind::Float))
            .to_device(Device::Cpu);
        let k = 5.min(job.model.num_classes);
        let (p, idx) = probs.topk(k, -1, true, true);
        println!("{}", path.display());
        for i in 0..k {
            let c = idx.int64_value(&[0, i]);
            let name = classes
                .get(c as usize)
                .cloned()
                .unwrap_or_else(|| c.to_string());
            println!("  {:>6.2}%  {name}", 100.0 * p.double_value(&[0, i]));
        }
    }
    Ok(())
}

fn class_names(job: &JobConfig) -> Vec<String> {
    match crate::data::open(&job.data, crate::data::SplitKind::Val, job.train.seed) {
        Ok(src) => src.class_names(),
        Err(_) => (0..job.model.num_classes).map(|c| c.to_string()).collect(),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    /// An image folder (one sub-folder per class).
    pub input: PathBuf,
    /// Where to write the shards and manifest.json.
    pub output: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,
    /// Seed of the shuffle that mixes classes across shards.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn prepare(args: &PrepareArgs) -> anyhow::Result<()> {
    let p = manifest::prepare(&args.input, &args.output, args.shard_size, args.seed)?;
    println!(
        "{} samples of {} classes in {} shards; manifest: {}",
        p.manifest.samples,
        p.manifest.classes.len(),
        p.manifest.shards.len(),
        p.manifest_path.display()
    );
    Ok(())
}
