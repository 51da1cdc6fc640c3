//! Epoch plans and the sample ledger: which sample every rank trains on at every step, so that
//! every sample of every epoch is consumed exactly once, across restarts and changes of the
//! number of workers.
//!
//! An epoch's *sequence* is one deterministic order of the training split, fixed by
//! `(seed, epoch)`, and it must mix the classes: real data sets are stored class by class (an
//! image folder lists class 0, then class 1, ...; user-made tar shards often hold one class
//! each), and an order that keeps runs of neighbouring samples together gives single-class
//! batches that do not train (an earlier design permuted runs of 1,000 consecutive samples:
//! real digits trained to 21% where PyTorch reaches 95%). So, by [`Layout`]:
//! - a random-access source (image folder, CIFAR-10, MNIST, the built-in set) gets a full
//!   permutation of its sample ids;
//! - tar shards, read front to back, are permuted, `window` of them are open at once and each
//!   next sample is drawn from one of them at random (in proportion to what it has left), and
//!   the stream goes through a shuffle buffer (WebDataset's shard shuffle and sample shuffle,
//!   made deterministic), so class-sorted shards still give mixed batches while each shard is
//!   read in order.
//!
//! Training consumes the sequence front to back in global steps of `world x batch` positions:
//! step s gives rank r the positions `[base + s*G + r*B, base + s*G + (r+1)*B)`, clipped to the
//! end of the sequence. So what has been consumed is always a prefix of the sequence, and the
//! [`Ledger`] is that prefix's length per epoch. Resuming with another world size re-plans the
//! rest of the sequence from the prefix: nothing skipped, nothing repeated.
//!
//! **The last partial global batch** of an epoch is not dropped: the last step gives some ranks
//! fewer samples (possibly none), and every rank still takes the same number of steps, so that
//! the collectives stay in lockstep. Gradients are averaged by the global number of samples in
//! the step, so an uneven last step is still the exact mean.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// A shard: `samples` consecutive sample ids starting at `first`, stored together and read
/// front to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub first: u64,
    pub samples: u64,
}

/// How a training split is stored, which decides how an epoch's order may mix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Any sample can be read at any moment: the order is a full permutation.
    RandomAccess { samples: u64 },
    /// Samples in shards read front to back: the shards are permuted, `window` are open at
    /// once, and a shuffle buffer of `buffer` samples (0 or 1: none) mixes the stream.
    Sharded {
        shards: Vec<Shard>,
        window: usize,
        buffer: usize,
    },
}

impl Layout {
    pub fn samples(&self) -> u64 {
        match self {
            Layout::RandomAccess { samples } => *samples,
            Layout::Sharded { shards, .. } => shards.iter().map(|s| s.samples).sum(),
        }
    }
}

// Stream keys, so that each draw has its own stream of `(seed, epoch)`.
const PERMUTATION: u64 = 0x5A4D_0011;
const SHARD_ORDER: u64 = 0x5A4D_0012;
const WINDOW: u64 = 0x5A4D_0013;
const BUFFER: u64 = 0x5A4D_0014;

/// The ordered sequence of one epoch.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub epoch: u64,
    /// Sample ids in consumption order.
    sequence: Vec<u64>,
}

