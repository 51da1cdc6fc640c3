//! The job's state: membership, the collective's rendezvous store, the checkpoint barrier and
//! the committed position, composed; plain data, time as an argument, no sockets.
//!
//! Persistence: what must survive a restart of the coordinator is on disk — the job file, the
//! token file, the committed checkpoints (each `manifest.json` holds the step, epoch, the
//! sample ledger and the hyperparameter changes) and `coordinator.json` beside them (the last
//! generation, the restart count, every accepted hyperparameter change), written atomically
//! whenever one of those changes. A restarted coordinator goes on from the saved generation,
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

/// What a rank's training heartbeat reported (see `axial.v1.HeartbeatRequest`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Report {
    pub step: u64,
    pub loss: f64,
    pub images_per_second: f64,
    pub lr: f64,
    pub total_steps: u64,
    /// Mean seconds per step: data_wait, forward, backward, allreduce_wait, optimizer.
    pub phase_seconds: [f64; 5],
    /// An evaluation: its epoch (from 1) and validation top-1.
    pub eval: Option<(u64, f64)>,
    /// When it arrived (the state machines' clock, ms).
    #[serde(skip)]
    pub at: u64,
}

/// A point of the job's progress over time, from rank 0's reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Unix time, ms.
    pub t: u64,
    pub step: u64,
    pub loss: f64,
    pub images_per_second: f64,
    pub lr: f64,
}

/// A committed checkpoint, for the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointInfo {
    pub step: u64,
    pub epoch: u64,
    /// Unix time of the commit, ms.
    pub t: u64,
    pub bytes: u64,
}

/// A ranked worker's step, phase by phase, for the dashboard's straggler view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankPhases {
    pub id: String,
    pub rank: usize,
    pub host: String,
    /// Mean seconds per step (the sum of the phases).
    pub step_seconds: f64,
    pub phase_seconds: [f64; 5],
}

/// An event with its time (unix ms).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimedEvent {
    pub t: u64,
    pub text: String,
}

/// Points the progress history keeps (when full, every other one is dropped: the whole run
/// at a coarser grain).
const HISTORY_POINTS: usize = 1000;
/// Committed checkpoints the dashboard lists.
const CHECKPOINTS_SHOWN: usize = 20;
/// Workers `/api/status` lists one by one (failed first, then the slowest); the rest are
/// counted.
pub const WORKERS_LISTED: usize = 200;

/// Unix time in ms.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checkpoint commits that may fail in a row before the job stops.
pub const MAX_COMMIT_FAILURES: u64 = 3;

/// Hyperparameter changes a job takes (each heartbeat reply carries them all).
pub const MAX_CHANGES: usize = 1000;
/// Generations reserved by one write of `coordinator.json` (a re-formation takes two).
const GENERATION_BLOCK: u64 = 16;

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
    Assigned {
        assignment: Assignment,
        resume: Option<Committed>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteResult {
    pub accepted: bool,
    pub committed: bool,
    pub reason: String,
}

/// What a vote came to: its reply, or a commit to write first.
#[derive(Debug)]
pub enum Cast {
    Done(VoteResult),
    Commit(Box<PendingCommit>),
}

/// A checkpoint every rank has voted for: its manifest, to be written into its folder (and
/// the older checkpoints pruned) without the state lock held.
#[derive(Debug)]
pub struct PendingCommit {
    pub folder: PathBuf,
    pub position: Position,
    manifest: CheckpointManifest,
    dir: PathBuf,
    keep: usize,
}

impl PendingCommit {
    /// Writes the manifest (which commits the checkpoint) and prunes the checkpoints beyond
    /// `keep`, never this one.
    pub fn write(&self) -> Result<(), String> {
        checkpoint::commit(&self.folder, &self.manifest)
            .map_err(|e| format!("{}: {e}", self.folder.display()))?;
        checkpoint::prune(&self.dir, self.keep, &self.folder).map_err(|e| e.to_string())
    }
}

/// What `coordinator.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    /// Every generation this coordinator used is below this one (generations are reserved in
    /// blocks of `GENERATION_BLOCK`); a restarted coordinator goes on above it.
    generation: u64,
    restarts: u64,
    #[serde(default)]
    changes: Vec<HyperParameterChange>,
}

/// The newest verified checkpoint, if it is the job's last (every epoch done): resuming such a
/// job has nothing left to do.
pub fn finished_at(job: &JobConfig) -> Option<PathBuf> {
    let (found, _) = checkpoint::latest_verified(&job.checkpoint.dir);
    found
        .filter(|(_, m)| m.position.epoch >= job.train.epochs && m.position.consumed == 0)
        .map(|(folder, _)| folder)
}

