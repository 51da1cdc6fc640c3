//! The distributed side of the training loop: what a rank reports to and hears from the
//! coordinator ([`Coordination`], implemented over gRPC by `crate::join`), the group and the
//! coordinator of a run ([`Distributed`]), the job as the operator's hyperparameter changes
//! make it ([`LiveJob`]), and the drain when a member is terminating.

use std::path::Path;
use std::sync::Arc;

use axial_common::JobConfig;
use axial_common::checkpoint::{FileEntry, Position};
use axial_common::hparams::{self, HyperParameterChange};

use super::checkpoint::Writer;
use super::checkpointer::written;
use super::run::{RunOptions, terminating};
use crate::collective::ProcessGroup;
use crate::error::{Error, Result};
use crate::metrics::WorkerMetrics;

/// What a distributed run reports to, and hears from, the coordinator.
pub trait Coordination {
    /// Progress; an error ends the run (the generation was aborted, the job stopped).
    fn heartbeat(&mut self, report: &Report) -> Result<()>;
    /// Rank 0's vote, for its whole group, for the checkpoint at `pos`: the folder it wrote
    /// and its files. Every rank passed the group's collective barrier at `pos.step` before
    /// rank 0 took the snapshot, so the other ranks send no vote.
    fn vote(&mut self, pos: Position, folder: &Path, files: Vec<FileEntry>) -> Result<()>;
    /// Every hyperparameter change the coordinator has accepted so far (the same list on
    /// every rank; each change says the step it applies from).
    fn changes(&self) -> &[HyperParameterChange] {
        &[]
    }
    /// A member is terminating: the step after which every rank checkpoints, waits for the
    /// commit and leaves the group (the same on every rank).
    fn drain_at(&self) -> Option<u64> {
        None
    }
    /// The running generation's splits of the global batch by speed (`[train] rebalance`),
    /// oldest first; none: the even split.
    fn shares(&self) -> &[Shares] {
        &[]
    }
}

/// A split of the global batch by speed: from the step after step count `from_step`, rank r
/// trains on `samples[r]` of each step's samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares {
    pub from_step: u64,
    pub samples: Vec<u64>,
}

/// The split the step after step count `step` uses: the newest of `schedule` from `step` or
/// earlier (none: the even split). One that took effect before `step` but is not `current`
/// came too late (this rank heard of it after its step): the ranks would disagree on who trains
/// on what, so the generation must re-form.
pub(crate) fn shares_at<'s>(
    schedule: &'s [Shares],
    step: u64,
    current: &[u64],
) -> Result<Option<&'s Shares>> {
    let Some(due) = schedule.iter().rev().find(|s| s.from_step <= step) else {
        return Ok(None);
    };
    if due.from_step < step && due.samples != current {
        return Err(Error::Regroup(format!(
            "heard of the batch shares from step {} only at step {step}",
            due.from_step
        )));
    }
    Ok(Some(due))
}

/// What a rank's training heartbeat says (every `log_every` steps, and after an evaluation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    pub step: u64,
    /// Mean loss since the last report.
    pub loss: f64,
    pub images_per_second: f64,
    /// The learning rate of the last step.
    pub lr: f64,
    /// The job's total steps (for the ETA).
    pub total_steps: u64,
    /// Mean seconds per step of each phase since the last report
    /// ([`axial_common::STEP_PHASES`]).
    pub phase_seconds: [f64; axial_common::STEP_PHASES.len()],
    /// An evaluation since the last report: its epoch (from 1) and validation top-1.
    pub eval: Option<(u64, f64)>,
}

/// The group and the coordinator of a distributed run.
pub struct Distributed<'a> {
    pub group: Arc<ProcessGroup>,
    pub coordination: &'a mut dyn Coordination,
}

/// The step the group drains after, if a member is terminating.
pub(crate) fn drain_step(dist: Option<&Distributed<'_>>) -> Option<u64> {
    dist.and_then(|d| d.coordination.drain_at())
}

/// A member is terminating and every rank has just checkpointed at `pos`: rank 0 finishes
/// writing and votes, a barrier makes sure every vote is in (so the checkpoint is committed),
/// and the generation ends: the terminating worker leaves, the others re-form without it and
/// resume from this checkpoint. Returns the error that ends the run.
pub(crate) fn drain_now(
    rank: usize,
    mut dist: Option<&mut Distributed<'_>>,
    writer: &mut Writer,
    metrics: &WorkerMetrics,
    pos: Position,
    opts: &RunOptions,
) -> Error {
    let done = (|| -> Result<()> {
        if rank == 0
            && let Some(w) = writer.finish()?
        {
            written(w, dist.as_deref_mut(), metrics)?;
        }
        if let Some(d) = dist {
            d.group.barrier()?;
        }
        Ok(())
    })();
    match done {
        Err(e) => e,
        Ok(()) if terminating(opts) => Error::Terminated(pos.step),
        Ok(()) => Error::Regroup(format!(
            "a member is terminating: the group drained after the checkpoint at step {}",
            pos.step
        )),
    }
}

/// The job as the operator's hyperparameter changes make it. Recomputed only when the list of
/// changes differs from the last one seen or a change takes effect at this step, not every
/// step.
#[derive(Default)]
pub(crate) struct LiveJob {
    changes: Vec<HyperParameterChange>,
    /// None while there are no changes (the base job holds).
    pub(crate) job: Option<JobConfig>,
}

impl LiveJob {
    /// Brings the job up to date for the update at step count `step`; returns the changes
    /// that take effect at it.
    pub(crate) fn update(
        &mut self,
        base: &JobConfig,
        changes: &[HyperParameterChange],
        step: u64,
    ) -> Vec<HyperParameterChange> {
        let starting: Vec<HyperParameterChange> = changes
            .iter()
            .filter(|c| c.from_step == step)
            .cloned()
            .collect();
        if changes != self.changes.as_slice() || !starting.is_empty() {
            self.changes = changes.to_vec();
            self.job = (!changes.is_empty()).then(|| hparams::effective(base, changes, step));
        }
        starting
    }
}
