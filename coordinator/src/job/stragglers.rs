//! Stragglers: each rank's speed from its reports, and the global batch split by speed
//! (`[train] rebalance`).
//!
//! A rank's speed is its share of the step's samples over its own work per step (the phases
//! without the waits for the other ranks, `axial_common::busy_seconds`): in a synchronous step
//! every rank takes as long as the slowest, so the step time says nothing, the waits do. With
//! rebalancing, once every rank has reported a window measured under the current split, the
//! coordinator splits the global batch in proportion to the speeds (each share between 1 and
//! [`MAX_SHARE_FACTOR`] times the even one), and hands the split out in heartbeat replies for a
//! step every rank hears of first (as hyperparameter changes), if it shortens the predicted
//! step by [`MIN_GAIN`] at least. The global batch and the steps stay as they are; a new
//! generation starts from the even split.

use super::*;

/// A rank's share may grow to this many times the even share (its memory must hold that much
/// more activation).
pub const MAX_SHARE_FACTOR: u64 = 2;

/// A new split is handed out only if it shortens the predicted step by this fraction.
pub const MIN_GAIN: f64 = 0.08;

/// Each look's speeds count this much against the ones before (an exponential mean: one
/// window's noise does not move the split back and forth).
const SMOOTHING: f64 = 0.5;

/// The running generation's split of the global batch: from the step after step count
/// `from_step`, rank r trains on `samples[r]` samples of each step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchShares {
    pub generation: u64,
    pub from_step: u64,
    pub samples: Vec<u64>,
}

/// What the rebalancing keeps between reports.
#[derive(Debug, Default)]
pub(super) struct Rebalancer {
    /// The running generation's split (none: the even one), and the one before it (empty:
    /// the even one), which reports up to its `from_step` were measured under.
    shares: Option<BatchShares>,
    before: Vec<u64>,
    /// (generation, step): the current split holds from the step after `step`; a report
    /// measures it when its window starts a window after that (the first window after a change
    /// holds the loaders' restart, the first of a generation the warm-up).
    since: Option<(u64, u64)>,
    /// The step of the last look at the speeds (one look per `log_every` steps).
    looked: u64,
    /// The speeds by rank, smoothed over the looks of this generation (samples per second).
    smoothed: Vec<f64>,
}

/// A rank's speed, from its last report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankSpeed {
    /// The step of the report.
    pub step: u64,
    /// Its own work per step, seconds.
    pub busy_seconds: f64,
    /// Its share of each step's samples.
    pub share: u64,
    /// Samples per second of its own work (0: not measured).
    pub samples_per_second: f64,
}

impl JobState {
    /// Samples of a full step on one rank in the even split (`batch_size x accumulate`).
    pub(super) fn per_rank(&self) -> u64 {
        self.job.train.batch_size as u64 * self.job.train.accumulate
    }

    /// The split `generation` trains with, if it is the running one and was rebalanced.
    pub fn shares_for(&self, generation: u64) -> Option<&BatchShares> {
        self.rebalancer
            .shares
            .as_ref()
            .filter(|s| s.generation == generation && generation == self.generation())
    }

    /// Each rank's share of a step now: the running generation's split, or the even one.
    pub fn current_shares(&self) -> Vec<u64> {
        match self.shares_for(self.generation()) {
            Some(s) => s.samples.clone(),
            None => vec![self.per_rank(); self.world()],
        }
    }

    /// Each rank's speed by rank (none: no report yet), from the reports of the running group
    /// (each with the share it was measured under).
    pub fn rank_speeds(&self) -> Vec<Option<RankSpeed>> {
        let shares = self.current_shares();
        let pending = self.shares_for(self.generation()).map(|s| s.from_step);
        let before = match &self.rebalancer.before {
            b if b.len() == shares.len() => b.clone(),
            _ => vec![self.per_rank(); shares.len()],
        };
        let mut speeds = vec![None; shares.len()];
        for (id, rank, _, _) in self.membership.workers() {
            let (Some(rank), Some(p)) = (rank, self.progress.get(&id)) else {
                continue;
            };
            let Some(slot) = speeds.get_mut(rank) else {
                continue;
            };
            let busy = axial_common::busy_seconds(&p.phase_seconds);
            let share = match pending {
                Some(from) if p.step <= from => before[rank],
                _ => shares[rank],
            };
            *slot = Some(RankSpeed {
                step: p.step,
                busy_seconds: busy,
                share,
                samples_per_second: if busy > 0.0 { share as f64 / busy } else { 0.0 },
            });
        }
        speeds
    }

