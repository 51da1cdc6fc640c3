//! The checkpoint barrier: "checkpoint at step S" -> every rank writes its part and votes ->
//! once all ranks of the generation have voted, the checkpoint may be committed. A plain state
//! machine; committing (the manifest write) is the caller's, with the record this returns.
//!
//! - A vote from another generation, or for a step that is not pending, is refused.
//! - A repeated vote from a rank is idempotent.
//! - A checkpoint that some rank never votes for is abandoned at its deadline, naming the
//!   missing ranks; nothing is committed, and the last committed checkpoint stays the latest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One file a rank wrote for a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVote {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    step: u64,
    generation: u64,
    world: usize,
    deadline: u64,
    votes: BTreeMap<usize, Vec<FileVote>>,
}

/// Everything needed to commit: the step and every rank's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyToCommit {
    pub step: u64,
    pub generation: u64,
    pub files: BTreeMap<usize, Vec<FileVote>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteOutcome {
    /// Counted; others still to vote.
    Recorded,
    /// The last vote: commit now.
    Complete(ReadyToCommit),
    /// From another generation, or for a step that is not pending: ignore it (the worker
    /// should abort if its generation is over).
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    pub step: u64,
    pub missing_ranks: Vec<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Barrier {
    pending: Option<Pending>,
    /// (generation, step) of the last checkpoint abandoned at its deadline: a late vote for it
    /// is refused, not taken for a new request (which no other rank would vote for again).
    #[serde(default)]
    abandoned: Option<(u64, u64)>,
}

impl Barrier {
    pub fn new() -> Self {
        Self::default()
    }

    /// The step being checkpointed, if any.
    pub fn pending_step(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.step)
    }

    /// Starts a checkpoint at `step` for the ranks of `generation`; refused while another is
    /// pending.
    pub fn request(
        &mut self,
        step: u64,
        generation: u64,
        world: usize,
        deadline: u64,
    ) -> Result<(), String> {
        if let Some(p) = &self.pending {
            return Err(format!("checkpoint at step {} is still pending", p.step));
        }
        if self
            .abandoned
            .is_some_and(|(g, s)| g == generation && step <= s)
        {
            return Err(format!(
                "the checkpoint at step {step} was abandoned (a rank did not vote in time)"
            ));
        }
        if world == 0 {
            return Err("no ranks to checkpoint".into());
        }
        self.pending = Some(Pending {
            step,
            generation,
            world,
            deadline,
            votes: BTreeMap::new(),
        });
        Ok(())
    }

    pub fn vote(
        &mut self,
        rank: usize,
        generation: u64,
        step: u64,
        files: Vec<FileVote>,
    ) -> VoteOutcome {
        if let Err(reason) = self.check(generation, step) {
            return VoteOutcome::Refused(reason);
        }
        let Some(p) = &mut self.pending else {
            return VoteOutcome::Refused("no checkpoint is pending".into());
        };
        if rank >= p.world {
            return VoteOutcome::Refused(format!(
                "rank {rank} is outside the world of {}",
                p.world
            ));
        }
        p.votes.insert(rank, files);
        if p.votes.len() < p.world {
            return VoteOutcome::Recorded;
        }
        self.complete()
    }

    /// Rank 0's vote standing for every rank of the generation (they all passed the group's
    /// collective barrier at `step`): completes the pending checkpoint.
    pub fn vote_for_group(
        &mut self,
        generation: u64,
        step: u64,
        files: Vec<FileVote>,
    ) -> VoteOutcome {
        if let Err(reason) = self.check(generation, step) {
            return VoteOutcome::Refused(reason);
        }
        if let Some(p) = &mut self.pending {
            p.votes.insert(0, files);
        }
        self.complete()
    }

    /// The pending checkpoint, its votes all in, handed over for its commit.
    fn complete(&mut self) -> VoteOutcome {
        match self.pending.take() {
            Some(p) => VoteOutcome::Complete(ReadyToCommit {
                step: p.step,
                generation: p.generation,
                files: p.votes,
            }),
            None => VoteOutcome::Refused("no checkpoint is pending".into()),
        }
    }

    /// Whether a vote of `generation` for `step` belongs to the pending checkpoint.
    fn check(&self, generation: u64, step: u64) -> Result<(), String> {
        let Some(p) = &self.pending else {
            return Err(format!("no checkpoint is pending (vote for step {step})"));
        };
        if generation != p.generation {
            return Err(format!(
                "vote from generation {generation}; the checkpoint belongs to generation {}",
                p.generation
            ));
        }
        if step != p.step {
            return Err(format!(
                "vote for step {step}; the pending checkpoint is at step {}",
                p.step
            ));
        }
        Ok(())
    }

    /// Abandons a checkpoint past its deadline.
    pub fn tick(&mut self, now: u64) -> Option<Abandoned> {
        let expired = self.pending.as_ref().is_some_and(|p| now >= p.deadline);
        if !expired {
            return None;
        }
        let p = self.pending.take()?;
        self.abandoned = Some((p.generation, p.step));
        Some(Abandoned {
            step: p.step,
            missing_ranks: (0..p.world).filter(|r| !p.votes.contains_key(r)).collect(),
        })
    }

    /// Drops a pending checkpoint of an aborted generation.
    pub fn abort(&mut self, generation: u64) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.generation == generation)
        {
            self.pending = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(rank: usize) -> Vec<FileVote> {
        vec![FileVote {
            path: format!("rank{rank}.json"),
            sha256: "00".repeat(32),
            bytes: 10,
        }]
    }

    #[test]
    fn commits_when_every_rank_has_voted() {
        let mut b = Barrier::new();
        b.request(100, 3, 2, 1000).expect("request");
        assert!(b.request(200, 3, 2, 1000).is_err(), "one at a time");
        assert_eq!(b.vote(1, 3, 100, files(1)), VoteOutcome::Recorded);
        assert_eq!(
            b.vote(1, 3, 100, files(1)),
            VoteOutcome::Recorded,
            "repeated vote is idempotent"
        );
        match b.vote(0, 3, 100, files(0)) {
            VoteOutcome::Complete(r) => {
                assert_eq!((r.step, r.generation, r.files.len()), (100, 3, 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.pending_step(), None);
    }

    #[test]
    fn rank_0_voting_for_the_group_commits_alone() {
        let mut b = Barrier::new();
        b.request(100, 3, 10_000, 1000).expect("request");
        assert!(
            matches!(b.vote_for_group(2, 100, files(0)), VoteOutcome::Refused(m) if m.contains("generation 2"))
        );
        assert!(
            matches!(b.vote_for_group(3, 90, files(0)), VoteOutcome::Refused(m) if m.contains("step 90"))
        );
        assert_eq!(
            b.pending_step(),
            Some(100),
            "a refused vote leaves it pending"
        );
        match b.vote_for_group(3, 100, files(0)) {
            VoteOutcome::Complete(r) => {
                assert_eq!((r.step, r.generation), (100, 3));
                assert_eq!(r.files.get(&0), Some(&files(0)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.pending_step(), None);
        assert!(matches!(
            b.vote_for_group(3, 100, files(0)),
            VoteOutcome::Refused(m) if m.contains("no checkpoint is pending")
        ));
    }

    #[test]
    fn stale_generation_and_wrong_step_are_refused() {
        let mut b = Barrier::new();
        b.request(100, 3, 2, 1000).expect("request");
        assert!(
            matches!(b.vote(0, 2, 100, files(0)), VoteOutcome::Refused(m) if m.contains("generation 2"))
        );
        assert!(
            matches!(b.vote(0, 3, 99, files(0)), VoteOutcome::Refused(m) if m.contains("step 99"))
        );
        assert!(
            matches!(b.vote(5, 3, 100, files(5)), VoteOutcome::Refused(m) if m.contains("rank 5"))
        );
        b.abort(3);
        assert!(matches!(
            b.vote(0, 3, 100, files(0)),
            VoteOutcome::Refused(_)
        ));
    }

    #[test]
    fn a_rank_that_never_votes_abandons_the_checkpoint() {
        let mut b = Barrier::new();
        b.request(100, 1, 3, 1000).expect("request");
        b.vote(0, 1, 100, files(0));
        b.vote(2, 1, 100, files(2));
        assert_eq!(b.tick(999), None);
        assert_eq!(
            b.tick(1000),
            Some(Abandoned {
                step: 100,
                missing_ranks: vec![1]
            })
        );
        assert_eq!(b.pending_step(), None);
        // A late vote for the abandoned checkpoint commits nothing, and cannot re-open it as
        // a new request that no other rank would vote for again.
        assert!(matches!(
            b.vote(1, 1, 100, files(1)),
            VoteOutcome::Refused(_)
        ));
        let reopened = b.request(100, 1, 3, 2000).expect_err("not re-opened");
        assert!(reopened.contains("abandoned"), "{reopened}");
        b.request(200, 1, 3, 3000).expect("the next one can start");
    }
}