/// The file a coordinator keeps its own state in, beside the job's checkpoints.
pub fn state_file(job: &JobConfig) -> PathBuf {
    job.checkpoint.dir.join("coordinator.json")
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
    pub fn new(job: JobConfig, members: MembershipConfig, resume: bool) -> Self {
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
            Err(_) => None,
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
            restarts,
            generation_reserved: generation + GENERATION_BLOCK,
            log,
        };
        state.save();
        state
    }

    /// Writes `coordinator.json` (atomically); a failure is logged, not fatal: the committed
    /// checkpoints still hold everything a resume needs.
    fn save(&self) -> Option<String> {
        let saved = Saved {
            generation: self.generation_reserved,
            restarts: self.restarts,
            changes: self.changes.clone(),
        };
        let path = state_file(&self.job);
        let result = std::fs::create_dir_all(&self.job.checkpoint.dir)
            .and_then(|()| serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other))
            .and_then(|bytes| checkpoint::write_atomic(&path, &bytes));
        result
            .err()
            .map(|e| format!("could not save {}: {e}", path.display()))
    }

    fn save_or_log(&mut self) {
        if let Some(e) = self.save() {
            self.log.push(e);
        }
    }

    /// Every accepted hyperparameter change, oldest first.
    pub fn changes(&self) -> &[HyperParameterChange] {
        &self.changes
    }

    pub fn restarts(&self) -> u64 {
        self.restarts
    }

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
        let reported = self
            .progress
            .values()
            .map(|p| p.step)
            .chain(self.committed.as_ref().map(|c| c.position.step))
            .max()
            .unwrap_or(0);
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
        let before = self.membership.generation();
        if let Some((generation, reason)) = abandoned {
            self.membership
                .report_failure(worker, generation, reason, now);
        }
        let reply = self.membership.join(worker, incarnation, now);
        self.after_membership_change(before);
        match reply {
            JoinReply::Wait => Join::Wait,
            JoinReply::Assigned(assignment) => Join::Assigned {
                assignment,
                resume: self.committed.clone(),
            },
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
        let reported = self.progress.values().map(|p| p.step).max().unwrap_or(0);
        let step = reported
            .saturating_add(self.job.train.log_every.saturating_mul(2))
            .saturating_add(1);
        self.log.push(format!(
            "{worker} is terminating: the group checkpoints after step {step} and re-forms without it"
        ));
        self.drain = Some((generation, step, worker.to_owned()));
        Some(step)
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
        self.progress.insert(worker.to_owned(), report);
    }

    /// A snapshot for `/api/status` and `/metrics`.
    pub fn status(&self, now: u64) -> Status {
        let workers = self
            .membership
            .workers()
            .into_iter()
            .map(|(id, rank, last_seen, standby)| {
                let p = self.progress.get(&id).copied().unwrap_or_default();
                let (step, loss, ips) = (p.step, p.loss, p.images_per_second);
                WorkerStatus {
                    host: self.hosts.get(&id).cloned().unwrap_or_default(),
                    reason: String::new(),
                    state: if standby {
                        "standby"
                    } else if rank.is_some() {
                        "running"
                    } else {
                        "joining"
                    },
                    id,
                    rank,
                    since_heartbeat_ms: now.saturating_sub(last_seen),
                    step,
                    loss,
                    images_per_second: ips,
                }
            })
            .chain(self.gave_up.iter().map(|(id, reason)| WorkerStatus {
                id: id.clone(),
                state: "failed",
                rank: None,
                host: self.hosts.get(id).cloned().unwrap_or_default(),
                reason: reason.clone(),
                since_heartbeat_ms: 0,
                step: 0,
                loss: 0.0,
                images_per_second: 0.0,
            }))
            .collect::<Vec<_>>();
        let lead_ips = workers
            .iter()
            .find(|w| w.rank == Some(0))
            .map_or(0.0, |w| w.images_per_second);
        let lead_report = self
            .membership
            .workers()
            .into_iter()
            .find(|(_, rank, _, _)| *rank == Some(0))
            .and_then(|(id, _, _, _)| self.progress.get(&id).copied());
        // The straggler view: every ranked worker's step by phase, slowest first.
        let mut ranks: Vec<RankPhases> = self
            .membership
            .workers()
            .into_iter()
            .filter_map(|(id, rank, _, _)| {
                let p = self.progress.get(&id)?;
                Some(RankPhases {
                    host: self.hosts.get(&id).cloned().unwrap_or_default(),
                    rank: rank?,
                    step_seconds: p.phase_seconds.iter().sum(),
                    phase_seconds: p.phase_seconds,
                    id,
                })
            })
            .collect();
        ranks.sort_by(|a, b| b.step_seconds.total_cmp(&a.step_seconds));
        let median = ranks.get(ranks.len() / 2).map_or(0.0, |r| r.step_seconds);
        let step_skew = ranks
            .first()
            .filter(|_| median > 0.0)
            .map(|r| r.step_seconds / median);
        let worker_count = workers.len();
        let mut workers_by_state = std::collections::BTreeMap::new();
        for w in &workers {
            *workers_by_state.entry(w.state).or_insert(0) += 1;
        }
        let mut workers = workers;
        // Failed first, then the slowest (highest time since a heartbeat, then by step).
        workers.sort_by_key(|w| (w.state != "failed", std::cmp::Reverse(w.since_heartbeat_ms)));
        workers.truncate(WORKERS_LISTED);
        // The ranks' reports, or the committed step: every group resumes from that one, and
        // once the members have left (a finished job) it is the last step.
        let global_step = self
            .progress
            .values()
            .map(|p| p.step)
            .chain(self.committed.as_ref().map(|c| c.position.step))
            .max()
            .unwrap_or(0);
        let total_steps = lead_report.map_or(0, |p| p.total_steps);
        // Steps per second over the last minute of history (or what there is).
        let eta_seconds = {
            let last = self.history.back();
            let first = last.and_then(|l| {
                self.history
                    .iter()
                    .find(|p| l.t.saturating_sub(p.t) <= 60_000 && p.step < l.step)
            });
            match (first, last) {
                (Some(a), Some(b)) if b.t > a.t && total_steps > global_step => {
                    let rate = (b.step - a.step) as f64 / ((b.t - a.t) as f64 / 1e3);
                    Some((total_steps - global_step) as f64 / rate)
                }
                _ => None,
            }
        };
        let stamped = |i: usize| self.log_times.get(i).copied().unwrap_or_else(wall_ms);
        Status {
            job: self
                .job
                .model
                .arch
                .clone()
                .unwrap_or_else(|| "custom".into()),
            epochs: self.job.train.epochs,
            generation: self.membership.generation(),
            world: self.membership.world(),
            global_step,
            total_steps,
            eta_seconds,
            lr: lead_report.map_or(0.0, |p| p.lr),
            images_per_second: lead_ips,
            committed: self.committed.as_ref().map(|c| CommittedStatus {
                folder: c.folder.display().to_string(),
                step: c.position.step,
                epoch: c.position.epoch,
                consumed: c.position.consumed,
                samples_seen: c.position.samples_seen,
                age_ms: self.last_commit.map(|(at, _)| now.saturating_sub(at)),
            }),
            checkpoint_ms: self.last_commit.map(|(_, took)| took),
            pending_checkpoint: self.barrier.pending_step(),
            workers,
            worker_count,
            workers_by_state,
            ranks: ranks.into_iter().take(WORKERS_LISTED.min(20)).collect(),
            step_skew,
            history: self.history.iter().copied().collect(),
            evals: self.evals.iter().map(|(e, t)| (*e, *t)).collect(),
            checkpoints: self.checkpoints.iter().rev().cloned().collect(),
            checkpoint_keep: self.job.checkpoint.keep,
            timeline: self
                .log
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    [
                        "Formed",
                        "Lost",
                        "Failed",
                        "Restarted",
                        "Left",
                        "gave up",
                        "terminating",
                        "commit",
                        "abandoned",
                        "restarted on",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                        && !l.starts_with("committed")
                })
                .rev()
                .take(100)
                .map(|(i, l)| TimedEvent {
                    t: stamped(i),
                    text: l.clone(),
                })
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect(),
            restarts: self.restarts,
            commit_failures: self.commit_failures.0,
            commit_error: self.commit_failures.2.clone(),
            failed: self.failed.clone(),
            finished: self.done(),
            changes: self.changes.clone(),
            events: self.log.iter().rev().take(20).rev().cloned().collect(),
        }
    }

    /// A rank's vote for the checkpoint at `pos.step`; commits when every rank has voted
    /// (here, on this thread: the service writes a commit outside the state lock, through
    /// [`JobState::cast_vote`], [`PendingCommit::write`] and [`JobState::finish_commit`]).
    pub fn vote(
        &mut self,
        rank: usize,
        generation: u64,
        pos: Position,
        folder: Option<PathBuf>,
        files: Vec<FileEntry>,
        now: u64,
    ) -> VoteResult {
        match self.cast_vote(rank, generation, pos, folder, files, now) {
            Cast::Done(v) => v,
            Cast::Commit(c) => {
                let written = c.write();
                self.finish_commit(c, written, now)
            }
        }
    }

    /// A rank's vote, without the commit's disk I/O: when it completes the barrier, the commit
    /// to write (then [`JobState::finish_commit`]).
    pub fn cast_vote(
        &mut self,
        rank: usize,
        generation: u64,
        pos: Position,
        folder: Option<PathBuf>,
        files: Vec<FileEntry>,
        now: u64,
    ) -> Cast {
        let refused = |reason: String| {
            Cast::Done(VoteResult {
                accepted: false,
                committed: false,
                reason,
            })
        };
        if !self.membership.is_current(generation) {
            return refused(format!(
                "stale generation {generation} (running: {})",
                self.membership.generation()
            ));
        }
        if let Err(reason) = self.check_vote_files(rank, pos.step, folder.as_deref(), &files) {
            self.log.push(format!(
                "refused a vote of rank {rank} for step {}: {reason}",
                pos.step
            ));
            return refused(reason);
        }
        if self.barrier.pending_step() != Some(pos.step) {
            self.barrier_started = Some(now);
            if let Err(e) = self.barrier.request(
                pos.step,
                generation,
                self.membership.world(),
                now + self.vote_timeout_ms,
            ) {
                return refused(e);
            }
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
            VoteOutcome::Recorded => Cast::Done(VoteResult {
                accepted: true,
                committed: false,
                reason: String::new(),
            }),
            VoteOutcome::Refused(reason) => refused(reason),
            VoteOutcome::Complete(_) => match self.prepare_commit() {
                Ok(c) => Cast::Commit(Box::new(c)),
                Err(reason) => Cast::Done(self.commit_failed(pos.step, reason)),
            },
        }
    }

    /// Records a written commit (or its failure); the vote's reply.
    pub fn finish_commit(
        &mut self,
        c: Box<PendingCommit>,
        written: Result<(), String>,
        now: u64,
    ) -> VoteResult {
        let pos = c.position;
        if let Err(reason) = written {
            return self.commit_failed(pos.step, reason);
        }
        self.log.push(format!(
            "committed {} (step {}, epoch {}, consumed {})",
            c.folder.display(),
            pos.step,
            pos.epoch,
            pos.consumed
        ));
        if self.checkpoints.len() >= CHECKPOINTS_SHOWN {
            self.checkpoints.pop_front();
        }
        self.checkpoints.push_back(CheckpointInfo {
            step: pos.step,
            epoch: pos.epoch,
            t: wall_ms(),
            bytes: c.manifest.files.iter().map(|f| f.bytes).sum(),
        });
        if self
            .committed
            .as_ref()
            .is_none_or(|k| k.position.step <= pos.step)
        {
            self.committed = Some(Committed {
                folder: c.folder,
                position: pos,
            });
        }
        self.last_commit = Some((now, now.saturating_sub(self.barrier_started.unwrap_or(now))));
        self.commit_failures.1 = 0;
        self.commit_failures.2 = None;
        VoteResult {
            accepted: true,
            committed: true,
            reason: String::new(),
        }
    }

    /// A commit that could not be made. The group must not train on without checkpoints: the
    /// vote is refused, the ranks re-form and resume from the last commit; after a few
    /// failures in a row the job stops, saying why.
    fn commit_failed(&mut self, step: u64, reason: String) -> VoteResult {
        self.commit_failures.0 += 1;
        self.commit_failures.1 += 1;
        self.commit_failures.2 = Some(reason.clone());
        self.log.push(format!(
            "commit of the checkpoint at step {step} failed: {reason}"
        ));
        if self.commit_failures.1 >= MAX_COMMIT_FAILURES {
            let why = format!(
                "{MAX_COMMIT_FAILURES} checkpoint commits failed in a row, the last: {reason}"
            );
            self.log.push(format!("stopping the job: {why}"));
            self.failed = Some(why);
        }
        VoteResult {
            accepted: false,
            committed: false,
            reason: format!("the commit failed: {reason}"),
        }
    }

    /// What a vote may name: rank 0 the folder `<checkpoint dir>/ckpt-<step>` and exactly the
    /// checkpoint's files (plain names, each once), the other ranks nothing. The coordinator
    /// writes the manifest into that folder, so a vote must not point it anywhere else.
    fn check_vote_files(
        &self,
        rank: usize,
        step: u64,
        folder: Option<&std::path::Path>,
        files: &[FileEntry],
    ) -> Result<(), String> {
        if rank != 0 {
            return match (folder, files.is_empty()) {
                (None, true) => Ok(()),
                _ => Err(format!("rank {rank} names files; only rank 0 writes them")),
            };
        }
        let Some(folder) = folder else {
            return Err("rank 0's vote names no checkpoint folder".into());
        };
        let expected = self.job.checkpoint.dir.join(checkpoint::folder_name(step));
        if folder != expected {
            return Err(format!(
                "folder {} is not {} (the checkpoint of step {step})",
                folder.display(),
                expected.display()
            ));
        }
        let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        let mut wanted = checkpoint::FILES.to_vec();
        wanted.sort_unstable();
        if names != wanted {
            return Err(format!(
                "files {names:?} are not the checkpoint's files {wanted:?}"
            ));
        }
        Ok(())
    }

    /// The manifest of the checkpoint every rank has voted for, to be written.
    fn prepare_commit(&mut self) -> Result<PendingCommit, String> {
        let (folder, files, pos) = self
            .pending_folder
            .take()
            .ok_or("rank 0 did not report the checkpoint folder")?;
        Ok(PendingCommit {
            manifest: CheckpointManifest {
                format: checkpoint::FORMAT.into(),
                step: pos.step,
                epoch: pos.epoch,
                position: pos,
                model: self.job.model.clone(),
                world: self.membership.world() as u64,
                files,
                changes: self.changes.clone(),
            },
            folder,
            position: pos,
            dir: self.job.checkpoint.dir.clone(),
            keep: self.job.checkpoint.keep,
        })
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    pub id: String,
    /// running, joining, standby, or failed (gave up: see `reason`).
    pub state: &'static str,
    pub rank: Option<usize>,
    /// The address it advertised for the collective's traffic.
    pub host: String,
    /// Why a failed worker gave up.
    pub reason: String,
    pub since_heartbeat_ms: u64,
    pub step: u64,
    pub loss: f64,
    pub images_per_second: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CommittedStatus {
    pub folder: String,
    pub step: u64,
    pub epoch: u64,
    pub consumed: u64,
    pub samples_seen: u64,
    pub age_ms: Option<u64>,
}

/// What `/api/status` returns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub job: String,
    pub epochs: u64,
    pub generation: u64,
    pub world: usize,
    pub global_step: u64,
    /// The job's total steps (rank 0's report) and the time left at the last minute's pace.
    pub total_steps: u64,
    pub eta_seconds: Option<f64>,
    /// The learning rate of rank 0's last reported step.
    pub lr: f64,
    pub images_per_second: f64,
    pub committed: Option<CommittedStatus>,
    pub checkpoint_ms: Option<u64>,
    pub pending_checkpoint: Option<u64>,
    /// At most `WORKERS_LISTED` workers, failed first, then the slowest to heartbeat; all of
    /// them are counted in `worker_count`.
    pub workers: Vec<WorkerStatus>,
    pub worker_count: usize,
    /// All workers counted by state (running, joining, standby, failed).
    pub workers_by_state: std::collections::BTreeMap<&'static str, usize>,
    /// The slowest ranks' steps by phase (data_wait, forward, backward, allreduce_wait,
    /// optimizer), slowest first, and the slowest rank's step time over the median's.
    pub ranks: Vec<RankPhases>,
    pub step_skew: Option<f64>,
    /// Progress over time (rank 0), validation top-1 by epoch, the newest commits first, and
    /// the group's events (formed, lost, failed, left, ...) with their times.
    pub history: Vec<Point>,
    pub evals: Vec<(u64, f64)>,
    pub checkpoints: Vec<CheckpointInfo>,
    /// `[checkpoint] keep`: the newest this many commits are on disk, older ones pruned.
    pub checkpoint_keep: usize,
    pub timeline: Vec<TimedEvent>,
    /// Times the coordinator was restarted on this job's saved state.
    pub restarts: u64,
    /// Checkpoint commits that failed, and the last failure's reason while commits fail.
    pub commit_failures: u64,
    pub commit_error: Option<String>,
    /// Why the job stopped, if it could not go on.
    pub failed: Option<String>,
    /// The job has finished (every member left after a worker finished it).
    pub finished: bool,
    pub changes: Vec<HyperParameterChange>,
    pub events: Vec<String>,
}