    /// After a training report at `step`: with `[train] rebalance`, once per `log_every` steps,
    /// a new split of the batch if every rank's speed is measured under the current one and
    /// the new one is worth it.
    pub(super) fn consider_rebalance(&mut self, step: u64) {
        let world = self.world();
        if !self.job.train.rebalance || world < 2 {
            return;
        }
        let generation = self.generation();
        let every = self.job.train.log_every;
        let since = match self.rebalancer.since {
            Some((g, s)) if g == generation => s,
            _ => {
                // A new generation: the even split, measured from its first report on.
                self.rebalancer = Rebalancer {
                    since: Some((generation, step)),
                    looked: step,
                    ..Rebalancer::default()
                };
                return;
            }
        };
        if step < self.rebalancer.looked + every {
            return;
        }
        self.rebalancer.looked = step;
        let mut speeds = Vec::with_capacity(world);
        for s in self.rank_speeds() {
            match s {
                Some(s) if s.step >= since + 2 * every && s.samples_per_second > 0.0 => {
                    speeds.push(s.samples_per_second);
                }
                _ => return,
            }
        }
        let smoothed = &mut self.rebalancer.smoothed;
        if smoothed.len() == speeds.len() {
            for (m, v) in smoothed.iter_mut().zip(&speeds) {
                *m = (1.0 - SMOOTHING) * *m + SMOOTHING * v;
            }
        } else {
            smoothed.clone_from(&speeds);
        }
        let speeds = smoothed.clone();
        let current = self.current_shares();
        let per_rank = self.per_rank();
        let split = split_by_speed(
            &speeds,
            per_rank * world as u64,
            per_rank * MAX_SHARE_FACTOR,
        );
        let step_time = |shares: &[u64]| {
            shares
                .iter()
                .zip(&speeds)
                .map(|(n, v)| *n as f64 / v)
                .fold(0.0, f64::max)
        };
        let (before, after) = (step_time(&current), step_time(&split));
        if split == current || after > before * (1.0 - MIN_GAIN) {
            return;
        }
        let from_step = self
            .highest_step()
            .saturating_add(every.saturating_mul(2))
            .saturating_add(1);
        self.log.push(format!(
            "generation {generation}: the batch split by speed from step {}: {split:?} samples per rank (predicted step {before:.3} s -> {after:.3} s)",
            from_step + 1
        ));
        self.rebalancer.before = current;
        self.rebalancer.shares = Some(BatchShares {
            generation,
            from_step,
            samples: split,
        });
        self.rebalancer.since = Some((generation, from_step));
    }
}

/// `total` samples split in proportion to `speeds` (all positive), each share between 1 and
/// `max`, as integers adding up to `total` (the largest remainders round up). Needs
/// `speeds.len() <= total <= speeds.len() x max`.
pub fn split_by_speed(speeds: &[f64], total: u64, max: u64) -> Vec<u64> {
    let n = speeds.len();
    // Shares that would leave [1, max] are held at the bound; the rest is split again.
    let mut held: Vec<Option<f64>> = vec![None; n];
    let ideal = |held: &[Option<f64>]| -> Vec<f64> {
        let left = total as f64 - held.iter().flatten().sum::<f64>();
        let free: f64 = speeds
            .iter()
            .zip(held)
            .filter(|(_, h)| h.is_none())
            .map(|(s, _)| s)
            .sum();
        speeds
            .iter()
            .zip(held)
            .map(|(s, h)| h.unwrap_or(if free > 0.0 { left * s / free } else { 0.0 }))
            .collect()
    };
    for _ in 0..n {
        let x = ideal(&held);
        let mut changed = false;
        for (h, x) in held.iter_mut().zip(&x) {
            if h.is_none() && (*x > max as f64 || *x < 1.0) {
                *h = Some(x.clamp(1.0, max as f64));
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let x = ideal(&held);
    let mut shares: Vec<u64> = x.iter().map(|v| (v.floor() as u64).clamp(1, max)).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (x[b] - x[b].floor()).total_cmp(&(x[a] - x[a].floor())));
    let mut sum: u64 = shares.iter().sum();
    // Round up by the largest remainders (then anyone below max) until the total is met.
    for i in order.iter().copied().chain(0..n).cycle().take(4 * n + 4) {
        if sum >= total {
            break;
        }
        if shares[i] < max {
            shares[i] += 1;
            sum += 1;
        }
    }
    for i in (0..n).cycle().take(4 * n + 4) {
        if sum <= total {
            break;
        }
        if shares[i] > 1 {
            shares[i] -= 1;
            sum -= 1;
        }
    }
    shares
}
