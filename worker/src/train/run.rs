//! The single-process training loop: the one place where data, model, optimizer, schedule,
//! precision, evaluation, checkpoints, progress and metrics are composed. The distributed
//! workers run this same loop on every rank.
//!
//! Data: each epoch's sample sequence comes from `axial_common::plan` (a full permutation by
//! `(seed, epoch)`; tar shards through a shard window and shuffle buffer), consumed front to back in
//! global steps of `world x batch x accumulate` samples; every sample of every epoch is used
//! exactly once, the last step of an epoch being smaller (split evenly over the ranks). The
//! position is the consumed prefix, so a resumed run — on any number of workers — continues
//! with exactly the unseen samples.
//!
//! The loop itself is `super::training` (the steps of an epoch, its end, the summary); this
//! file sets a run up.
//!
//! Distributed: with a [`Distributed`] context, every rank runs this loop on its share of each
//! step; gradients are all-reduced (each rank weighs its loss by its share of the step's
//! samples, so the sum is the global mean), running statistics averaged, the attention batch
//! norms synchronized, and checkpoints voted through the coordinator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axial_common::JobConfig;
use axial_common::checkpoint::DataIdentity;
use axial_common::job::{Precision, SyncBn};
use axial_common::plan::StepPlan;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::checkpoint::{self, Position, Writer};
use super::coordination::LiveJob;
pub use super::coordination::{Coordination, Distributed, Report};
use super::eval::{EvalOptions, EvalResult};
use super::graph::GraphedStep;
use super::optim::Optimizer;
use super::progress::Progress;
use super::sample_log::SampleLog;
use super::schedule::Schedule;
use super::step::{LossScale, Reduce, Step};
use super::training::Training;
use crate::collective::ProcessGroup;
use crate::collective::ddp::{BUCKET_BYTES, broadcast_state};
use crate::collective::reducer::Reducer;
use crate::data::augment::Transform;
use crate::data::{self, Source, SplitKind};
use crate::error::{Error, Result};
use crate::forward::parse_device;
use crate::metrics::WorkerMetrics;
use crate::model::Model;
use crate::model::batch_norm::SyncContext;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest valid checkpoint in `[checkpoint].dir`.
    pub resume: bool,
    /// Continue from this committed checkpoint folder (what the coordinator names).
    pub resume_from: Option<PathBuf>,
    /// Stop (after writing a checkpoint) once this many optimizer steps have been taken in
    /// the run, counting from the start of training.
    pub stop_after_steps: Option<u64>,
    /// Print nothing but errors.
    pub quiet: bool,
    /// With `[data] log_samples`: this worker's name in the log's file name, and the
    /// generation its lines carry (0 for a single worker).
    pub sample_log: (String, u64),
    /// The generation of the group (0 for a single worker): rank 0's checkpoints are written
    /// into staging folders named with it.
    pub generation: u64,
    /// Set on SIGTERM: alone, the run checkpoints after the step in progress and stops; in a
    /// group, it asks the coordinator to drain the group (see `Coordination::drain_at`).
    pub terminate: Option<Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub step: u64,
    pub train_loss: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    pub val_loss: f64,
    pub seconds: f64,
}

/// The end of a run; also written as `summary.json` in the checkpoint folder.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub val_top1: f64,
    pub val_top5: f64,
    pub val_loss: f64,
    pub steps: u64,
    pub samples_seen: u64,
    pub skipped_samples: u64,
    pub wall_seconds: f64,
    pub images_per_second: f64,
    pub epochs_completed: u64,
    /// True when the run ended early on `stop_after_steps`.
    pub stopped_early: bool,
    pub checkpoint: Option<PathBuf>,
    pub history: Vec<EpochRecord>,
}

pub use super::step::smoothed_cross_entropy;

fn data_err(e: data::DataError) -> Error {
    Error::BadTensor {
        path: PathBuf::from("[data]"),
        message: e.to_string(),
    }
}