impl Status {
    /// Prometheus exposition text, `axial_coordinator_*` (see `crate::metrics`).
    pub fn prometheus(&self) -> String {
        crate::metrics::CoordinatorMetrics::new().render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &std::path::Path) -> JobConfig {
        let text = format!(
            "[model]\narch = \"axial26s\"\nnum_classes = 10\n[data]\nformat = \"builtin\"\ntrain = 100\nval = 10\nimage_size = 32\n[checkpoint]\ndir = \"{}\"\n",
            dir.display()
        );
        JobConfig::parse(&text, "test", std::path::Path::new("/")).expect("job")
    }

    /// A group of exactly one worker, formed at its first join.
    fn one_worker(timeout_ms: u64) -> MembershipConfig {
        MembershipConfig {
            min: 1,
            max: 1,
            settle_ms: 0,
            timeout_ms,
        }
    }

    /// Writes rank 0's files of a checkpoint into `folder` and describes them.
    fn checkpoint_files(folder: &std::path::Path) -> Vec<FileEntry> {
        std::fs::create_dir_all(folder).expect("mkdir");
        for name in checkpoint::FILES {
            std::fs::write(folder.join(name), name.as_bytes()).expect("write");
        }
        checkpoint::describe(folder, &checkpoint::FILES).expect("describe")
    }

