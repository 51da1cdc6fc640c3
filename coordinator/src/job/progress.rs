//! What ranks report: each one's last training heartbeat, rank 0's history and the
//! evaluation curve.

use super::*;

/// What a rank's training heartbeat reported (see `axial.v1.HeartbeatRequest`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Report {
    pub step: u64,
    pub loss: f64,
    pub images_per_second: f64,
    pub lr: f64,
    pub total_steps: u64,
    /// Mean seconds per step of each phase ([`axial_common::STEP_PHASES`]).
    pub phase_seconds: [f64; axial_common::STEP_PHASES.len()],
    /// An evaluation: its epoch (from 1) and validation top-1.
    pub eval: Option<(u64, f64)>,
    /// When it arrived (the state machines' clock, ms).
    #[serde(skip)]
    pub at: u64,
}

impl JobState {
    /// Records what a heartbeat said about progress (step, loss, images/s).
    pub fn record_progress(
        &mut self,
        worker: &str,
        step: u64,
        loss: f64,
        images_per_second: f64,
        now: u64,
    ) {
        self.record_report(
            worker,
            Report {
                step,
                loss,
                images_per_second,
                ..Report::default()
            },
            now,
        );
    }

    /// Records a rank's training heartbeat; rank 0's also goes into the progress history and
    /// the evaluation curve.
    pub fn record_report(&mut self, worker: &str, mut report: Report, now: u64) {
        report.at = now;
        if self.rank_of(worker) == Some(0) {
            if let Some((epoch, top1)) = report.eval {
                self.evals.insert(epoch, top1);
            }
            if self.history.back().is_none_or(|p| p.step != report.step) {
                if self.history.len() >= HISTORY_POINTS {
                    let kept: std::collections::VecDeque<Point> =
                        self.history.iter().step_by(2).copied().collect();
                    self.history = kept;
                }
                self.history.push_back(Point {
                    t: wall_ms(),
                    step: report.step,
                    loss: report.loss,
                    images_per_second: report.images_per_second,
                    lr: report.lr,
                });
            }
        }
        let step = report.step;
        self.progress.insert(worker.to_owned(), report);
        self.consider_rebalance(step);
    }

    /// The highest step reported in the running generation, or the committed one if higher:
    /// every group resumes from that one, and once the members have left (a finished job) it
    /// is the last step.
    pub(super) fn highest_step(&self) -> u64 {
        self.progress
            .values()
            .map(|p| p.step)
            .chain(self.committed.as_ref().map(|c| c.position.step))
            .max()
            .unwrap_or(0)
    }
}