impl EpochPlan {
    pub fn new(layout: &Layout, seed: u64, epoch: u64) -> Self {
        let sequence = match layout {
            Layout::RandomAccess { samples } => {
                let mut ids: Vec<u64> = (0..*samples).collect();
                Rng::derive(seed, &[PERMUTATION, epoch]).shuffle(&mut ids);
                ids
            }
            Layout::Sharded {
                shards,
                window,
                buffer,
            } => sharded_sequence(shards, *window, *buffer, seed, epoch),
        };
        Self { epoch, sequence }
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
}

/// Shards permuted, drawn from `window` open shards at a time (each next sample from an open
/// shard chosen in proportion to the samples it has left, so the open shards drain together),
/// through a shuffle buffer of `buffer` samples: once the buffer is full, each incoming sample
/// takes the place of a random one, which is emitted; at the end the rest leave in random
/// order. Within a shard, samples come out in storage order, up to the buffer's reordering.
fn sharded_sequence(
    shards: &[Shard],
    window: usize,
    buffer: usize,
    seed: u64,
    epoch: u64,
) -> Vec<u64> {
    let mut order: Vec<usize> = (0..shards.len()).collect();
    Rng::derive(seed, &[SHARD_ORDER, epoch]).shuffle(&mut order);
    let mut pending = order
        .into_iter()
        .map(|i| shards[i])
        .filter(|s| s.samples > 0);
    // Open shards as (next id, one past the last id).
    let mut open: Vec<(u64, u64)> = pending
        .by_ref()
        .take(window.max(1))
        .map(|s| (s.first, s.first + s.samples))
        .collect();
    let mut pick = Rng::derive(seed, &[WINDOW, epoch]);
    let mut mix = Rng::derive(seed, &[BUFFER, epoch]);
    let total: u64 = shards.iter().map(|s| s.samples).sum();
    let mut out = Vec::with_capacity(total as usize);
    let mut held: Vec<u64> = Vec::with_capacity(buffer.min(total as usize));
    let mut left: u64 = open.iter().map(|(a, b)| b - a).sum();
    while left > 0 {
        let mut r = pick.below(left);
        let k = open
            .iter()
            .position(|(a, b)| {
                if r < b - a {
                    true
                } else {
                    r -= b - a;
                    false
                }
            })
            .unwrap_or(0);
        let id = open[k].0;
        open[k].0 += 1;
        left -= 1;
        if open[k].0 == open[k].1 {
            match pending.next() {
                Some(s) => {
                    open[k] = (s.first, s.first + s.samples);
                    left += s.samples;
                }
                None => {
                    open.swap_remove(k);
                }
            }
        }
        if buffer <= 1 {
            out.push(id);
        } else if held.len() < buffer {
            held.push(id);
        } else {
            let j = mix.below(held.len() as u64) as usize;
            out.push(std::mem::replace(&mut held[j], id));
        }
    }
    mix.shuffle(&mut held);
    out.extend(held);
    out
}

/// How the rest of an epoch is cut into steps for one world size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Consumed prefix when this plan started (positions before it are done).
    pub base: u64,
    pub world: u64,
    /// Samples per rank per step (an even split of the global batch `world x batch`).
    pub batch: u64,
    /// Length of the epoch's sequence.
    pub len: u64,
    /// The global batch split by the ranks' speeds (the coordinator's rebalancing): rank r's
    /// samples per full step, `world` of them, at least 1 each, summing to `world x batch`.
    /// Empty: the even split. The steps, the global batch and the consumed prefix after each
    /// step are the same either way; only which rank trains on which positions differs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<u64>,
}

impl StepPlan {
    /// The even split: `batch` samples per rank per step.
    pub fn even(base: u64, world: u64, batch: u64, len: u64) -> Self {
        Self {
            base,
            world,
            batch,
            len,
            shares: Vec::new(),
        }
    }