/// Trains `job` in this process: alone (`dist = None`) or as one rank of a group.
///
/// Sets up (device, data, model, optimizer, a resume, the group's synchronization, the step)
/// and hands the epochs to [`Training`](super::training::Training).
pub fn run(
    job: &JobConfig,
    opts: &RunOptions,
    metrics: &WorkerMetrics,
    dist: Option<Distributed<'_>>,
) -> Result<Summary> {
    let start = Instant::now();
    let (device, autocast) = device_of(job)?;
    if job.train.threads > 0 {
        tch::set_num_threads(job.train.threads);
    }
    let (rank, world) = dist
        .as_ref()
        .map_or((0, 1), |d| (d.group.rank(), d.group.world()));
    let quiet = opts.quiet || rank != 0;
    let seed = job.train.seed;
    let (train_src, val_src) = open_data(job)?;
    let model = Model::new(&job.model, device, seed as i64);
    let mut variables: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let buffers: Vec<Tensor> = variables
        .iter()
        .filter(|(_, t)| !t.requires_grad())
        .map(|(_, t)| t.shallow_clone())
        .collect();
    let mut optimizer = Optimizer::new(&job.optim, model.named_parameters());

    let per_rank = job.train.batch_size as u64 * job.train.accumulate;
    let global_batch = per_rank * world as u64;
    if (train_src.len() as u64) < global_batch.min(world as u64 * job.train.accumulate) {
        return Err(config_err(
            "train.batch_size",
            &format!(
                "the training split has {} samples, too few for {world} ranks",
                train_src.len()
            ),
        ));
    }
    let identity = data::identity(train_src.as_ref(), &job.data, seed);
    let ckpt_dir = job.checkpoint.dir.clone();
    std::fs::create_dir_all(&ckpt_dir).map_err(|source| Error::Write {
        path: ckpt_dir.clone(),
        source,
    })?;
    let resumed = resume(
        job,
        opts,
        dist.is_none(),
        &model,
        &mut optimizer,
        &identity,
        quiet,
    )?;
    let sync = join_group(dist.as_ref(), job, &variables, &mut optimizer, &model)?;
    let graph = graphed_step(job, device, world, sync.is_some(), &variables, quiet)?;
    if graph.is_some() {
        optimizer.keep_grads_in_place();
    }
    // Gradients all-reduced during backward (hooks), or after it (also with a CUDA graph,
    // whose replays would not run the hooks).
    let reducer = match &dist {
        Some(d) if world > 1 && job.train.overlap_allreduce && graph.is_none() => Some(
            Reducer::new(d.group.clone(), &optimizer.params(), BUCKET_BYTES)?,
        ),
        _ => None,
    };
    // The one step every micro-batch and update goes through (`train::step`).
    let group: Option<Arc<ProcessGroup>> = dist.as_ref().map(|d| d.group.clone());
    let step = Step {
        net: &model.net,
        device,
        autocast,
        label_smoothing: job.train.label_smoothing,
        reduce: match (&reducer, &group) {
            (Some(r), Some(g)) => Reduce::Overlapped(r, g),
            (None, Some(g)) => Reduce::AfterBackward(g),
            _ => Reduce::Local,
        },
        sync: sync.as_deref(),
        buffers: &buffers,
        graph: graph.as_ref(),
    };
    let steps_per_epoch = StepPlan::even(0, world as u64, per_rank, train_src.len() as u64).steps();
    if !quiet {
        eprintln!(
            "training {} ({} parameters) on {device:?}{}: {} train / {} val samples, {} epochs x {steps_per_epoch} steps of {global_batch}, peak lr {:.4}",
            job.model.arch.as_deref().unwrap_or("custom model"),
            model.parameter_count(),
            if world > 1 {
                format!(" x {world} ranks")
            } else {
                String::new()
            },
            train_src.len(),
            val_src.len(),
            job.train.epochs,
            job.peak_lr(global_batch as i64)
        );
    }
    let mut pos = resumed.pos;
    pos.data = Some(identity);
    let sample_log = match job.data.log_samples {
        true => Some(SampleLog::open(
            &ckpt_dir,
            &opts.sample_log.0,
            opts.sample_log.1,
        )?),
        false => None,
    };
    let total_steps = steps_per_epoch * job.train.epochs;
    let training = Training {
        job,
        opts,
        metrics,
        model: &model,
        optimizer,
        step,
        schedule: Schedule::new(job, job.peak_lr(global_batch as i64)),
        layout: data::layout(train_src.as_ref(), &job.data),
        transform: Transform::new(job.image_size() as u32, job.data.augment.clone()),
        train_src,
        val_src,
        eval_opts: EvalOptions {
            batch_size: job.eval.batch_size.unwrap_or(job.train.batch_size * 2) as usize,
            threads: job.data.loader_threads,
            prefetch: job.data.prefetch,
        },
        rank,
        world,
        per_rank,
        total_steps,
        device,
        dist,
        // Checkpoint files are written off this thread; alone, the writer also commits them.
        writer: Writer::new(
            job,
            opts.generation,
            group.is_none().then_some(job.checkpoint.keep),
        ),
        live: LiveJob::default(),
        sample_log,
        progress: Progress::new(total_steps, pos.step, quiet),
        window: (Instant::now(), pos.samples_seen),
        last_report: Report {
            step: pos.step,
            ..Report::default()
        },
        running_loss: (Tensor::zeros([], (Kind::Float, device)), 0),
        epoch_loss: (Tensor::zeros([], (Kind::Double, device)), 0),
        last_checkpoint: resumed.folder,
        last_eval: EvalResult::default(),
        history: Vec::new(),
        start_samples: pos.samples_seen,
        scale: resumed.scale,
        pos,
    };
    let summary = training.train(start)?;
    if rank == 0 {
        let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
        let path = ckpt_dir.join("summary.json");
        axial_common::checkpoint::write_atomic(&path, json.as_bytes())
            .map_err(|source| Error::Write { path, source })?;
    }
    Ok(summary)
}

