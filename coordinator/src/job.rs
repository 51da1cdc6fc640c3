//! The job's state: membership, the collective's store address, the checkpoint barrier and the
//! committed position, composed; plain data, time as an argument, no sockets.
//!
//! Persistence: what must survive a restart of the coordinator is on disk already — the job
//! file, the token file and the committed checkpoints (each `manifest.json` holds the step,
//! epoch and the sample ledger). A restarted coordinator reads the newest verified checkpoint
//! and hands it to the workers as their resume point; workers of the old generation are told
//! to abort and join again.

use std::collections::BTreeSet;
use std::path::PathBuf;

use axial_common::JobConfig;
use axial_common::checkpoint::{self, CheckpointManifest, FileEntry, Position};

use crate::barrier::{Barrier, FileVote, VoteOutcome};
use crate::membership::{Assignment, HeartbeatReply, JoinReply, Membership, MembershipConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreAddr {
    pub generation: u64,
    pub host: String,
    pub port: u16,
}

/// Where workers start: the newest committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub folder: PathBuf,
    pub position: Position,
}

#[derive(Debug, Clone)]
pub enum Join {
    Wait,
    Assigned {
        assignment: Assignment,
        store: Option<StoreAddr>,
        resume: Option<Committed>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteResult {
    pub accepted: bool,
    pub committed: bool,
    pub reason: String,
}

#[derive(Debug)]
pub struct JobState {
    pub job: JobConfig,
    pub job_toml: String,
    membership: Membership,
    barrier: Barrier,
    store: Option<StoreAddr>,
    committed: Option<Committed>,
    /// Rank 0's vote (folder and files) for the pending checkpoint.
    pending_folder: Option<(PathBuf, Vec<FileEntry>, Position)>,
    finished: BTreeSet<String>,
    vote_timeout_ms: u64,
    pub log: Vec<String>,
}

impl JobState {
    /// `resume`: start from the newest verified checkpoint in the job's checkpoint dir.
    pub fn new(job: JobConfig, members: MembershipConfig, resume: bool) -> Self {
        let mut log = Vec::new();
        let committed = if resume {
            let (found, skipped) = checkpoint::latest_verified(&job.checkpoint.dir);
            for (folder, why) in skipped {
                log.push(format!("skipping checkpoint {}: {why}", folder.display()));
            }
            found.map(|(folder, m)| Committed {
                folder,
                position: m.position,
            })
        } else {
            None
        };
        Self {
            job_toml: job.to_toml(),
            job,
            membership: Membership::new(members),
            barrier: Barrier::new(),
            store: None,
            committed,
            pending_folder: None,
            finished: BTreeSet::new(),
            vote_timeout_ms: 120_000,
            log,
        }
    }

    pub fn committed(&self) -> Option<&Committed> {
        self.committed.as_ref()
    }

    pub fn generation(&self) -> u64 {
        self.membership.generation()
    }

    pub fn world(&self) -> usize {
        self.membership.world()
    }

    /// Every member of the running group has left with its job finished.
    pub fn done(&self) -> bool {
        !self.finished.is_empty()
            && self.membership.world() == 0
            && self.membership.phase() == crate::membership::Phase::Rendezvous
    }

    fn drain_membership_events(&mut self) {
        for e in self.membership.drain_events() {
            self.log.push(format!("{e:?}"));
        }
    }

    pub fn join(&mut self, worker: &str, incarnation: u64, now: u64) -> Join {
        let before = self.membership.generation();
        let reply = self.membership.join(worker, incarnation, now);
        self.after_membership_change(before);
        match reply {
            JoinReply::Wait => Join::Wait,
            JoinReply::Assigned(assignment) => Join::Assigned {
                assignment,
                store: self
                    .store
                    .clone()
                    .filter(|s| s.generation == assignment.generation),
                resume: self.committed.clone(),
            },
        }
    }

    fn after_membership_change(&mut self, before: u64) {
        let now_gen = self.membership.generation();
        if now_gen != before {
            self.barrier.abort(before);
            self.pending_folder = None;
        }
        self.drain_membership_events();
    }

    pub fn rank_of(&self, worker: &str) -> Option<usize> {
        self.membership.assignment_of(worker).map(|a| a.rank)
    }

    pub fn publish_store(
        &mut self,
        worker: &str,
        generation: u64,
        host: &str,
        port: u16,
    ) -> Result<(), String> {
        if !self.membership.is_current(generation) {
            return Err(format!(
                "generation {generation} is not the running one ({})",
                self.membership.generation()
            ));
        }
        let _ = worker;
        self.store = Some(StoreAddr {
            generation,
            host: host.to_owned(),
            port,
        });
        Ok(())
    }

    pub fn heartbeat(&mut self, worker: &str, generation: u64, now: u64) -> HeartbeatReply {
        self.membership.heartbeat(worker, generation, now)
    }

    /// A rank's vote for the checkpoint at `pos.step`; commits when every rank has voted.
    pub fn vote(
        &mut self,
        rank: usize,
        generation: u64,
        pos: Position,
        folder: Option<PathBuf>,
        files: Vec<FileEntry>,
        now: u64,
    ) -> VoteResult {
        if !self.membership.is_current(generation) {
            return VoteResult {
                accepted: false,
                committed: false,
                reason: format!(
                    "stale generation {generation} (running: {})",
                    self.membership.generation()
                ),
            };
        }
        if self.barrier.pending_step() != Some(pos.step)
            && let Err(e) = self.barrier.request(
                pos.step,
                generation,
                self.membership.world(),
                now + self.vote_timeout_ms,
            )
        {
            return VoteResult {
                accepted: false,
                committed: false,
                reason: e,
            };
        }
        if let Some(f) = folder {
            self.pending_folder = Some((f, files.clone(), pos));
        }
        let votes = files
            .iter()
            .map(|f| FileVote {
                path: f.name.clone(),
                sha256: f.sha256.clone(),
                bytes: f.bytes,
            })
            .collect();
        match self.barrier.vote(rank, generation, pos.step, votes) {
            VoteOutcome::Recorded => VoteResult {
                accepted: true,
                committed: false,
                reason: String::new(),
            },
            VoteOutcome::Refused(reason) => VoteResult {
                accepted: false,
                committed: false,
                reason,
            },
            VoteOutcome::Complete(_) => match self.commit() {
                Ok(()) => VoteResult {
                    accepted: true,
                    committed: true,
                    reason: String::new(),
                },
                Err(reason) => VoteResult {
                    accepted: true,
                    committed: false,
                    reason,
                },
            },
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        let (folder, files, pos) = self
            .pending_folder
            .take()
            .ok_or("rank 0 did not report the checkpoint folder")?;
        let manifest = CheckpointManifest {
            format: checkpoint::FORMAT.into(),
            step: pos.step,
            epoch: pos.epoch,
            position: pos,
            model: self.job.model.clone(),
            world: self.membership.world() as u64,
            files,
        };
        checkpoint::commit(&folder, &manifest).map_err(|e| format!("{}: {e}", folder.display()))?;
        checkpoint::prune(&self.job.checkpoint.dir, self.job.checkpoint.keep)
            .map_err(|e| e.to_string())?;
        self.log.push(format!(
            "committed {} (step {}, epoch {}, consumed {})",
            folder.display(),
            pos.step,
            pos.epoch,
            pos.consumed
        ));
        self.committed = Some(Committed {
            folder,
            position: pos,
        });
        Ok(())
    }

    pub fn leave(&mut self, worker: &str, finished: bool, now: u64) {
        if finished {
            self.finished.insert(worker.to_owned());
        }
        let before = self.membership.generation();
        self.membership.leave(worker, now);
        self.after_membership_change(before);
    }

    pub fn tick(&mut self, now: u64) {
        let before = self.membership.generation();
        self.membership.tick(now);
        self.after_membership_change(before);
        if let Some(a) = self.barrier.tick(now) {
            self.pending_folder = None;
            self.log.push(format!(
                "checkpoint at step {} abandoned: ranks {:?} never voted",
                a.step, a.missing_ranks
            ));
        }
    }
}
