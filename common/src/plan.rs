//! Epoch plans and the sample ledger: which sample every rank trains on at every step, so that
//! every sample of every epoch is consumed exactly once, across restarts and changes of the
//! number of workers.
//!
//! An epoch's *sequence* is the dataset's shards in an order permuted by `(seed, epoch)`, each
//! shard's samples in an order permuted by `(seed, epoch, shard)`. Training consumes the
//! sequence front to back in global steps of `world x batch` positions: step s gives rank r the
//! positions `[base + s*G + r*B, base + s*G + (r+1)*B)`, clipped to the end of the sequence.
//! So what has been consumed is always a prefix of the sequence, and the [`Ledger`] is that
//! prefix's length per epoch. Resuming with another world size re-plans the rest of the
//! sequence from the prefix: nothing skipped, nothing repeated.
//!
//! **The last partial global batch** of an epoch is not dropped: the last step gives some ranks
//! fewer samples (possibly none), and every rank still takes the same number of steps, so that
//! the collectives stay in lockstep. Gradients are averaged by the global number of samples in
//! the step, so an uneven last step is still the exact mean.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// A shard: `samples` consecutive sample ids starting at `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub first: u64,
    pub samples: u64,
}

/// Cuts `total` samples into shards of at most `shard_size` (virtual shards of an image
/// folder or the built-in set).
pub fn virtual_shards(total: u64, shard_size: u64) -> Vec<Shard> {
    let size = shard_size.max(1);
    (0..total.div_ceil(size))
        .map(|i| Shard {
            first: i * size,
            samples: size.min(total - i * size),
        })
        .collect()
}

/// The permuted sequence of one epoch.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub epoch: u64,
    /// Sample ids in consumption order.
    sequence: Vec<u64>,
    /// (shard index, position of its first sample in `sequence`) in consumption order.
    shard_starts: Vec<(usize, u64)>,
}

impl EpochPlan {
    pub fn new(shards: &[Shard], seed: u64, epoch: u64) -> Self {
        let mut order: Vec<usize> = (0..shards.len()).collect();
        Rng::derive(seed, &[0x5A4D_0001, epoch]).shuffle(&mut order);
        let mut sequence = Vec::with_capacity(shards.iter().map(|s| s.samples as usize).sum());
        let mut shard_starts = Vec::with_capacity(shards.len());
        for &i in &order {
            let s = shards[i];
            shard_starts.push((i, sequence.len() as u64));
            let mut ids: Vec<u64> = (s.first..s.first + s.samples).collect();
            Rng::derive(seed, &[0x5A4D_0002, epoch, i as u64]).shuffle(&mut ids);
            sequence.extend(ids);
        }
        Self {
            epoch,
            sequence,
            shard_starts,
        }
    }

    pub fn len(&self) -> u64 {
        self.sequence.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.sequence.is_empty()
    }

    /// Sample ids at positions `[from, to)`.
    pub fn samples(&self, from: u64, to: u64) -> &[u64] {
        let to = to.min(self.len());
        let from = from.min(to);
        &self.sequence[from as usize..to as usize]
    }

    /// Shards (by index) touched by positions `[from, to)`: what a worker must lease.
    pub fn shards_for(&self, from: u64, to: u64) -> Vec<usize> {
        let mut out = Vec::new();
        for (k, &(shard, start)) in self.shard_starts.iter().enumerate() {
            let end = self.shard_starts.get(k + 1).map_or(self.len(), |&(_, s)| s);
            if start < to && from < end && start < end {
                out.push(shard);
            }
        }
        out
    }

    /// Consumed samples per shard for a consumed prefix of `prefix` positions.
    pub fn consumed_per_shard(&self, prefix: u64) -> Vec<(usize, u64)> {
        self.shard_starts
            .iter()
            .enumerate()
            .map(|(k, &(shard, start))| {
                let end = self.shard_starts.get(k + 1).map_or(self.len(), |&(_, s)| s);
                (shard, prefix.clamp(start, end) - start)
            })
            .collect()
    }
}

/// How the rest of an epoch is cut into steps for one world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Consumed prefix when this plan started (positions before it are done).
    pub base: u64,
    pub world: u64,
    /// Samples per rank per step.
    pub batch: u64,
    /// Length of the epoch's sequence.
    pub len: u64,
}

impl StepPlan {
    pub fn global_batch(&self) -> u64 {
        self.world * self.batch
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.base)
    }

    /// Steps left in the epoch from `base`. The remainder after the full steps becomes one
    /// more, smaller step split evenly over the ranks; a remainder smaller than the number of
    /// ranks is added to the last full step instead, so that every rank has at least one sample
    /// in every step (a rank with none could not take part in synchronized batch norm).
    pub fn steps(&self) -> u64 {
        let g = self.global_batch().max(1);
        let (full, rem) = (self.remaining() / g, self.remaining() % g);
        if rem == 0 {
            full
        } else if rem >= self.world || full == 0 {
            full + 1
        } else {
            full
        }
    }

    /// Positions `[from, to)` of the whole step.
    fn span(&self, step: u64) -> (u64, u64) {
        let steps = self.steps();
        if step >= steps {
            return (self.len, self.len);
        }
        let from = self.base + step * self.global_batch();
        let to = if step + 1 == steps {
            self.len
        } else {
            from + self.global_batch()
        };
        (from, to)
    }

    /// Positions `[from, to)` of rank `rank` at step `step` (counted from `base`). Full steps
    /// give every rank `batch`; the last, uneven step is split as evenly as possible.
    pub fn range(&self, step: u64, rank: u64) -> (u64, u64) {
        let (from, to) = self.span(step);
        let n = to - from;
        if n == self.global_batch() {
            let a = from + rank * self.batch;
            return (a, a + self.batch);
        }
        let (q, r) = (n / self.world, n % self.world);
        let a = from + rank * q + rank.min(r);
        (a, a + q + u64::from(rank < r))
    }

    /// Samples in the whole step `step` (all ranks).
    pub fn step_samples(&self, step: u64) -> u64 {
        let (from, to) = self.span(step);
        to - from
    }

    /// Consumed prefix after `steps` steps of this plan.
    pub fn prefix_after(&self, steps: u64) -> u64 {
        if steps >= self.steps() {
            self.len
        } else {
            self.base + steps * self.global_batch()
        }
    }
}