/// The device of `[train] device`, and whether mixed precision (autocast) is on.
fn device_of(job: &JobConfig) -> Result<(Device, bool)> {
    let device = parse_device(&job.train.device).map_err(|message| Error::BadTensor {
        path: PathBuf::from("train.device"),
        message,
    })?;
    if job.train.precision != Precision::Fp32 && !device.is_cuda() {
        return Err(config_err(
            "train.precision",
            "fp16 and bf16 need a CUDA device; use \"fp32\" on the CPU",
        ));
    }
    if job.train.cuda_graphs && !device.is_cuda() {
        return Err(super::graph::graphs_refused(
            "CUDA graphs need a CUDA device",
            format!(
                "train.device = {:?} found {device:?} (no GPU here?)",
                job.train.device
            ),
        ));
    }
    super::precision::set_autocast_dtype(job.train.precision)
        .map_err(|e| config_err("train.precision", &e))?;
    Ok((device, job.train.precision != Precision::Fp32))
}

/// The CUDA graph of the step when `[train] cuda_graphs` asks for one: an error on a device
/// without CUDA (`auto` that found none); none, with a warning that says why, while the
/// synchronized batch norms all-reduce inside the forward pass (a replay cannot run them).
fn graphed_step(
    job: &JobConfig,
    device: Device,
    world: usize,
    synced_forward: bool,
    variables: &[(String, Tensor)],
    quiet: bool,
) -> Result<Option<GraphedStep>> {
    if !job.train.cuda_graphs {
        return Ok(None);
    }
    if synced_forward {
        if !quiet {
            eprintln!(
                "warning: train.cuda_graphs: the step is not captured: sync_bn = {:?} all-reduces inside the forward pass over {world} ranks (set sync_bn = \"none\" to capture it)",
                job.train.sync_bn
            );
        }
        return Ok(None);
    }
    let watched = variables.iter().map(|(_, t)| t.shallow_clone()).collect();
    GraphedStep::new(device, job.train.batch_size, watched).map(Some)
}

/// The training and validation splits, checked against the model's classes (opened once per
/// process: a re-formed group reuses them).
fn open_data(job: &JobConfig) -> Result<(Arc<dyn Source>, Arc<dyn Source>)> {
    let seed = job.train.seed;
    let train = data::open_shared(&job.data, SplitKind::Train, seed).map_err(data_err)?;
    let val = data::open_shared(&job.data, SplitKind::Val, seed).map_err(data_err)?;
    for (name, src) in [("train", &train), ("val", &val)] {
        if src.num_classes() > job.model.num_classes {
            return Err(config_err(
                "model.num_classes",
                &format!(
                    "the {name} data has {} classes but the model {}",
                    src.num_classes(),
                    job.model.num_classes
                ),
            ));
        }
    }
    Ok((train, val))
}

