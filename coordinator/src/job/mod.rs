//! The job's state: membership, the collective's rendezvous store, the checkpoint barrier and
//! the committed position, composed; plain data, time as an argument, no sockets.
//!
//! This file holds the state and membership (joins, leaves, heartbeats, the store, time
//! passing); `commits` the checkpoint votes and commits, `persistence` `coordinator.json`,
//! `hyperparameters` the operators' changes, `progress` what ranks report, `stragglers` the
//! ranks' speeds and the batch split by them, `status` the snapshot for `/api/status` and
//! `/metrics`.
//!
//! Persistence: what must survive a restart of the coordinator is on disk — the job file, the
//! token file, the committed checkpoints (each `manifest.json` holds the step, epoch, the
//! sample ledger and the hyperparameter changes) and `coordinator.json` beside them (the
//! generations reserved so far, the restart count, every accepted hyperparameter change),
//! written atomically when a block of generations is used up, and at each change. A restarted coordinator goes on from the saved generation,
//! reads the newest verified checkpoint and hands it to the workers as their resume point;
//! workers of the old generation are told to abort and join again.

use std::collections::BTreeSet;
use std::path::PathBuf;

use axial_common::JobConfig;
use axial_common::checkpoint::{self, CheckpointManifest, FileEntry, Position};
use axial_common::hparams::HyperParameterChange;
use serde::{Deserialize, Serialize};

use crate::barrier::{Barrier, FileVote, VoteOutcome};
use crate::membership::{Assignment, HeartbeatReply, JoinReply, Membership, MembershipConfig};
use crate::rendezvous::{self, Rendezvous};

/// Points the progress history keeps (when full, every other one is dropped: the whole run
/// at a coarser grain).
const HISTORY_POINTS: usize = 1000;

/// Committed checkpoints the dashboard lists.
const CHECKPOINTS_SHOWN: usize = 20;

/// Generations reserved by one write of `coordinator.json` (a re-formation takes two).
const GENERATION_BLOCK: u64 = 16;

mod commits;
mod hyperparameters;
mod persistence;
mod progress;
mod status;
mod stragglers;
#[cfg(test)]
mod tests;

pub use commits::{Cast, MAX_COMMIT_FAILURES, PendingCommit, VoteResult, Voter};
pub use hyperparameters::MAX_CHANGES;
use persistence::Saved;
pub use persistence::{finished_at, state_file};
pub use progress::Report;
pub use status::{
    CheckpointInfo, CommittedStatus, Point, RankPhases, Status, TimedEvent, WORKERS_LISTED,
    WorkerStatus,
};
pub use stragglers::{BatchShares, MAX_SHARE_FACTOR, RankSpeed, split_by_speed};

/// Unix time in ms.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a rendezvous store operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreRefused {
    /// The generation is not the running one (it ended, or never was).
    #[error("generation {asked} is not the running one ({running})")]
    Stale { asked: u64, running: u64 },
    /// The caller is not a rank of the generation.
    #[error("{worker} is not a rank of generation {generation}")]
    NotMember { worker: String, generation: u64 },
    #[error(transparent)]
    Store(#[from] rendezvous::StoreError),
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
    /// The job has finished (a member left with it done): nothing to join.
    Finished,
    /// The coordinator is stopping (SIGTERM): no group forms; the worker leaves.
    Stopped,
    Assigned {
        assignment: Assignment,
        resume: Option<Committed>,
    },
}

