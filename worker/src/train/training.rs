//! The epochs of a run, once `run` has set it up: each epoch's plan and loader, the steps
//! (micro-batches through the [`Step`], the update with the schedule and the operator's
//! changes, the report), what follows a step (a periodic checkpoint, a stop, a drain), the end
//! of an epoch (evaluation on every rank, the epoch's checkpoint) and the summary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axial_common::JobConfig;
use axial_common::plan::{EpochPlan, Layout, StepPlan};
use tch::{Device, Kind, Tensor};

use super::checkpoint::{Position, Writer};
use super::checkpointer::{checkpoint_at, replica_fingerprint, written};
use super::coordination::{Distributed, LiveJob, Report, drain_now, drain_step, shares_at};
use super::eval::{EvalOptions, EvalResult, evaluate};
use super::optim::Optimizer;
use super::progress::Progress;
use super::run::{EpochRecord, RunOptions, Summary, terminating};
use super::sample_log::SampleLog;
use super::schedule::Schedule;
use super::step::{LossScale, Step};
use crate::data::Source;
use crate::data::augment::Transform;
use crate::data::loader::{Loader, Plan};
use crate::error::{Error, Result};
use crate::metrics::{Phase, WorkerMetrics};
use crate::model::Model;

/// A run in progress: what it was set up with, and the state its steps carry.
pub(crate) struct Training<'a, 'd> {
    pub(crate) job: &'a JobConfig,
    pub(crate) opts: &'a RunOptions,
    pub(crate) metrics: &'a WorkerMetrics,
    pub(crate) model: &'a Model,
    pub(crate) optimizer: Optimizer,
    pub(crate) step: Step<'a>,
    pub(crate) schedule: Schedule,
    pub(crate) layout: Layout,
    pub(crate) transform: Transform,
    pub(crate) train_src: Arc<dyn Source>,
    pub(crate) val_src: Arc<dyn Source>,
    pub(crate) eval_opts: EvalOptions,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// Samples of a full step on one rank (`batch x accumulate`).
    pub(crate) per_rank: u64,
    pub(crate) total_steps: u64,
    pub(crate) device: Device,
    pub(crate) dist: Option<Distributed<'d>>,
    pub(crate) writer: Writer,
    pub(crate) live: LiveJob,
    pub(crate) sample_log: Option<SampleLog>,
    pub(crate) progress: Progress,
    /// The position: the epoch, the consumed prefix of its order, the step count.
    pub(crate) pos: Position,
    pub(crate) scale: LossScale,
    /// Since the last log line: when it was, and the samples seen then.
    pub(crate) window: (Instant, u64),
    /// The last training heartbeat's report (the next one's phases are per step since it).
    pub(crate) last_report: Report,
    /// Losses summed since the last log line, and how many.
    pub(crate) running_loss: (Tensor, u64),
    /// The epoch's losses summed, and how many.
    pub(crate) epoch_loss: (Tensor, u64),
    pub(crate) last_checkpoint: Option<PathBuf>,
    pub(crate) last_eval: EvalResult,
    pub(crate) history: Vec<EpochRecord>,
    /// Samples seen when this run started (a resume's position).
    pub(crate) start_samples: u64,
}

/// What comes after a step or an epoch.
enum Flow {
    Continue,
    /// `stop_after_steps` reached, or SIGTERM alone: the checkpoint is written.
    Stop,
    /// The group drained for a terminating member: the error that ends this run.
    Drain(Error),
}

impl Training<'_, '_> {
    /// Trains the remaining epochs; the summary of the run.
    pub(crate) fn train(mut self, start: Instant) -> Result<Summary> {
        let mut stopped_early = false;
        for epoch in self.pos.epoch..self.job.train.epochs {
            match self.epoch(epoch)? {
                Flow::Continue => {}
                Flow::Stop => {
                    stopped_early = true;
                    break;
                }
                Flow::Drain(e) => return Err(e),
            }
        }
        self.finish(start, stopped_early)
    }