/// What the model has seen: the epoch in progress and the consumed prefix of its sequence
/// (every earlier epoch is complete). Committed with each checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub epoch: u64,
    pub consumed: u64,
}

impl Ledger {
    /// Advances by `steps` steps of `plan`, rolling over to the next epoch at its end.
    pub fn advance(&mut self, plan: &StepPlan, steps: u64) {
        self.consumed = plan.prefix_after(steps);
        if self.consumed >= plan.len {
            self.epoch += 1;
            self.consumed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards() -> Vec<Shard> {
        // 103 samples in shards of 10 (the last has 3).
        virtual_shards(103, 10)
    }

    #[test]
    fn epoch_sequence_is_a_permutation_fixed_by_seed_and_epoch() {
        let a = EpochPlan::new(&shards(), 1, 0);
        let mut ids = a.samples(0, a.len()).to_vec();
        ids.sort();
        assert_eq!(ids, (0..103).collect::<Vec<_>>());
        assert_eq!(
            a.samples(0, 103),
            EpochPlan::new(&shards(), 1, 0).samples(0, 103)
        );
        assert_ne!(
            a.samples(0, 103),
            EpochPlan::new(&shards(), 1, 1).samples(0, 103)
        );
        let per: u64 = a.consumed_per_shard(50).iter().map(|(_, c)| c).sum();
        assert_eq!(per, 50);
        assert!(!a.shards_for(0, 25).is_empty() && a.shards_for(0, 25).len() <= 4);
    }

    /// Every rank takes the same number of steps; the last step is uneven; positions are
    /// covered exactly once.
    #[test]
    fn steps_cover_the_epoch_exactly_once_with_an_uneven_last_step() {
        let plan = StepPlan {
            base: 0,
            world: 3,
            batch: 8,
            len: 103,
        };
        assert_eq!(plan.steps(), 5); // 4 full steps of 24, then 7
        let mut seen = vec![0u32; 103];
        for step in 0..plan.steps() {
            let mut n = 0;
            for rank in 0..3 {
                let (from, to) = plan.range(step, rank);
                for p in from..to {
                    seen[p as usize] += 1;
                }
                n += to - from;
            }
            assert_eq!(n, plan.step_samples(step));
        }
        assert!(seen.iter().all(|&c| c == 1));
        // The last 7 positions split 3 + 2 + 2.
        assert_eq!(plan.range(4, 0), (96, 99));
        assert_eq!(plan.range(4, 1), (99, 101));
        assert_eq!(plan.range(4, 2), (101, 103));
        // A remainder smaller than the world joins the last full step: no rank is ever left
        // without a sample.
        let small = StepPlan {
            base: 0,
            world: 3,
            batch: 4,
            len: 26,
        };
        assert_eq!(small.steps(), 2);
        assert_eq!(small.step_samples(1), 14);
        assert!((0..3).all(|r| {
            let (a, b) = small.range(1, r);
            b > a
        }));
    }

    /// Stop after some steps on 2 workers, resume on 1 (and 1 -> 2): exactly once.
    #[test]
    fn resume_with_another_world_size_replans_exactly_the_unseen_samples() {
        for (first_world, second_world) in [(2u64, 1u64), (1, 2), (3, 2)] {
            let epoch = EpochPlan::new(&shards(), 9, 4);
            let mut seen = vec![0u32; 103];
            let mut ledger = Ledger {
                epoch: 4,
                consumed: 0,
            };
            let p1 = StepPlan {
                base: 0,
                world: first_world,
                batch: 5,
                len: epoch.len(),
            };
            for step in 0..3 {
                for rank in 0..first_world {
                    let (a, b) = p1.range(step, rank);
                    for id in epoch.samples(a, b) {
                        seen[*id as usize] += 1;
                    }
                }
            }
            ledger.advance(&p1, 3);
            // The job stops; the committed ledger says where; a new world size takes over.
            let p2 = StepPlan {
                base: ledger.consumed,
                world: second_world,
                batch: 5,
                len: epoch.len(),
            };
            for step in 0..p2.steps() {
                for rank in 0..second_world {
                    let (a, b) = p2.range(step, rank);
                    for id in epoch.samples(a, b) {
                        seen[*id as usize] += 1;
                    }
                }
            }
            ledger.advance(&p2, p2.steps());
            assert!(
                seen.iter().all(|&c| c == 1),
                "{first_world} -> {second_world}: {seen:?}"
            );
            assert_eq!(
                ledger,
                Ledger {
                    epoch: 5,
                    consumed: 0
                }
            );
        }
    }
}