#[derive(Debug)]
pub struct JobState {
    pub job: JobConfig,
    pub job_toml: String,
    membership: Membership,
    barrier: Barrier,
    /// The running generation's rendezvous store.
    rendezvous: Rendezvous,
    /// The address each worker advertised for the collective's traffic.
    hosts: std::collections::BTreeMap<String, String>,
    /// Workers that gave up (left without finishing), and why.
    gave_up: std::collections::BTreeMap<String, String>,
    /// (generation, step, worker): a member is terminating; the group checkpoints after that
    /// step and re-forms without it.
    drain: Option<(u64, u64, String)>,
    /// Commits that failed (the manifest could not be written), in all and in a row, and the
    /// last reason.
    commit_failures: (u64, u64, Option<String>),
    /// Prunings of old checkpoints that failed after their commit (counted apart: the commit
    /// stands), and the last reason.
    prune_failures: (u64, Option<String>),
    /// The step of the commit being written, if one is: no group forms (no resume point is
    /// handed out) until it is recorded.
    commit_in_flight: Option<u64>,
    /// Test-only delay of the commits' writer (`AXIAL_TEST_COMMIT_DELAY_MS` for `serve`), and
    /// the one step whose commit it delays (`AXIAL_TEST_COMMIT_DELAY_STEP`; every one if None).
    commit_delay: (u64, Option<u64>),
    /// The generation whose resume point was last verified.
    verified_for: Option<u64>,
    /// The coordinator got SIGTERM: the running group drains to a checkpoint, and no group
    /// forms again (see `stop_gracefully`).
    stopping: bool,
    /// Why the job cannot go on (commits failing again and again): workers are told to stop
    /// and the coordinator exits with it.
    failed: Option<String>,
    committed: Option<Committed>,
    /// Rank 0's vote (folder and files) for the pending checkpoint.
    pending_folder: Option<(PathBuf, Vec<FileEntry>, Position)>,
    finished: BTreeSet<String>,
    vote_timeout_ms: u64,
    /// End a running generation whose global step has not advanced for this long (0: never).
    progress_timeout_ms: u64,
    /// (generation, highest step reported in it, when it last advanced).
    advance: (u64, u64, u64),
    /// Last heartbeat per worker: (step, loss, images/s, at).
    progress: std::collections::BTreeMap<String, Report>,
    /// Rank 0's reports over time, evaluations by epoch, the last commits, and when each log
    /// line was written (unix ms; stamped at the next tick).
    history: std::collections::VecDeque<Point>,
    evals: std::collections::BTreeMap<u64, f64>,
    checkpoints: std::collections::VecDeque<CheckpointInfo>,
    log_times: Vec<u64>,
    /// Time of the last commit and how long its barrier took (ms).
    last_commit: Option<(u64, u64)>,
    barrier_started: Option<u64>,
    /// Accepted hyperparameter changes, oldest first.
    changes: Vec<HyperParameterChange>,
    /// The running generation's split of the batch by speed (`[train] rebalance`).
    rebalancer: stragglers::Rebalancer,
    /// Times this job's coordinator was started again on its saved state.
    restarts: u64,
    /// The generation `coordinator.json` reserves up to (see `Saved::generation`).
    generation_reserved: u64,
    pub log: Vec<String>,
}