    /// One epoch (or what is left of it after a resume): its steps, then its end. When the
    /// coordinator splits the batch by speed from some step on, the rest of the epoch is
    /// planned again from there (the same steps and prefix, other positions per rank).
    fn epoch(&mut self, epoch: u64) -> Result<Flow> {
        let epoch_start = Instant::now();
        self.metrics.epoch.set(epoch as f64);
        let sequence = EpochPlan::new(&self.layout, self.job.train.seed, epoch);
        let len = sequence.len();
        let mut steps = StepPlan::even(self.pos.consumed, self.world as u64, self.per_rank, len);
        steps = self.replan(&steps)?.unwrap_or(steps);
        let mut loader = self.loader(&steps, &sequence, epoch);
        if self.pos.consumed == 0 {
            self.epoch_loss = (Tensor::zeros([], (Kind::Double, self.device)), 0);
        }
        let mut s = 0;
        while s < steps.steps() {
            if let Some(shared) = self.replan(&steps)? {
                drop(loader);
                steps = shared;
                s = 0;
                loader = self.loader(&steps, &sequence, epoch);
            }
            self.micro_batches(&mut loader, epoch, steps.step_samples(s) as f64)?;
            let lr = self.update(&steps, s, epoch, len)?;
            self.report(epoch, lr)?;
            let end_of_epoch = s + 1 == steps.steps();
            if !end_of_epoch {
                match self.after_step()? {
                    Flow::Continue => {}
                    flow => return Ok(flow),
                }
            }
            s += 1;
        }
        drop(loader);
        self.end_of_epoch(epoch, epoch_start)
    }

    /// This rank's loader over its part of the rest of the epoch: its share of each step of
    /// `steps`, cut into `accumulate` micro-batches.
    fn loader(&self, steps: &StepPlan, sequence: &EpochPlan, epoch: u64) -> Loader {
        let (order, batches) =
            steps.micro_batches(sequence, self.rank as u64, self.job.train.accumulate);
        let plan = Plan {
            order: order.into_iter().map(|i| i as usize).collect(),
            batches,
            train: true,
            epoch,
            seed: self.job.train.seed,
        };
        Loader::start(
            self.train_src.clone(),
            self.transform.clone(),
            plan,
            self.job.data.loader_threads,
            self.job.data.prefetch,
        )
    }

    /// The rest of the epoch planned again from the current position, if the coordinator's
    /// split of the batch for the next step differs from `steps`'.
    fn replan(&self, steps: &StepPlan) -> Result<Option<StepPlan>> {
        let schedule = self
            .dist
            .as_ref()
            .map_or(&[][..], |d| d.coordination.shares());
        let Some(due) = shares_at(schedule, self.pos.step, &steps.shares)? else {
            return Ok(None);
        };
        if due.samples == steps.shares {
            return Ok(None);
        }
        let plan = StepPlan::even(self.pos.consumed, steps.world, steps.batch, steps.len)
            .with_shares(&due.samples)
            .map_err(|e| Error::Coordinator(format!("the coordinator's batch shares: {e}")))?;
        if self.rank == 0 {
            self.progress.note(&format!(
                "from step {}: the batch split by speed, {:?} samples per rank",
                self.pos.step + 1,
                due.samples
            ));
        }
        Ok(Some(plan))
    }

    /// This rank's `accumulate` micro-batches of a step of `step_samples` samples (over all
    /// ranks): forward and backward, each weighted by its share of the step.
    fn micro_batches(&mut self, loader: &mut Loader, epoch: u64, step_samples: f64) -> Result<()> {
        let accumulate = self.job.train.accumulate;
        for micro in 0..accumulate {
            let wait = Instant::now();
            // A dead loader thread is an error: its samples were not trained on.
            let Some(b) = loader.next().transpose()? else {
                break;
            };
            self.metrics
                .record(Phase::DataWait, wait.elapsed().as_secs_f64());
            for e in &b.errors {
                self.progress.line(&format!("skipped {e}"));
            }
            self.pos.skipped_samples += b.errors.len() as u64;
            self.metrics
                .skipped_samples
                .increment(b.errors.len() as u64);
            if let Some(log) = self.sample_log.as_mut() {
                log.write(epoch, self.pos.step + 1, &b.samples)?;
            }
            let loss = self.step.micro_batch(
                &b.images,
                &b.labels,
                b.len(),
                step_samples,
                &self.scale,
                micro + 1 == accumulate,
                Some(self.metrics),
            )?;
            if let Some(loss) = loss {
                self.running_loss.0 += &loss;
                self.running_loss.1 += 1;
                self.epoch_loss.0 += loss.to_kind(Kind::Double);
                self.epoch_loss.1 += 1;
            }
            self.metrics.samples.increment(b.len() as u64);
        }
        Ok(())
    }