    /// A vote may only name its own checkpoint's folder and files (the coordinator writes the
    /// manifest there); anything else is refused and logged. Leaves act only on members.
    #[test]
    fn votes_naming_other_folders_or_files_and_strangers_leaving_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = JobState::new(job(tmp.path()), one_worker(10_000), false);
        let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
            panic!("group")
        };
        let g = assignment.generation;
        let pos = Position {
            step: 4,
            consumed: 32,
            samples_seen: 32,
            loss_scale: 1.0,
            ..Position::default()
        };
        let good = tmp.path().join("ckpt-0000000004");
        let files = checkpoint_files(&good);
        let renamed = |name: &str| {
            let mut f = files.clone();
            f[0].name = name.into();
            f
        };
        for (folder, files, why) in [
            (tmp.path().join("elsewhere"), files.clone(), "is not"),
            (std::path::PathBuf::from("/etc"), files.clone(), "is not"),
            (good.clone(), renamed("../../etc/passwd"), "are not"),
            (good.clone(), renamed("/etc/passwd"), "are not"),
            (good.clone(), files[..3].to_vec(), "are not"),
        ] {
            let v = s.vote(0, g, pos, Some(folder.clone()), files, 5);
            assert!(!v.accepted && v.reason.contains(why), "{folder:?}: {v:?}");
        }
        assert!(s.log.iter().any(|l| l.contains("refused a vote")));
        assert!(!good.join("manifest.json").exists());
        let v = s.vote(0, g, pos, Some(good.clone()), files, 6);
        assert!(v.committed, "{v:?}");
        // A leave for an id that is no member does nothing; the member is still running.
        s.leave("stranger", true, "", 7);
        s.leave("stranger", false, "go away", 7);
        assert_eq!(s.rank_of("a"), Some(0));
        assert!(!s.done());
        assert!(s.status(8).workers.iter().all(|w| w.id != "stranger"));
    }

    /// Two ranks vote; the coordinator commits the manifest, and status and metrics show it.
    #[test]
    fn votes_commit_and_status_reports() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let members = MembershipConfig {
            min: 2,
            max: 2,
            settle_ms: 100,
            timeout_ms: 10_000,
        };
        let mut s = JobState::new(job(tmp.path()), members, false);
        s.join("a", 1, None, 0);
        let Join::Assigned { assignment, .. } = s.join("b", 1, None, 0) else {
            panic!("group")
        };
        assert_eq!(assignment.world, 2);
        let g = assignment.generation;
        // The rendezvous store: for this generation's ranks only.
        let set = || crate::rendezvous::Op::Set {
            key: "k".into(),
            value: b"v".to_vec(),
        };
        assert!(s.store("a", g, set()).is_ok());
        assert!(matches!(
            s.store("a", g + 7, set()),
            Err(StoreRefused::Stale { .. })
        ));
        assert!(matches!(
            s.store("stranger", g, set()),
            Err(StoreRefused::NotMember { .. })
        ));
        s.record_progress("a", 12, 1.5, 300.0, 10);
        let folder = tmp.path().join("ckpt-0000000012");
        let files = checkpoint_files(&folder);
        let pos = Position {
            step: 12,
            consumed: 96,
            samples_seen: 96,
            loss_scale: 1.0,
            ..Position::default()
        };
        let ra = s.rank_of("a").expect("rank");
        let rb = s.rank_of("b").expect("rank");
        let first = s.vote(ra, g, pos, Some(folder.clone()), files, 20);
        assert!(first.accepted && !first.committed);
        assert!(
            !folder.join("manifest.json").exists(),
            "not committed before every rank voted"
        );
        let stale = s.vote(rb, g + 1, pos, None, Vec::new(), 25);
        assert!(!stale.accepted);
        let last = s.vote(rb, g, pos, None, Vec::new(), 30);
        assert!(last.committed, "{last:?}");
        let manifest = axial_common::checkpoint::verify(&folder).expect("committed and verified");
        assert_eq!(
            (manifest.step, manifest.world, manifest.position.consumed),
            (12, 2, 96)
        );

        let status = s.status(1030);
        assert_eq!(status.world, 2);
        assert_eq!(status.global_step, 12);
        let committed = status.committed.as_ref().expect("committed");
        assert_eq!((committed.step, committed.age_ms), (12, Some(1000)));
        let text = status.prometheus();
        for needle in [
            "axial_coordinator_workers{state=\"running\"} 2",
            "axial_coordinator_generation",
            "axial_coordinator_committed_step 12",
            "axial_coordinator_checkpoint_age_seconds 1",
            "# HELP axial_coordinator_global_step",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        let json = serde_json::to_string(&status).expect("json");
        assert!(json.contains("\"workers\"") && json.contains("\"events\""));
    }

    /// Hyperparameter changes: the coordinator picks a step every rank reaches only after
    /// hearing of the change, refuses earlier ones and bad values, records the changes in the
    /// next manifest, and a coordinator restarted on the saved state keeps them, counts the
    /// restart and goes on with newer generations.
    #[test]
    fn changes_are_scheduled_recorded_and_survive_a_restart() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let members = one_worker(10_000);
        let mut s = JobState::new(job(tmp.path()), members, false);
        let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
            panic!("group")
        };
        s.record_progress("a", 40, 1.0, 10.0, 5);
        let log_every = s.job.train.log_every;
        let change = s
            .set_hyperparameters(
                HyperParameterChange {
                    lr: Some(0.02),
                    ..Default::default()
                },
                6,
            )
            .expect("accepted");
        assert_eq!((change.id, change.from_step), (1, 40 + 2 * log_every + 1));
        let soon = s.set_hyperparameters(
            HyperParameterChange {
                weight_decay: Some(0.0),
                from_step: 41,
                ..Default::default()
            },
            7,
        );
        assert!(soon.expect_err("too soon").contains("too soon"));
        let bad = s.set_hyperparameters(
            HyperParameterChange {
                lr: Some(f64::INFINITY),
                ..Default::default()
            },
            7,
        );
        assert!(bad.expect_err("bad lr").contains("lr"));
        // The next checkpoint records the change.
        let folder = tmp.path().join("ckpt-0000000050");
        let files = checkpoint_files(&folder);
        let pos = Position {
            step: 50,
            consumed: 50,
            samples_seen: 50,
            loss_scale: 1.0,
            ..Position::default()
        };
        let v = s.vote(
            0,
            assignment.generation,
            pos,
            Some(folder.clone()),
            files,
            10,
        );
        assert!(v.committed, "{v:?}");
        let m = axial_common::checkpoint::verify(&folder).expect("manifest");
        assert_eq!(m.changes, vec![change.clone()]);
        let status = s.status(11);
        assert_eq!(status.changes.len(), 1);

        // The coordinator restarts on its saved state.
        let mut again = JobState::new(job(tmp.path()), members, true);
        assert_eq!(again.changes(), &[change][..]);
        assert_eq!(again.restarts(), 1);
        assert!(
            again
                .status(0)
                .prometheus()
                .contains("axial_coordinator_restarts_total 1")
        );
        let Join::Assigned {
            assignment: next,
            resume,
            ..
        } = again.join("a", 2, None, 0)
        else {
            panic!("group")
        };
        assert!(next.generation > assignment.generation);
        assert_eq!(resume.expect("resume point").position.step, 50);
    }

    /// Once a member has left with the job finished, a standby (or a late worker) is told the
    /// job is over instead of waiting for a group that will never form.
    #[test]
    fn after_the_job_finished_joiners_are_told_so() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let members = one_worker(10_000);
        let mut s = JobState::new(job(tmp.path()), members, false);
        assert!(matches!(s.join("a", 1, None, 0), Join::Assigned { .. }));
        assert!(matches!(s.join("standby", 1, None, 1), Join::Wait));
        s.leave("a", true, "", 2);
        assert!(matches!(s.join("standby", 1, None, 3), Join::Finished));
        assert!(s.done(), "the finished job's joiners are not waited for");
        assert!(matches!(s.join("late", 1, None, 4), Join::Finished));
    }

    /// A commit that fails (here the checkpoint's folder is a file, so the manifest cannot be
    /// written, as on a full or read-only disk) is refused, logged and counted, and shows in
    /// status and metrics; after a few failures in a row the job stops, saying why.
    #[test]
    fn failed_commits_are_refused_shown_and_stop_the_job_when_they_persist() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = JobState::new(job(tmp.path()), one_worker(10_000), false);
        let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
            panic!("group")
        };
        let g = assignment.generation;
        for (n, step) in [4u64, 8, 12].into_iter().enumerate() {
            let good = tmp.path().join(format!("written-{step}"));
            let files = checkpoint_files(&good);
            let folder = tmp.path().join(checkpoint::folder_name(step));
            std::fs::write(&folder, b"not a folder").expect("write");
            let pos = Position {
                step,
                loss_scale: 1.0,
                ..Position::default()
            };
            let v = s.vote(0, g, pos, Some(folder), files, 10 * step);
            assert!(!v.accepted && !v.committed, "{v:?}");
            assert!(v.reason.contains("commit failed"), "{v:?}");
            let status = s.status(10 * step);
            assert_eq!(status.commit_failures, n as u64 + 1);
            assert!(status.commit_error.is_some());
            assert!(status.prometheus().contains(&format!(
                "axial_coordinator_commit_failures_total {}",
                n + 1
            )));
        }
        let why = s.failed().expect("the job stops").to_owned();
        println!("{why}");
        assert!(
            why.contains("3 checkpoint commits failed in a row"),
            "{why}"
        );
        assert_eq!(s.status(200).failed.as_deref(), Some(why.as_str()));
    }

    /// The job ends only when every member has left, not at the first leave: the others'
    /// leaves must still find the coordinator (and `launch` then exits 0).
    #[test]
    fn the_job_ends_when_the_last_member_has_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let members = MembershipConfig {
            min: 2,
            max: 2,
            settle_ms: 100,
            timeout_ms: 10_000,
        };
        let mut s = JobState::new(job(tmp.path()), members, false);
        s.join("a", 1, None, 0);
        assert!(matches!(s.join("b", 1, None, 0), Join::Assigned { .. }));
        s.leave("a", true, "", 10);
        assert!(!s.done(), "b has not left yet");
        s.leave("b", true, "", 20);
        assert!(s.done());
        // A member that never leaves is dropped after the heartbeat timeout.
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = JobState::new(job(tmp.path()), members, false);
        s.join("a", 1, None, 0);
        s.join("b", 1, None, 0);
        s.leave("a", true, "", 10);
        s.tick(5_000);
        assert!(!s.done());
        s.tick(20_000);
        assert!(s.done());
    }

    /// With a progress timeout, a running group whose step stops advancing (while every member
    /// still heartbeats) is ended; without one it is left alone.
    #[test]
    fn a_stalled_group_is_ended_after_the_progress_timeout() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let members = one_worker(60_000);
        let mut s = JobState::new(job(tmp.path()), members, false);
        s.set_progress_timeout(1000);
        let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
            panic!("group")
        };
        s.tick(10);
        for (t, step) in [(500, 5), (1400, 9), (2300, 12)] {
            s.record_progress("a", step, 1.0, 1.0, t);
            s.tick(t);
        }
        assert_eq!(s.generation(), assignment.generation, "it advances");
        s.heartbeat("a", assignment.generation, 3200);
        s.tick(3200);
        assert_eq!(
            s.generation(),
            assignment.generation,
            "stalled for 0.9 s only"
        );
        s.tick(3400);
        assert!(s.generation() > assignment.generation, "stalled for 1.1 s");
        assert!(
            s.log.iter().any(|l| l.contains("no progress past step 12")),
            "{:?}",
            s.log
        );
        // The group re-forms and resumes from a commit at step 5: steps 6, 7, 8 are progress
        // although they are below the 12 reported before the rollback.
        let Join::Assigned {
            assignment: again, ..
        } = s.join("a", 1, None, 3500)
        else {
            panic!("group again")
        };
        s.tick(3500);
        for (t, step) in [(4000, 6), (4900, 7), (5800, 8)] {
            s.heartbeat("a", again.generation, t);
            s.record_progress("a", step, 1.0, 1.0, t);
            s.tick(t);
        }
        assert_eq!(
            s.generation(),
            again.generation,
            "progress after the rollback"
        );
        let mut off = JobState::new(job(tmp.path()), members, false);
        off.join("a", 1, None, 0);
        off.tick(10);
        off.tick(1_000_000);
        assert!(off.log.iter().all(|l| !l.contains("no progress")));
    }

    /// A damaged `coordinator.json` is kept aside byte for byte, not overwritten, and the new
    /// coordinator's generations start above any the old one can have used.
    #[test]
    fn a_damaged_state_file_is_kept_and_generations_stay_new() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let j = job(tmp.path());
        std::fs::write(state_file(&j), b"{ not json").expect("write");
        let mut s = JobState::new(j.clone(), one_worker(10_000), true);
        let aside = tmp.path().join("coordinator.json.damaged");
        assert_eq!(std::fs::read(&aside).expect("kept aside"), b"{ not json");
        assert!(
            s.log.iter().any(|l| l.contains("is damaged")),
            "{:?}",
            s.log
        );
        let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
            panic!("group")
        };
        assert!(
            assignment.generation > 1_000_000_000,
            "{}",
            assignment.generation
        );
        // The fresh state file is valid again.
        let again = JobState::new(j, one_worker(10_000), true);
        assert_eq!(again.restarts(), 1);
    }
}