impl JobState {
    /// `resume`: start from the newest verified checkpoint in the job's checkpoint dir.
    /// The generation always goes on from a saved `coordinator.json` (generations never
    /// repeat); with `resume` the restart count and the hyperparameter changes do too.
    ///
    /// A `coordinator.json` that exists but cannot be read (a permission, an I/O error) is an
    /// error, never taken as absent: generations would start again from 0, so an old worker's
    /// messages could pass as current, and the file would be overwritten.
    pub fn new(job: JobConfig, members: MembershipConfig, resume: bool) -> Result<Self, String> {
        let mut log = Vec::new();
        // A damaged state file is kept aside (never overwritten), and generations then start
        // from the clock's seconds, above any counter a previous coordinator can have reached.
        let mut damaged_floor = 0;
        let path = state_file(&job);
        let saved = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(s) => Some(s),
                Err(e) => {
                    let aside = path.with_extension("json.damaged");
                    let kept = std::fs::rename(&path, &aside)
                        .map(|()| format!("kept as {}", aside.display()))
                        .unwrap_or_else(|r| format!("could not keep it aside: {r}"));
                    damaged_floor = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(1 << 32, |d| d.as_secs());
                    log.push(format!(
                        "{} is damaged ({e}); {kept}; generations go on from {damaged_floor}",
                        path.display()
                    ));
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(format!(
                    "cannot read {}: {e} (the coordinator's saved generations; fix its \
                     permissions or the storage, or move it away to start the generations anew)",
                    path.display()
                ));
            }
        };
        let mut changes = Vec::new();
        let committed = if resume {
            let (found, skipped) = checkpoint::latest_verified(&job.checkpoint.dir);
            for (folder, why) in skipped {
                log.push(format!("skipping checkpoint {}: {why}", folder.display()));
            }
            found.map(|(folder, m)| {
                changes.clone_from(&m.changes);
                Committed {
                    folder,
                    position: m.position,
                }
            })
        } else {
            None
        };
        let (generation, restarts) = match &saved {
            Some(s) if resume => {
                // Changes accepted after the last commit are kept too.
                for c in &s.changes {
                    if !changes.iter().any(|k| k.id == c.id) {
                        changes.push(c.clone());
                    }
                }
                changes.sort_by_key(|c| c.id);
                (s.generation, s.restarts + 1)
            }
            Some(s) => (s.generation, 0),
            None => (damaged_floor, 0),
        };
        if resume && saved.is_some() {
            log.push(format!(
                "restarted on saved state: generation {generation}, restart {restarts}, {} hyperparameter change(s)",
                changes.len()
            ));
        }
        let state = Self {
            job_toml: job.to_toml(),
            job,
            membership: Membership::resume(members, generation),
            barrier: Barrier::new(),
            rendezvous: Rendezvous::default(),
            hosts: Default::default(),
            gave_up: Default::default(),
            drain: None,
            commit_failures: (0, 0, None),
            prune_failures: (0, None),
            commit_in_flight: None,
            commit_delay: (0, None),
            verified_for: None,
            stopping: false,
            failed: None,
            committed,
            pending_folder: None,
            finished: BTreeSet::new(),
            vote_timeout_ms: 120_000,
            progress_timeout_ms: 0,
            advance: (0, 0, 0),
            progress: std::collections::BTreeMap::new(),
            history: Default::default(),
            evals: Default::default(),
            checkpoints: Default::default(),
            log_times: Vec::new(),
            last_commit: None,
            barrier_started: None,
            changes,
            rebalancer: Default::default(),
            restarts,
            generation_reserved: generation + GENERATION_BLOCK,
            log,
        };
        state.save();
        Ok(state)
    }

    pub fn restarts(&self) -> u64 {
        self.restarts
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
    /// The job is over: a worker finished it, and every member has left since (a member that
    /// never does is dropped after the heartbeat timeout). The first leave does not end it, so
    /// the others' leaves still find a coordinator.
    pub fn done(&self) -> bool {
        !self.finished.is_empty()
            && self.membership.member_count() == 0
            && self.membership.phase() == crate::membership::Phase::Rendezvous
    }

    fn drain_membership_events(&mut self) {
        for e in self.membership.drain_events() {
            self.log.push(e.to_string());
        }
    }

    /// A join (or a poll while waiting). `abandoned`: the generation this worker gave up and
    /// why, which ends it at once if it is still the running one.
    pub fn join(
        &mut self,
        worker: &str,
        incarnation: u64,
        abandoned: Option<(u64, &str)>,
        now: u64,
    ) -> Join {
        if !self.finished.is_empty() && self.rank_of(worker).is_none() {
            // It leaves at once: the job does not wait for it.
            self.membership.forget(worker);
            return Join::Finished;
        }
        if self.stopping {
            // The group drained (or never formed): no group forms again; it leaves.
            let before = self.membership.generation();
            self.membership.forget(worker);
            self.after_membership_change(before);
            return Join::Stopped;
        }
        let before = self.membership.generation();
        if let Some((generation, reason)) = abandoned {
            self.membership
                .report_failure(worker, generation, reason, now);
            self.after_membership_change(before);
        }
        // A commit being written decides the resume point: no group forms before it is in.
        if self.commit_in_flight.is_some() {
            return Join::Wait;
        }
        let before = self.membership.generation();
        let reply = self.membership.join(worker, incarnation, now);
        self.after_membership_change(before);
        match reply {
            JoinReply::Wait => Join::Wait,
            JoinReply::Assigned(assignment) => {
                if self.verified_for != Some(assignment.generation) {
                    self.verified_for = Some(assignment.generation);
                    self.verify_resume_point();
                }
                Join::Assigned {
                    assignment,
                    resume: self.committed.clone(),
                }
            }
        }
    }

    /// Once per group, before its resume point is handed out: the committed checkpoint must
    /// still verify (every file against its SHA-256); a damaged one is skipped for the newest
    /// one that does, for every rank alike.
    fn verify_resume_point(&mut self) {
        let Some(c) = &self.committed else {
            return;
        };
        let Err(why) = checkpoint::verify(&c.folder) else {
            return;
        };
        self.log.push(format!(
            "the committed checkpoint {} does not verify ({why}); falling back",
            c.folder.display()
        ));
        let (found, skipped) = checkpoint::latest_verified(&self.job.checkpoint.dir);
        for (folder, why) in skipped {
            self.log
                .push(format!("skipping checkpoint {}: {why}", folder.display()));
        }
        self.committed = found.map(|(folder, m)| Committed {
            folder,
            position: m.position,
        });
        match &self.committed {
            Some(c) => self.log.push(format!(
                "resuming from {} (step {})",
                c.folder.display(),
                c.position.step
            )),
            None => self
                .log
                .push("no checkpoint verifies: the group starts from the beginning".into()),
        }
    }

    fn after_membership_change(&mut self, before: u64) {
        let now_gen = self.membership.generation();
        if now_gen != before {
            self.barrier.abort(before);
            self.pending_folder = None;
            self.rendezvous.clear();
            // The next group resumes from the last commit, below the steps reported so far:
            // progress (and the watchdog's clock) starts over with what it reports.
            self.progress.clear();
            // coordinator.json reserves generations in blocks: written (under the lock, before
            // anyone hears of the new generation) once per block, not at every change.
            if now_gen >= self.generation_reserved {
                self.generation_reserved = now_gen + GENERATION_BLOCK;
                self.save_or_log();
            }
        }
        self.drain_membership_events();
    }

    pub fn rank_of(&self, worker: &str) -> Option<usize> {
        self.membership.assignment_of(worker).map(|a| a.rank)
    }

    /// `worker` got SIGTERM: the running group checkpoints after a step every rank reaches only
    /// after hearing of it (as for hyperparameter changes), waits for the commit, and re-forms
    /// without it. Returns that step (the same for repeated calls).
    pub fn terminating(&mut self, worker: &str) -> Option<u64> {
        let generation = self.membership.generation();
        self.rank_of(worker)?;
        if let Some((g, step, _)) = &self.drain
            && *g == generation
        {
            return Some(*step);
        }
        // Not below the committed step: a group that just resumed from it has not reported yet.
        let step = self
            .highest_step()
            .saturating_add(self.job.train.log_every.saturating_mul(2))
            .saturating_add(1);
        self.log.push(format!(
            "{worker} is terminating: the group checkpoints after step {step} and re-forms without it"
        ));
        self.drain = Some((generation, step, worker.to_owned()));
        Some(step)
    }

    /// SIGTERM to the coordinator (a scheduler stops the whole job: Kueue suspending it, a
    /// `kubectl delete`, a node drain, `scancel`): the running group checkpoints after a step
    /// every rank reaches only after hearing of it, as for a terminating member, and then every
    /// worker leaves; no group forms again. Returns the drain step, if a group is running.
    pub fn stop_gracefully(&mut self) -> Option<u64> {
        self.stopping = true;
        let generation = self.membership.generation();
        let running = self.membership.phase() == crate::membership::Phase::Running;
        if !running {
            self.log.push("stopping: no group is running".into());
            return None;
        }
        if let Some((g, step, _)) = &self.drain
            && *g == generation
        {
            return Some(*step);
        }
        let step = self
            .highest_step()
            .saturating_add(self.job.train.log_every.saturating_mul(2))
            .saturating_add(1);
        self.log.push(format!(
            "stopping (SIGTERM): the group checkpoints after step {step}, then every worker leaves"
        ));
        self.drain = Some((generation, step, "the coordinator".to_owned()));
        Some(step)
    }

    /// Stopping, and every member has left (or was dropped).
    pub fn stopped(&self) -> bool {
        self.stopping && self.membership.member_count() == 0
    }

    /// Why the job cannot go on, if it cannot.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The step the running group drains after, if a member is terminating.
    pub fn drain_at(&self) -> Option<u64> {
        self.drain
            .as_ref()
            .filter(|(g, _, _)| self.membership.is_current(*g))
            .map(|(_, step, _)| *step)
    }

    /// Records the address `worker` advertises for the collective's traffic.
    pub fn set_host(&mut self, worker: &str, host: &str) {
        if !host.is_empty() && self.hosts.get(worker).map(String::as_str) != Some(host) {
            self.hosts.insert(worker.to_owned(), host.to_owned());
        }
        self.gave_up.remove(worker);
    }

    /// One operation on the rendezvous store of `generation`, for one of its ranks only.
    pub fn store(
        &mut self,
        worker: &str,
        generation: u64,
        op: rendezvous::Op,
    ) -> Result<rendezvous::Outcome, StoreRefused> {
        if !self.membership.is_current(generation) {
            return Err(StoreRefused::Stale {
                asked: generation,
                running: self.membership.generation(),
            });
        }
        if self.rank_of(worker).is_none() {
            return Err(StoreRefused::NotMember {
                worker: worker.to_owned(),
                generation,
            });
        }
        Ok(self.rendezvous.apply(generation, op)?)
    }

    pub fn heartbeat(&mut self, worker: &str, generation: u64, now: u64) -> HeartbeatReply {
        self.membership.heartbeat(worker, generation, now)
    }

    /// A worker leaves: done with the job (`finished`), or giving up for `reason`. Only a
    /// member or a standby can leave: a call for any other id changes nothing.
    pub fn leave(&mut self, worker: &str, finished: bool, reason: &str, now: u64) {
        if !self.membership.knows(worker) {
            self.log.push(format!(
                "ignored a leave from {worker}, which is not a member"
            ));
            return;
        }
        if finished {
            self.finished.insert(worker.to_owned());
        } else if !reason.is_empty() {
            self.log.push(format!("{worker} gave up: {reason}"));
            self.gave_up.insert(worker.to_owned(), reason.to_owned());
        }
        let before = self.membership.generation();
        self.membership.leave(worker, now);
        self.after_membership_change(before);
    }

    /// How long a checkpoint waits for every rank's vote before it is abandoned.
    pub fn set_vote_timeout(&mut self, ms: u64) {
        self.vote_timeout_ms = ms.max(1);
    }

    /// Test-only: the commits' writer first sleeps `ms` (a commit slower than the vote's
    /// deadline, as on a stalled shared file system): every commit's, or only that of `step`.
    pub fn set_commit_delay(&mut self, ms: u64, step: Option<u64>) {
        self.commit_delay = (ms, step);
    }

    /// A group whose global step does not advance for `ms` (0: off) is ended and re-formed: a
    /// training thread deadlocked in a live process (whose liveness heartbeats go on) does not
    /// join again, so it is left out. Keep it above the longest evaluation or checkpoint.
    pub fn set_progress_timeout(&mut self, ms: u64) {
        self.progress_timeout_ms = ms;
    }

    pub fn tick(&mut self, now: u64) {
        // When the log's new lines were written (within a tick).
        while self.log_times.len() < self.log.len() {
            self.log_times.push(wall_ms());
        }
        let before = self.membership.generation();
        self.membership.tick(now);
        if self.membership.phase() == crate::membership::Phase::Running {
            let generation = self.membership.generation();
            let step = self.progress.values().map(|p| p.step).max().unwrap_or(0);
            if self.advance.0 != generation || step > self.advance.1 {
                self.advance = (generation, step, now);
            } else if self.progress_timeout_ms > 0
                && now.saturating_sub(self.advance.2) >= self.progress_timeout_ms
            {
                let reason = format!(
                    "no progress past step {step} for {} s",
                    self.progress_timeout_ms / 1000
                );
                self.membership.end_generation(&reason, now);
            }
        }
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