    /// The update of step `s` of `steps` (an epoch of `len` samples): the position advances,
    /// the operator's changes apply, the optimizer steps at the schedule's rate. Returns that
    /// rate.
    fn update(&mut self, steps: &StepPlan, s: u64, epoch: u64, len: u64) -> Result<f64> {
        let before = epoch as f64 + self.pos.consumed as f64 / len as f64;
        self.pos.consumed = steps.prefix_after(s + 1);
        self.pos.samples_seen += steps.step_samples(s);
        // Operator changes: every rank folds the same list at the same step count.
        if let Some(d) = &self.dist {
            for c in self
                .live
                .update(self.job, d.coordination.changes(), self.pos.step)
            {
                self.progress
                    .note(&format!("applying hyperparameter change {}", c.describe()));
            }
        }
        let current = self.live.job.as_ref().unwrap_or(self.job);
        self.optimizer.set_weight_decay(current.optim.weight_decay);
        let lr = self
            .schedule
            .lr(before, epoch as f64 + self.pos.consumed as f64 / len as f64)
            * (current.optim.lr / self.job.optim.lr);
        if !self.step.update(
            &mut self.optimizer,
            &mut self.scale,
            current.train.clip_grad_norm,
            lr,
            Some(self.metrics),
        )? {
            self.progress.line(&format!(
                "step {}: fp16 overflow, loss scale now {}",
                self.pos.step + 1,
                self.scale.scale
            ));
        }
        self.pos.step += 1;
        self.pos.loss_scale = self.scale.scale;
        self.pos.good_steps = self.scale.good;
        self.metrics.steps.increment(1);
        self.metrics.learning_rate.set(lr);
        Ok(lr)
    }

    /// Every `log_every` steps (and at the last): the loss, throughput and phases since the
    /// last report, as metrics, a training heartbeat and a progress line. Rank r reports at
    /// the steps where `step + r` is a multiple of `log_every`: a large group's heartbeats are
    /// spread over the steps instead of reaching the coordinator all at once, and every rank
    /// still reports every `log_every` steps (what the hyperparameter changes rely on).
    fn report(&mut self, epoch: u64, lr: f64) -> Result<()> {
        let pos = self.pos;
        let due = (pos.step + self.rank as u64).is_multiple_of(self.job.train.log_every);
        if !(due || pos.step == self.total_steps) {
            self.progress.step(pos.step, None);
            return Ok(());
        }
        let loss = self.running_loss.0.double_value(&[]) / self.running_loss.1.max(1) as f64;
        self.running_loss = (Tensor::zeros([], (Kind::Float, self.device)), 0);
        let ips = (pos.samples_seen - self.window.1) as f64
            / self.window.0.elapsed().as_secs_f64().max(1e-9);
        self.window = (Instant::now(), pos.samples_seen);
        self.metrics.loss.set(loss);
        self.metrics.images_per_second.set(ips);
        self.metrics.sample_device_memory(self.device);
        let since = pos.step.saturating_sub(self.last_report.step).max(1) as f64;
        self.last_report = Report {
            step: pos.step,
            loss,
            images_per_second: ips,
            lr,
            total_steps: self.total_steps,
            phase_seconds: self.metrics.take_phase_sums().map(|s| s / since),
            eval: None,
        };
        if let Some(d) = self.dist.as_mut() {
            d.coordination.heartbeat(&self.last_report)?;
        }
        let message = format!(
            "epoch {}/{}  loss {loss:.4}  lr {lr:.5}  {ips:.0} img/s",
            epoch + 1,
            self.job.train.epochs
        );
        self.progress.step(pos.step, Some(message));
        Ok(())
    }

    /// After a step within an epoch: a finished checkpoint write is voted for; a periodic
    /// checkpoint, a stop (`stop_after_steps`, SIGTERM alone) or a drain (a member of the
    /// group is terminating) checkpoints here.
    fn after_step(&mut self) -> Result<Flow> {
        let step = self.pos.step;
        let stop = self.stop_due();
        let drain = drain_step(self.dist.as_ref()) == Some(step);
        let every = self
            .live
            .job
            .as_ref()
            .unwrap_or(self.job)
            .checkpoint
            .every_steps;
        let periodic = every > 0 && step.is_multiple_of(every);
        // A write finished on the writer thread: committed (alone) or to vote for (rank 0).
        if let Some(w) = self.writer.poll()? {
            self.last_checkpoint = Some(written(w, self.dist.as_mut(), self.metrics)?);
        }
        if periodic || stop || drain {
            self.last_checkpoint = self.checkpoint()?.or(self.last_checkpoint.take());
        }
        Ok(if stop {
            Flow::Stop
        } else if drain {
            Flow::Drain(self.drain())
        } else {
            Flow::Continue
        })
    }

