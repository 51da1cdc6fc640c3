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
    /// Last heartbeat per worker: (step, loss, images/s, at).
    progress: std::collections::BTreeMap<String, (u64, f64, f64, u64)>,
    /// Time of the last commit and how long its barrier took (ms).
    last_commit: Option<(u64, u64)>,
    barrier_started: Option<u64>,
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
            progress: std::collections::BTreeMap::new(),
            last_commit: None,
            barrier_started: None,
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

    /// Records what a heartbeat said about progress.
    pub fn record_progress(
        &mut self,
        worker: &str,
        step: u64,
        loss: f64,
        images_per_second: f64,
        now: u64,
    ) {
        self.progress
            .insert(worker.to_owned(), (step, loss, images_per_second, now));
    }

    /// A snapshot for `/api/status` and `/metrics`.
    pub fn status(&self, now: u64) -> Status {
        let workers = self
            .membership
            .workers()
            .into_iter()
            .map(|(id, rank, last_seen, standby)| {
                let (step, loss, ips, _) = self.progress.get(&id).copied().unwrap_or_default();
                WorkerStatus {
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
            .collect::<Vec<_>>();
        let lead = workers.iter().find(|w| w.rank == Some(0));
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
            global_step: workers.iter().map(|w| w.step).max().unwrap_or(0),
            images_per_second: lead.map_or(0.0, |w| w.images_per_second),
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
            events: self.log.iter().rev().take(20).rev().cloned().collect(),
        }
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
        if self.barrier.pending_step() != Some(pos.step) {
            self.barrier_started = Some(now);
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
                Ok(()) => {
                    self.last_commit =
                        Some((now, now.saturating_sub(self.barrier_started.unwrap_or(now))));
                    VoteResult {
                        accepted: true,
                        committed: true,
                        reason: String::new(),
                    }
                }
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    pub id: String,
    pub state: &'static str,
    pub rank: Option<usize>,
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
    pub images_per_second: f64,
    pub committed: Option<CommittedStatus>,
    pub checkpoint_ms: Option<u64>,
    pub pending_checkpoint: Option<u64>,
    pub workers: Vec<WorkerStatus>,
    pub events: Vec<String>,
}

impl Status {
    /// Prometheus exposition text, `axial_coordinator_*`.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, lines: Vec<(String, f64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for (labels, v) in lines {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let by_state = ["running", "joining", "standby"]
            .iter()
            .map(|s| {
                (
                    format!("{{state=\"{s}\"}}"),
                    self.workers.iter().filter(|w| w.state == *s).count() as f64,
                )
            })
            .collect();
        gauge("axial_coordinator_workers", "Workers by state.", by_state);
        gauge(
            "axial_coordinator_generation",
            "Current generation (changes with every membership change).",
            vec![(String::new(), self.generation as f64)],
        );
        gauge(
            "axial_coordinator_world_size",
            "Ranks in the running group.",
            vec![(String::new(), self.world as f64)],
        );
        gauge(
            "axial_coordinator_global_step",
            "Highest optimizer step reported by a worker.",
            vec![(String::new(), self.global_step as f64)],
        );
        gauge(
            "axial_coordinator_samples_per_second",
            "Training samples per second (all ranks), as rank 0 reports it.",
            vec![(String::new(), self.images_per_second)],
        );
        if let Some(c) = &self.committed {
            gauge(
                "axial_coordinator_committed_step",
                "Step of the newest committed checkpoint.",
                vec![(String::new(), c.step as f64)],
            );
            if let Some(age) = c.age_ms {
                gauge(
                    "axial_coordinator_checkpoint_age_seconds",
                    "Seconds since the newest checkpoint was committed.",
                    vec![(String::new(), age as f64 / 1e3)],
                );
            }
        }
        if let Some(ms) = self.checkpoint_ms {
            gauge(
                "axial_coordinator_checkpoint_duration_seconds",
                "From the first to the last vote of the newest checkpoint.",
                vec![(String::new(), ms as f64 / 1e3)],
            );
        }
        out
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
        s.join("a", 1, 0);
        let Join::Assigned { assignment, .. } = s.join("b", 1, 0) else {
            panic!("group")
        };
        assert_eq!(assignment.world, 2);
        let g = assignment.generation;
        s.publish_store("a", g, "127.0.0.1", 4000).expect("store");
        assert!(
            s.publish_store("a", g + 7, "127.0.0.1", 4000).is_err(),
            "stale generation"
        );
        s.record_progress("a", 12, 1.5, 300.0, 10);
        let folder = tmp.path().join("ckpt-0000000012");
        std::fs::create_dir_all(&folder).expect("mkdir");
        std::fs::write(folder.join("model.safetensors"), b"weights").expect("write");
        let files =
            axial_common::checkpoint::describe(&folder, &["model.safetensors"]).expect("describe");
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
}
