//! Operators' hyperparameter changes: scheduled at a step every rank hears of in time.

use super::*;

/// Hyperparameter changes a job takes (each heartbeat reply carries them all).
pub const MAX_CHANGES: usize = 1000;

impl JobState {
    /// An operator's hyperparameter change. It takes effect at a step every rank reaches only
    /// after it has heard of the change: ranks hear of changes in heartbeats, which they send
    /// every `log_every` steps (rank r at the steps where `step + r` is a multiple of it), so any
    /// rank is at most `log_every` steps past the highest step
    /// reported, and hears of the change by `reported + 2 * log_every`. `from_step` (0: as
    /// soon as safe) may ask for a later step, never an earlier one.
    pub fn set_hyperparameters(
        &mut self,
        mut change: HyperParameterChange,
        now: u64,
    ) -> Result<HyperParameterChange, String> {
        change.validate().map_err(|e| e.to_string())?;
        // Every heartbeat carries the list: keep it bounded.
        if self.changes.len() >= MAX_CHANGES {
            return Err(format!(
                "this job has had {MAX_CHANGES} hyperparameter changes, the most it takes; \
                 restart it with the values in the job file"
            ));
        }
        let reported = self.highest_step();
        let earliest = reported
            .saturating_add(self.job.train.log_every.saturating_mul(2))
            .saturating_add(1);
        if change.from_step == 0 {
            change.from_step = earliest;
        } else if change.from_step < earliest {
            return Err(format!(
                "from_step {} is too soon: ranks may not hear of the change before step {earliest} (highest reported step {reported}, log_every {})",
                change.from_step, self.job.train.log_every
            ));
        }
        change.id = self.changes.iter().map(|c| c.id).max().unwrap_or(0) + 1;
        let _ = now;
        self.log
            .push(format!("hyperparameter change {}", change.describe()));
        self.changes.push(change.clone());
        self.save_or_log();
        Ok(change)
    }

    /// Every accepted hyperparameter change, oldest first.
    pub fn changes(&self) -> &[HyperParameterChange] {
        &self.changes
    }
}