    /// The end of an epoch: evaluation (every rank its share of the validation set), the
    /// epoch's record, and the checkpoint at the start of the next epoch; then a drain or a
    /// stop if one is due.
    fn end_of_epoch(&mut self, epoch: u64, epoch_start: Instant) -> Result<Flow> {
        self.pos.epoch = epoch + 1;
        self.pos.consumed = 0;
        let train_loss = self.epoch_loss.0.double_value(&[]) / self.epoch_loss.1.max(1) as f64;
        let last = epoch + 1 == self.job.train.epochs;
        if (epoch + 1).is_multiple_of(self.job.eval.every_epochs) || last {
            self.evaluate(epoch, epoch_start, train_loss)?;
        }
        self.history.push(EpochRecord {
            epoch: epoch + 1,
            step: self.pos.step,
            train_loss,
            val_top1: self.last_eval.top1,
            val_top5: self.last_eval.top5,
            val_loss: self.last_eval.loss,
            seconds: epoch_start.elapsed().as_secs_f64(),
        });
        self.last_checkpoint = self.checkpoint()?.or(self.last_checkpoint.take());
        if last {
            return Ok(Flow::Continue);
        }
        if drain_step(self.dist.as_ref()) == Some(self.pos.step) {
            return Ok(Flow::Drain(self.drain()));
        }
        Ok(match self.stop_due() {
            true => Flow::Stop,
            false => Flow::Continue,
        })
    }

    /// Whether the run stops after this step: `stop_after_steps` reached, or SIGTERM alone (in a
    /// group, the coordinator's drain step stops it).
    fn stop_due(&self) -> bool {
        let terminated = self.dist.is_none() && terminating(self.opts);
        if terminated {
            self.progress.note(&format!(
                "terminated (SIGTERM): checkpoint after step {}; continue with --resume",
                self.pos.step
            ));
        }
        terminated
            || self
                .opts
                .stop_after_steps
                .is_some_and(|n| self.pos.step >= n)
    }

    /// Evaluates after `epoch` on every rank, reports it (metrics, the coordinator's accuracy
    /// curve, a line).
    fn evaluate(&mut self, epoch: u64, epoch_start: Instant, train_loss: f64) -> Result<()> {
        let eval = evaluate(
            &self.model.net,
            self.val_src.clone(),
            self.transform.clone(),
            self.eval_opts,
            self.device,
            self.dist.as_ref().map(|d| d.group.as_ref()),
        )?;
        self.metrics.eval_top1.set(eval.top1);
        // The coordinator's accuracy curve: one report per evaluation.
        if let Some(d) = self.dist.as_mut() {
            d.coordination.heartbeat(&Report {
                eval: Some((epoch + 1, eval.top1)),
                ..self.last_report
            })?;
        }
        self.metrics.eval_top5.set(eval.top5);
        self.metrics.eval_loss.set(eval.loss);
        self.pos.skipped_samples += eval.skipped;
        self.progress.line(&format!(
            "epoch {:>3}/{}  train loss {train_loss:.4}  val top1 {:.2}%  top5 {:.2}%  loss {:.4}  ({:.1} s)",
            epoch + 1,
            self.job.train.epochs,
            100.0 * eval.top1,
            100.0 * eval.top5,
            eval.loss,
            epoch_start.elapsed().as_secs_f64()
        ));
        self.last_eval = eval;
        Ok(())
    }

    /// The checkpoint at the current position (`checkpointer::checkpoint_at`).
    fn checkpoint(&mut self) -> Result<Option<PathBuf>> {
        checkpoint_at(
            self.model,
            &self.optimizer,
            self.pos,
            self.rank,
            self.dist.as_mut(),
            &mut self.writer,
            self.metrics,
        )
    }

    /// The group drains after the checkpoint just taken (`coordination::drain_now`).
    fn drain(&mut self) -> Error {
        drain_now(
            self.rank,
            self.dist.as_mut(),
            &mut self.writer,
            self.metrics,
            self.pos,
            self.opts,
        )
    }

    /// The last write finished and voted for, the replica fingerprint, the summary.
    fn finish(mut self, start: Instant, stopped_early: bool) -> Result<Summary> {
        if let Some(w) = self.writer.finish()? {
            self.last_checkpoint = Some(written(w, self.dist.as_mut(), self.metrics)?);
        }
        if let Some(bar) = &self.progress.bar {
            bar.finish_and_clear();
        }
        if self.world > 1 {
            let fingerprint = replica_fingerprint(
                self.model,
                &self.optimizer,
                &self.job.checkpoint.dir,
                self.rank,
            )?;
            if !self.opts.quiet || self.rank > 0 {
                eprintln!("rank {}: replica fingerprint {fingerprint}", self.rank);
            }
        }
        let wall = start.elapsed().as_secs_f64();
        let pos = self.pos;
        Ok(Summary {
            val_top1: self.last_eval.top1,
            val_top5: self.last_eval.top5,
            val_loss: self.last_eval.loss,
            steps: pos.step,
            samples_seen: pos.samples_seen,
            skipped_samples: pos.skipped_samples,
            wall_seconds: wall,
            images_per_second: (pos.samples_seen - self.start_samples) as f64 / wall.max(1e-9),
            epochs_completed: pos.epoch,
            stopped_early,
            checkpoint: self.last_checkpoint,
            history: self.history,
        })
    }
}
