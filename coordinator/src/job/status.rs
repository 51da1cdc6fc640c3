//! What `/api/status` and `/metrics` show: a snapshot of the job, its workers aggregated (the
//! failing and the slowest listed, the rest counted), the straggler view, progress over time.

use super::*;

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
    /// The slowest ranks' steps by phase (`axial_common::STEP_PHASES`), the slowest first (by
    /// samples per second of their own work), and the median rank's speed over the slowest's
    /// (1: no straggler).
    pub ranks: Vec<RankPhases>,
    pub straggler_ratio: Option<f64>,
    /// The running generation's split of the global batch by speed (none: the even split).
    pub batch_shares: Option<super::BatchShares>,
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

/// A ranked worker's step, phase by phase, for the dashboard's straggler view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankPhases {
    pub id: String,
    pub rank: usize,
    pub host: String,
    /// Mean seconds per step (the sum of the phases).
    pub step_seconds: f64,
    /// Its own work per step: the phases without the waits for the other ranks.
    pub busy_seconds: f64,
    /// Its samples of each step, and its speed: samples per second of its own work.
    pub share: u64,
    pub samples_per_second: f64,
    pub phase_seconds: [f64; axial_common::STEP_PHASES.len()],
}

/// An event with its time (unix ms).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimedEvent {
    pub t: u64,
    pub text: String,
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

/// Workers `/api/status` lists one by one (failed first, then the slowest); the rest are
/// counted.
pub const WORKERS_LISTED: usize = 200;

impl JobState {
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
        // The straggler view: every ranked worker's step by phase, the slowest (by samples
        // per second of its own work) first.
        let speeds = self.rank_speeds();
        let mut ranks: Vec<RankPhases> = self
            .membership
            .workers()
            .into_iter()
            .filter_map(|(id, rank, _, _)| {
                let rank = rank?;
                let p = self.progress.get(&id)?;
                let speed = speeds.get(rank).copied().flatten()?;
                Some(RankPhases {
                    host: self.hosts.get(&id).cloned().unwrap_or_default(),
                    rank,
                    step_seconds: p.phase_seconds.iter().sum(),
                    busy_seconds: speed.busy_seconds,
                    share: speed.share,
                    samples_per_second: speed.samples_per_second,
                    phase_seconds: p.phase_seconds,
                    id,
                })
            })
            .collect();
        ranks.sort_by(|a, b| a.samples_per_second.total_cmp(&b.samples_per_second));
        let median = ranks
            .get(ranks.len() / 2)
            .map_or(0.0, |r| r.samples_per_second);
        let straggler_ratio = ranks
            .first()
            .filter(|r| r.samples_per_second > 0.0 && median > 0.0)
            .map(|r| median / r.samples_per_second);
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
        let global_step = self.highest_step();
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
            straggler_ratio,
            batch_shares: self.shares_for(self.generation()).cloned(),
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
}