    /// The same plan with the global batch split by `shares` (see [`StepPlan::shares`]).
    pub fn with_shares(mut self, shares: &[u64]) -> Result<Self, String> {
        check_shares(shares, self.world, self.batch)?;
        self.shares = shares.to_vec();
        Ok(self)
    }

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
        if !self.shares.is_empty() && n >= self.world {
            return self.shared_range(from, n, rank);
        }
        if n == self.global_batch() {
            let a = from + rank * self.batch;
            return (a, a + self.batch);
        }
        let (q, r) = (n / self.world, n % self.world);
        let a = from + rank * q + rank.min(r);
        (a, a + q + u64::from(rank < r))
    }

    /// Rank `rank`'s positions of a step of `n >= world` positions from `from`, split by the
    /// shares: a full step exactly by them; an uneven last step one sample per rank, then the
    /// rest in proportion to them.
    fn shared_range(&self, from: u64, n: u64, rank: u64) -> (u64, u64) {
        let g = self.global_batch();
        let before: u64 = self.shares[..rank as usize].iter().sum();
        let through = before + self.shares[rank as usize];
        if n == g {
            return (from + before, from + through);
        }
        let extra = n - self.world;
        let at = |r: u64, cum: u64| {
            from + r + (u128::from(extra) * u128::from(cum) / u128::from(g)) as u64
        };
        (at(rank, before), at(rank + 1, through))
    }

    /// Samples in the whole step `step` (all ranks).
    pub fn step_samples(&self, step: u64) -> u64 {
        let (from, to) = self.span(step);
        to - from
    }

    /// Rank `rank`'s part of the rest of the epoch: the sample ids it trains on, in order,
    /// and each micro-batch as a range of them, `accumulate` per step (its share of each step
    /// cut as evenly as it goes; a share smaller than `accumulate` leaves some empty, and every
    /// rank still runs every micro-batch, so the collectives stay in lockstep).
    pub fn micro_batches(
        &self,
        sequence: &EpochPlan,
        rank: u64,
        accumulate: u64,
    ) -> (Vec<u64>, Vec<std::ops::Range<usize>>) {
        let accumulate = accumulate.max(1) as usize;
        let mut order = Vec::new();
        let mut batches = Vec::with_capacity(self.steps() as usize * accumulate);
        for s in 0..self.steps() {
            let (a, b) = self.range(s, rank);
            let ids = sequence.samples(a, b);
            let n = ids.len();
            for m in 0..accumulate {
                let lo = order.len() + n * m / accumulate;
                let hi = order.len() + n * (m + 1) / accumulate;
                batches.push(lo..hi);
            }
            order.extend_from_slice(ids);
        }
        (order, batches)
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

/// Checks a split of a global batch of `world x batch` samples over `world` ranks: one share
/// per rank, at least 1 each (every rank takes part in the synchronized batch norms), summing
/// to the global batch.
pub fn check_shares(shares: &[u64], world: u64, batch: u64) -> Result<(), String> {
    if shares.len() as u64 != world {
        return Err(format!(
            "{} batch shares for a group of {world} ranks",
            shares.len()
        ));
    }
    if let Some(r) = shares.iter().position(|&s| s == 0) {
        return Err(format!(
            "rank {r}'s batch share is 0 (every rank needs a sample)"
        ));
    }
    let sum: u64 = shares.iter().sum();
    if sum != world * batch {
        return Err(format!(
            "batch shares {shares:?} sum to {sum}, not the global batch {}",
            world * batch
        ));
    }
    Ok(())
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

    /// 103 samples in shards of 10 (the last has 3), or the same 103 as one random-access set.
    fn layouts() -> [Layout; 3] {
        let shards: Vec<Shard> = (0..11)
            .map(|i| Shard {
                first: i * 10,
                samples: if i == 10 { 3 } else { 10 },
            })
            .collect();
        [
            Layout::RandomAccess { samples: 103 },
            Layout::Sharded {
                shards: shards.clone(),
                window: 4,
                buffer: 16,
            },
            Layout::Sharded {
                shards,
                window: 1,
                buffer: 0,
            },
        ]
    }

    #[test]
    fn epoch_sequence_is_a_permutation_fixed_by_seed_and_epoch() {
        for layout in layouts() {
            let a = EpochPlan::new(&layout, 1, 0);
            let mut ids = a.samples(0, a.len()).to_vec();
            ids.sort();
            assert_eq!(ids, (0..103).collect::<Vec<_>>(), "{layout:?}");
            assert_eq!(
                a.samples(0, 103),
                EpochPlan::new(&layout, 1, 0).samples(0, 103)
            );
            assert_ne!(
                a.samples(0, 103),
                EpochPlan::new(&layout, 1, 1).samples(0, 103)
            );
            assert_ne!(
                a.samples(0, 103),
                EpochPlan::new(&layout, 2, 0).samples(0, 103)
            );
        }
    }

    /// Labels of a class-sorted split (class = id / per_class) in batches of `batch`: the mean
    /// number of distinct classes per batch over the first `batches` batches.
    fn distinct_per_batch(plan: &EpochPlan, per_class: u64, batch: u64, batches: u64) -> f64 {
        let mut total = 0usize;
        for b in 0..batches {
            let mut classes: Vec<u64> = plan
                .samples(b * batch, (b + 1) * batch)
                .iter()
                .map(|id| id / per_class)
                .collect();
            classes.sort();
            classes.dedup();
            total += classes.len();
        }
        total as f64 / batches as f64
    }

    /// Expected distinct classes in `batch` draws from `classes` equally likely classes.
    fn uniform_distinct(classes: f64, batch: f64) -> f64 {
        classes * (1.0 - (1.0 - 1.0 / classes).powf(batch))
    }

    /// The bug this design once had: class-sorted data gave single-class batches. A full
    /// permutation mixes like a uniform shuffle; one-class shards read through a window mix
    /// the classes the window holds open, all of them when it is wide enough.
    #[test]
    fn class_sorted_data_gives_mixed_batches() {
        let (classes, per_class, batch) = (20u64, 500u64, 64u64);
        let uniform = uniform_distinct(classes as f64, batch as f64);
        let random = EpochPlan::new(
            &Layout::RandomAccess {
                samples: classes * per_class,
            },
            3,
            0,
        );
        let d = distinct_per_batch(&random, per_class, batch, 100);
        assert!(d > 0.97 * uniform, "random access: {d} of {uniform}");
        let one_class_shards: Vec<Shard> = (0..classes)
            .map(|c| Shard {
                first: c * per_class,
                samples: per_class,
            })
            .collect();
        // A window at least as wide as the classes: as mixed as a uniform shuffle.
        let wide = EpochPlan::new(
            &Layout::Sharded {
                shards: one_class_shards.clone(),
                window: 32,
                buffer: 1000,
            },
            3,
            0,
        );
        let d = distinct_per_batch(&wide, per_class, batch, 100);
        assert!(d > 0.95 * uniform, "window 32: {d} of {uniform}");
        // A narrower window mixes (at least) the classes it holds open.
        let narrow = EpochPlan::new(
            &Layout::Sharded {
                shards: one_class_shards.clone(),
                window: 8,
                buffer: 1000,
            },
            3,
            0,
        );
        let d = distinct_per_batch(&narrow, per_class, batch, 100);
        let of_eight = uniform_distinct(8.0, batch as f64);
        assert!(d > 0.95 * of_eight, "window 8: {d} of {of_eight}");
        // Without a window or buffer, shards stay single-class: the check can fail.
        let unmixed = EpochPlan::new(
            &Layout::Sharded {
                shards: one_class_shards,
                window: 1,
                buffer: 0,
            },
            3,
            0,
        );
        assert!(distinct_per_batch(&unmixed, per_class, batch, 100) < 1.2);
    }

    /// Every rank takes the same number of steps; the last step is uneven; positions are
    /// covered exactly once.
    #[test]
    fn steps_cover_the_epoch_exactly_once_with_an_uneven_last_step() {
        let plan = StepPlan::even(0, 3, 8, 103);
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
        let small = StepPlan::even(0, 3, 4, 26);
        assert_eq!(small.steps(), 2);
        assert_eq!(small.step_samples(1), 14);
        assert!((0..3).all(|r| {
            let (a, b) = small.range(1, r);
            b > a
        }));
    }

    /// Each rank's micro-batches: `accumulate` per step on every rank, together the whole
    /// sequence once; an uneven last step smaller than `accumulate` leaves empty micro-batches
    /// (35 samples, 2 ranks x 4 x 4: the last 3 split 2 + 1, micro-batches 0/1/0/1 and 0/0/0/1).
    #[test]
    fn micro_batches_cover_the_epoch_with_the_same_count_on_every_rank() {
        let epoch = EpochPlan::new(&Layout::RandomAccess { samples: 35 }, 1, 0);
        let plan = StepPlan::even(0, 2, 16, 35);
        let mut all = Vec::new();
        let mut last = Vec::new();
        for rank in 0..2 {
            let (order, batches) = plan.micro_batches(&epoch, rank, 4);
            assert_eq!(
                batches.len(),
                2 * 4,
                "rank {rank}: the same count on every rank"
            );
            assert!(batches.windows(2).all(|w| w[0].end == w[1].start));
            assert_eq!(batches.last().map(|b| b.end), Some(order.len()));
            last.push(batches[4..].iter().map(|b| b.len()).collect::<Vec<_>>());
            all.extend(order);
        }
        assert_eq!(last, [vec![0, 1, 0, 1], vec![0, 0, 0, 1]]);
        all.sort();
        assert_eq!(all, (0..35).collect::<Vec<_>>());
    }

    /// A split by speed (the coordinator's rebalancing), changed in the middle of an epoch:
    /// every position still exactly once, each step the same positions as the even split,
    /// every rank at least one sample in the uneven last step.
    #[test]
    fn shares_split_the_same_steps_and_change_mid_epoch_exactly_once() {
        let even = StepPlan::even(0, 3, 8, 103);
        let shared = even.clone().with_shares(&[14, 7, 3]).expect("shares");
        assert_eq!(shared.steps(), even.steps());
        let mut seen = vec![0u32; 103];
        // Steps 0 and 1 even, then the shares from the prefix the ledger says.
        for step in 0..2 {
            for rank in 0..3 {
                let (a, b) = even.range(step, rank);
                (a..b).for_each(|p| seen[p as usize] += 1);
            }
        }
        let rest = StepPlan {
            base: even.prefix_after(2),
            ..shared.clone()
        };
        for step in 0..rest.steps() {
            let mut n = 0;
            for rank in 0..3 {
                let (a, b) = rest.range(step, rank);
                assert!(b > a, "step {step} rank {rank}: no sample");
                (a..b).for_each(|p| seen[p as usize] += 1);
                n += b - a;
            }
            assert_eq!(n, rest.step_samples(step));
            assert_eq!(rest.prefix_after(step + 1), even.prefix_after(step + 3));
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        // A full step goes exactly by the shares; the last 7 are one each, then 4 by them.
        assert_eq!(rest.range(0, 0), (48, 62));
        assert_eq!(rest.range(0, 1), (62, 69));
        assert_eq!(rest.range(0, 2), (69, 72));
        let last: Vec<u64> = (0..3)
            .map(|r| {
                let (a, b) = rest.range(2, r);
                b - a
            })
            .collect();
        assert_eq!(last, [3, 2, 2]);
        // Micro-batches of a shared plan: the same count on every rank, the epoch once.
        let epoch = EpochPlan::new(&Layout::RandomAccess { samples: 103 }, 1, 0);
        let mut all = Vec::new();
        for rank in 0..3 {
            let (order, batches) = shared.micro_batches(&epoch, rank, 2);
            assert_eq!(batches.len(), 2 * 5);
            all.extend(order);
        }
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
    }

    /// Bad shares are refused with the reason.
    #[test]
    fn shares_that_do_not_fit_the_group_are_refused() {
        let plan = StepPlan::even(0, 2, 8, 100);
        let err = |s: &[u64]| plan.clone().with_shares(s).expect_err("refused");
        assert!(err(&[16]).contains("1 batch shares for a group of 2"));
        assert!(err(&[16, 0]).contains("rank 1's batch share is 0"));
        assert!(err(&[9, 8]).contains("sum to 17, not the global batch 16"));
        assert!(plan.with_shares(&[11, 5]).is_ok());
    }

    /// Stop after some steps on 2 workers, resume on 1 (and 1 -> 2): exactly once.
    #[test]
    fn resume_with_another_world_size_replans_exactly_the_unseen_samples() {
        let cases = [(2u64, 1u64), (1, 2), (3, 2)];
        for (layout, (first_world, second_world)) in layouts()
            .into_iter()
            .flat_map(|l| cases.map(|c| (l.clone(), c)))
        {
            let epoch = EpochPlan::new(&layout, 9, 4);
            let mut seen = vec![0u32; 103];
            let mut ledger = Ledger {
                epoch: 4,
                consumed: 0,
            };
            let p1 = StepPlan::even(0, first_world, 5, epoch.len());
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
            let p2 = StepPlan::even(ledger.consumed, second_world, 5, epoch.len());
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