/// Where a run starts: the position, the fp16 loss scale and the checkpoint it resumed from.
struct Resumed {
    pos: Position,
    scale: LossScale,
    folder: Option<PathBuf>,
}

/// Loads the checkpoint the run resumes from (the coordinator's folder, or the newest in
/// `[checkpoint] dir` with `--resume`) into the model and optimizer, after checking it was
/// trained on this data. A fresh run alone refuses a directory holding another run's
/// checkpoints (in a group the coordinator decides, and checks).
fn resume(
    job: &JobConfig,
    opts: &RunOptions,
    alone: bool,
    model: &Model,
    optimizer: &mut Optimizer,
    identity: &DataIdentity,
    quiet: bool,
) -> Result<Resumed> {
    let ckpt_dir = &job.checkpoint.dir;
    let mut resumed = Resumed {
        pos: Position {
            loss_scale: 1.0,
            ..Position::default()
        },
        scale: LossScale::new(job.train.precision == Precision::Fp16),
        folder: None,
    };
    let loaded = match (&opts.resume_from, opts.resume) {
        (Some(folder), _) => {
            let manifest = checkpoint::verify(folder).map_err(|message| Error::BadTensor {
                path: folder.clone(),
                message,
            })?;
            Some(checkpoint::load(folder, manifest, job, model)?)
        }
        (None, true) => checkpoint::load_latest(ckpt_dir, job, model)?,
        (None, false) if alone => {
            axial_common::checkpoint::refuse_foreign(ckpt_dir)
                .map_err(|m| config_err("checkpoint.dir", &m))?;
            None
        }
        (None, false) => None,
    };
    let Some(loaded) = loaded else {
        if opts.resume && !quiet {
            eprintln!("no checkpoint in {}; starting fresh", ckpt_dir.display())
        }
        return Ok(resumed);
    };
    let pos = loaded.manifest.position;
    // The ledger counts a prefix of this data's order: other data, another seed or another
    // shard window would make it name other samples.
    if let Some(saved) = &pos.data {
        let differences = saved.differences(identity);
        if !differences.is_empty() {
            return Err(config_err(
                "data",
                &format!(
                    "{} was written for other training data ({}); resuming would skip or \
                     repeat samples. Resume with the data it was trained on, or start a new run \
                     in another [checkpoint] dir",
                    loaded.dir.display(),
                    differences.join("; ")
                ),
            ));
        }
    }
    optimizer
        .load_state(pos.step, loaded.optimizer)
        .map_err(|message| Error::BadTensor {
            path: loaded.dir.join("optimizer.safetensors"),
            message,
        })?;
    resumed.scale.scale = pos.loss_scale;
    resumed.scale.good = pos.good_steps;
    if !quiet {
        eprintln!(
            "resuming from {} (epoch {}, step {})",
            loaded.dir.display(),
            pos.epoch + 1,
            pos.step
        );
    }
    resumed.pos = pos;
    resumed.folder = Some(loaded.dir);
    Ok(resumed)
}

/// In a group of more than one: every rank takes rank 0's weights, buffers and optimizer
/// state, gradients are defined for the all-reduce, and the attention batch norms are
/// synchronized. Returns the synchronization's context when `[train] sync_bn` is on.
fn join_group(
    dist: Option<&Distributed<'_>>,
    job: &JobConfig,
    variables: &[(String, Tensor)],
    optimizer: &mut Optimizer,
    model: &Model,
) -> Result<Option<Arc<SyncContext>>> {
    let Some(d) = dist.filter(|d| d.group.world() > 1) else {
        return Ok(None);
    };
    broadcast_state(
        &d.group,
        &variables
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect::<Vec<_>>(),
    )?;
    optimizer.define_grads();
    optimizer.bucket_grads(BUCKET_BYTES);
    let ctx = SyncContext::new(d.group.clone());
    model.net.set_sync_bn(Some(ctx.clone()), job.train.sync_bn);
    Ok((job.train.sync_bn != SyncBn::None).then_some(ctx))
}

/// Whether this process got SIGTERM.
pub(crate) fn terminating(opts: &RunOptions) -> bool {
    opts.terminate
        .as_ref()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
}

fn config_err(key: &str, message: &str) -> Error {
    Error::Config(axial_common::ConfigError::Invalid {
        key: key.into(),
        value: String::new(),
        allowed: message.into(),
    })
}
