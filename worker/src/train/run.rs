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
//! Distributed: with a [`Distributed`] context, every rank runs this loop on its share of each
//! step; gradients are all-reduced (each rank weighs its loss by its share of the step's
//! samples, so the sum is the global mean), running statistics averaged, the attention batch
//! norms synchronized, and checkpoints voted through the coordinator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axial_common::JobConfig;
use axial_common::job::{Precision, SyncBn};
use axial_common::plan::{EpochPlan, StepPlan};
use serde::Serialize;
use tch::{Kind, Tensor};

use super::checkpoint::{self, Position, Writer};
use super::checkpointer::{checkpoint_at, replica_fingerprint, written};
pub use super::coordination::{Coordination, Distributed, Report};
use super::coordination::{LiveJob, drain_now, drain_step};
use super::eval::{EvalOptions, EvalResult, evaluate};
use super::optim::Optimizer;
use super::progress::Progress;
use super::sample_log::SampleLog;
use super::schedule::Schedule;
use super::step::{LossScale, Reduce, Step};
use crate::collective::ProcessGroup;
use crate::collective::ddp::{BUCKET_BYTES, broadcast_state};
use crate::collective::reducer::Reducer;
use crate::data::augment::Transform;
use crate::data::loader::{Loader, Plan};
use crate::data::{self, Source, SplitKind};
use crate::error::{Error, Result};
use crate::forward::parse_device;
use crate::metrics::{Phase, WorkerMetrics};
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
pub fn run(
    job: &JobConfig,
    opts: &RunOptions,
    metrics: &WorkerMetrics,
    mut dist: Option<Distributed<'_>>,
) -> Result<Summary> {
    let start = Instant::now();
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
    super::precision::set_autocast_dtype(job.train.precision)
        .map_err(|e| config_err("train.precision", &e))?;
    let autocast = job.train.precision != Precision::Fp32;
    if job.train.threads > 0 {
        tch::set_num_threads(job.train.threads);
    }
    let (rank, world) = dist
        .as_ref()
        .map_or((0, 1), |d| (d.group.rank(), d.group.world()));
    let lead = rank == 0;
    let quiet = opts.quiet || !lead;
    let seed = job.train.seed;
    let train_src: Arc<dyn Source> =
        Arc::from(data::open(&job.data, SplitKind::Train, seed).map_err(data_err)?);
    let val_src: Arc<dyn Source> =
        Arc::from(data::open(&job.data, SplitKind::Val, seed).map_err(data_err)?);
    for (name, src) in [("train", &train_src), ("val", &val_src)] {
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
    let model = Model::new(&job.model, device, seed as i64);
    let mut variables: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let buffers: Vec<Tensor> = variables
        .iter()
        .filter(|(_, t)| !t.requires_grad())
        .map(|(_, t)| t.shallow_clone())
        .collect();
    let mut optimizer = Optimizer::new(&job.optim, model.named_parameters());

    let batch = job.train.batch_size as u64;
    let accumulate = job.train.accumulate;
    let per_rank = batch * accumulate;
    let global_batch = per_rank * world as u64;
    if (train_src.len() as u64) < global_batch.min(world as u64 * accumulate) {
        return Err(config_err(
            "train.batch_size",
            &format!(
                "the training split has {} samples, too few for {world} ranks",
                train_src.len()
            ),
        ));
    }
    let layout = data::layout(train_src.as_ref(), &job.data);
    let identity = data::identity(train_src.as_ref(), &job.data, seed);
    let schedule = Schedule::new(job, job.peak_lr(global_batch as i64));
    let size = job.image_size() as u32;
    let transform = Transform::new(size, job.data.augment.clone());
    let ckpt_dir = job.checkpoint.dir.clone();
    std::fs::create_dir_all(&ckpt_dir).map_err(|source| Error::Write {
        path: ckpt_dir.clone(),
        source,
    })?;

    let mut pos = Position {
        loss_scale: 1.0,
        ..Position::default()
    };
    let mut scale = LossScale::new(job.train.precision == Precision::Fp16);
    let mut last_checkpoint = None;
    // Checkpoint files are written off this thread; alone, the writer also commits them.
    let mut writer = Writer::new(job, dist.is_none().then_some(job.checkpoint.keep));
    let mut live = LiveJob::default();
    let mut sample_log = if job.data.log_samples {
        Some(SampleLog::open(
            &ckpt_dir,
            &opts.sample_log.0,
            opts.sample_log.1,
        )?)
    } else {
        None
    };
    let loaded = match (&opts.resume_from, opts.resume) {
        (Some(folder), _) => {
            let manifest = checkpoint::verify(folder).map_err(|message| Error::BadTensor {
                path: folder.clone(),
                message,
            })?;
            Some(checkpoint::load(folder, manifest, job, &model)?)
        }
        (None, true) => checkpoint::load_latest(&ckpt_dir, job, &model)?,
        // A fresh run alone (in a group the coordinator decides, and checks).
        (None, false) if dist.is_none() => {
            axial_common::checkpoint::refuse_foreign(&ckpt_dir)
                .map_err(|m| config_err("checkpoint.dir", &m))?;
            None
        }
        (None, false) => None,
    };
    match loaded {
        Some(loaded) => {
            pos = loaded.manifest.position;
            // The ledger counts a prefix of this data's order: other data, another seed or
            // another shard window would make it name other samples.
            if let Some(saved) = &pos.data {
                let differences = saved.differences(&identity);
                if !differences.is_empty() {
                    return Err(config_err(
                        "data",
                        &format!(
                            "{} was written for other training data ({}); resuming would skip or \
                             repeat samples. Resume with the data it was trained on, or start a \
                             new run in another [checkpoint] dir",
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
            scale.scale = pos.loss_scale;
            scale.good = pos.good_steps;
            if !quiet {
                eprintln!(
                    "resuming from {} (epoch {}, step {})",
                    loaded.dir.display(),
                    pos.epoch + 1,
                    pos.step
                );
            }
            last_checkpoint = Some(loaded.dir);
        }
        None if opts.resume && !quiet => {
            eprintln!("no checkpoint in {}; starting fresh", ckpt_dir.display())
        }
        None => {}
    }
    pos.data = Some(identity);
    let sync = match &dist {
        Some(d) if world > 1 => {
            broadcast_state(
                &d.group,
                &variables
                    .iter()
                    .map(|(_, t)| t.shallow_clone())
                    .collect::<Vec<_>>(),
            )?;
            optimizer.define_grads();
            let ctx = SyncContext::new(d.group.clone());
            model.net.set_sync_bn(Some(ctx.clone()), job.train.sync_bn);
            (job.train.sync_bn != SyncBn::None).then_some(ctx)
        }
        _ => None,
    };
    // Gradients all-reduced during backward (hooks), or after it.
    let reducer = match &dist {
        Some(d) if world > 1 && job.train.overlap_allreduce => Some(Reducer::new(
            d.group.clone(),
            &optimizer.params(),
            BUCKET_BYTES,
        )?),
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
    };
    let steps_per_epoch = StepPlan {
        base: 0,
        world: world as u64,
        batch: per_rank,
        len: train_src.len() as u64,
    }
    .steps();
    let total_steps = steps_per_epoch * job.train.epochs;
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

    let progress = Progress::new(total_steps, pos.step, quiet);
    let eval_opts = EvalOptions {
        batch_size: job.eval.batch_size.unwrap_or(job.train.batch_size * 2) as usize,
        threads: job.data.loader_threads,
        prefetch: job.data.prefetch,
    };
    let mut history = Vec::new();
    let mut last_eval = EvalResult::default();
    let mut stopped_early = false;
    let start_samples = pos.samples_seen;
    let mut window = (Instant::now(), pos.samples_seen);
    // The last training heartbeat's report (the next one's phases are per step since it).
    let mut last_report = Report {
        step: pos.step,
        ..Report::default()
    };
    let mut running_loss = Tensor::zeros([], (Kind::Float, device));
    let mut running_n = 0u64;
    let mut epoch_loss = (Tensor::zeros([], (Kind::Double, device)), 0u64);

    'epochs: for epoch in pos.epoch..job.train.epochs {
        let epoch_start = Instant::now();
        metrics.epoch.set(epoch as f64);
        let sequence = EpochPlan::new(&layout, seed, epoch);
        let len = sequence.len();
        let steps = StepPlan {
            base: pos.consumed,
            world: world as u64,
            batch: per_rank,
            len,
        };
        // This rank's micro-batches: its share of each step, cut into `accumulate` parts.
        let (order, batches) = steps.micro_batches(&sequence, rank as u64, accumulate);
        let order: Vec<usize> = order.into_iter().map(|i| i as usize).collect();
        let plan = Plan {
            order,
            batches,
            train: true,
            epoch,
            seed,
        };
        let mut loader = Loader::start(
            train_src.clone(),
            transform.clone(),
            plan,
            job.data.loader_threads,
            job.data.prefetch,
        );
        if pos.consumed == 0 {
            epoch_loss = (Tensor::zeros([], (Kind::Double, device)), 0);
        }
        for s in 0..steps.steps() {
            let step_samples = steps.step_samples(s) as f64;
            for micro in 0..accumulate {
                let wait = Instant::now();
                // A dead loader thread is an error: its samples were not trained on.
                let Some(b) = loader.next().transpose()? else {
                    break;
                };
                metrics.record(Phase::DataWait, wait.elapsed().as_secs_f64());
                for e in &b.errors {
                    progress.line(&format!("skipped {e}"));
                }
                pos.skipped_samples += b.errors.len() as u64;
                metrics.skipped_samples.increment(b.errors.len() as u64);
                if let Some(log) = sample_log.as_mut() {
                    log.write(epoch, pos.step + 1, &b.samples)?;
                }
                let last = micro + 1 == accumulate;
                let loss = step.micro_batch(
                    &b.images,
                    &b.labels,
                    b.len(),
                    step_samples,
                    &scale,
                    last,
                    Some(metrics),
                )?;
                if let Some(loss) = loss {
                    running_loss += &loss;
                    running_n += 1;
                    epoch_loss.0 += loss.to_kind(Kind::Double);
                    epoch_loss.1 += 1;
                }
                metrics.samples.increment(b.len() as u64);
            }
            // Optimizer step.
            let before = epoch as f64 + pos.consumed as f64 / len as f64;
            pos.consumed = steps.prefix_after(s + 1);
            pos.samples_seen += steps.step_samples(s);
            // Operator changes: every rank folds the same list at the same step count.
            if let Some(d) = &dist {
                for c in live.update(job, d.coordination.changes(), pos.step) {
                    progress.note(&format!("applying hyperparameter change {}", c.describe()));
                }
            }
            let current = live.job.as_ref().unwrap_or(job);
            optimizer.set_weight_decay(current.optim.weight_decay);
            let lr = schedule.lr(before, epoch as f64 + pos.consumed as f64 / len as f64)
                * (current.optim.lr / job.optim.lr);
            if !step.update(
                &mut optimizer,
                &mut scale,
                current.train.clip_grad_norm,
                lr,
                Some(metrics),
            )? {
                progress.line(&format!(
                    "step {}: fp16 overflow, loss scale now {}",
                    pos.step + 1,
                    scale.scale
                ));
            }
            pos.step += 1;
            pos.loss_scale = scale.scale;
            pos.good_steps = scale.good;
            metrics.steps.increment(1);
            metrics.learning_rate.set(lr);

            let mut message = None;
            if pos.step.is_multiple_of(job.train.log_every) || pos.step == total_steps {
                let loss = running_loss.double_value(&[]) / running_n.max(1) as f64;
                running_loss = Tensor::zeros([], (Kind::Float, device));
                running_n = 0;
                let ips = (pos.samples_seen - window.1) as f64
                    / window.0.elapsed().as_secs_f64().max(1e-9);
                window = (Instant::now(), pos.samples_seen);
                metrics.loss.set(loss);
                metrics.images_per_second.set(ips);
                metrics.sample_device_memory(device);
                let since = pos.step.saturating_sub(last_report.step).max(1) as f64;
                last_report = Report {
                    step: pos.step,
                    loss,
                    images_per_second: ips,
                    lr,
                    total_steps,
                    phase_seconds: metrics.take_phase_sums().map(|s| s / since),
                    eval: None,
                };
                if let Some(d) = dist.as_mut() {
                    d.coordination.heartbeat(&last_report)?;
                }
                message = Some(format!(
                    "epoch {}/{}  loss {loss:.4}  lr {lr:.5}  {ips:.0} img/s",
                    epoch + 1,
                    job.train.epochs
                ));
            }
            progress.step(pos.step, message);
            let end_of_epoch = s + 1 == steps.steps();
            let terminated = dist.is_none() && terminating(opts);
            if terminated {
                progress.note(&format!(
                    "terminated (SIGTERM): checkpoint after step {}; continue with --resume",
                    pos.step
                ));
            }
            let stop = opts.stop_after_steps.is_some_and(|n| pos.step >= n) || terminated;
            let drain = drain_step(dist.as_ref()) == Some(pos.step);
            let periodic = current.checkpoint.every_steps > 0
                && pos.step.is_multiple_of(current.checkpoint.every_steps);
            // A write finished on the writer thread: committed (alone) or to vote for (rank 0).
            if let Some(w) = writer.poll()? {
                last_checkpoint = Some(written(w, dist.as_mut(), metrics)?);
            }
            if (periodic || stop) && !end_of_epoch {
                last_checkpoint = checkpoint_at(
                    &model,
                    &optimizer,
                    pos,
                    rank,
                    dist.as_mut(),
                    &mut writer,
                    metrics,
                )?
                .or(last_checkpoint);
            }
            if stop && !end_of_epoch {
                stopped_early = true;
                break 'epochs;
            }
            if drain && !end_of_epoch {
                if !periodic {
                    checkpoint_at(
                        &model,
                        &optimizer,
                        pos,
                        rank,
                        dist.as_mut(),
                        &mut writer,
                        metrics,
                    )?;
                }
                return Err(drain_now(
                    rank,
                    dist.as_mut(),
                    &mut writer,
                    metrics,
                    pos,
                    opts,
                ));
            }
        }
        drop(loader);
        // End of the epoch: evaluate (every rank its share), then checkpoint at the start of
        // the next epoch.
        pos.epoch = epoch + 1;
        pos.consumed = 0;
        let train_loss = epoch_loss.0.double_value(&[]) / epoch_loss.1.max(1) as f64;
        let last = epoch + 1 == job.train.epochs;
        if (epoch + 1).is_multiple_of(job.eval.every_epochs) || last {
            last_eval = evaluate(
                &model.net,
                val_src.clone(),
                transform.clone(),
                eval_opts,
                device,
                dist.as_ref().map(|d| d.group.as_ref()),
            )?;
            metrics.eval_top1.set(last_eval.top1);
            // The coordinator's accuracy curve: one report per evaluation.
            if let Some(d) = dist.as_mut() {
                d.coordination.heartbeat(&Report {
                    eval: Some((epoch + 1, last_eval.top1)),
                    ..last_report
                })?;
            }
            metrics.eval_top5.set(last_eval.top5);
            metrics.eval_loss.set(last_eval.loss);
            pos.skipped_samples += last_eval.skipped;
            progress.line(&format!(
                "epoch {:>3}/{}  train loss {train_loss:.4}  val top1 {:.2}%  top5 {:.2}%  loss {:.4}  ({:.1} s)",
                epoch + 1,
                job.train.epochs,
                100.0 * last_eval.top1,
                100.0 * last_eval.top5,
                last_eval.loss,
                epoch_start.elapsed().as_secs_f64()
            ));
        }
        history.push(EpochRecord {
            epoch: epoch + 1,
            step: pos.step,
            train_loss,
            val_top1: last_eval.top1,
            val_top5: last_eval.top5,
            val_loss: last_eval.loss,
            seconds: epoch_start.elapsed().as_secs_f64(),
        });
        last_checkpoint = checkpoint_at(
            &model,
            &optimizer,
            pos,
            rank,
            dist.as_mut(),
            &mut writer,
            metrics,
        )?
        .or(last_checkpoint);
        if drain_step(dist.as_ref()) == Some(pos.step) && !last {
            return Err(drain_now(
                rank,
                dist.as_mut(),
                &mut writer,
                metrics,
                pos,
                opts,
            ));
        }
        // Alone, SIGTERM stops here too; in a group, the coordinator's drain step does.
        let terminated = dist.is_none() && terminating(opts);
        if (opts.stop_after_steps.is_some_and(|n| pos.step >= n) || terminated) && !last {
            stopped_early = true;
            break;
        }
    }
    if let Some(w) = writer.finish()? {
        last_checkpoint = Some(written(w, dist.as_mut(), metrics)?);
    }
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    if world > 1 {
        let fingerprint = replica_fingerprint(&model, &optimizer, &ckpt_dir, rank)?;
        if !quiet || rank > 0 {
            eprintln!("rank {rank}: replica fingerprint {fingerprint}");
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let summary = Summary {
        val_top1: last_eval.top1,
        val_top5: last_eval.top5,
        val_loss: last_eval.loss,
        steps: pos.step,
        samples_seen: pos.samples_seen,
        skipped_samples: pos.skipped_samples,
        wall_seconds: wall,
        images_per_second: (pos.samples_seen - start_samples) as f64 / wall.max(1e-9),
        epochs_completed: pos.epoch,
        stopped_early,
        checkpoint: last_checkpoint,
        history,
    };
    if lead {
        let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
        let path = ckpt_dir.join("summary.json");
        axial_common::checkpoint::write_atomic(&path, json.as_bytes())
            .map_err(|source| Error::Write { path, source })?;
    }
    Ok(summary)
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
