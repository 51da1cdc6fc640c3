//! Checkpoint votes and commits: a vote is checked and counted by the barrier; the last one
//! makes a commit, written without the state lock by the service as one unit that a dropped
//! request cannot cut in half (rename of rank 0's staging folder to `ckpt-<step>`, the
//! manifest, fsync, then the committed pointer; see `service.rs`). Pruning the oldest
//! checkpoints comes after, best effort: its failures are logged and counted apart.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteResult {
    pub accepted: bool,
    pub committed: bool,
    pub reason: String,
}

/// Who votes: the rank (from the membership), its generation, and whether rank 0 votes for
/// every rank of the generation (`VoteRequest.for_group`: they passed the group's collective
/// barrier at the step, so they send no vote of their own).
#[derive(Debug, Clone, Copy)]
pub struct Voter {
    pub rank: usize,
    pub generation: u64,
    pub for_group: bool,
}

impl Voter {
    /// A rank voting for itself.
    pub fn rank(rank: usize, generation: u64) -> Self {
        Self {
            rank,
            generation,
            for_group: false,
        }
    }

    /// Rank 0 voting for its whole group.
    pub fn group(generation: u64) -> Self {
        Self {
            rank: 0,
            generation,
            for_group: true,
        }
    }
}

/// What a vote came to: its reply, or a commit to write first.
#[derive(Debug)]
pub enum Cast {
    Done(VoteResult),
    Commit(Box<PendingCommit>),
}

/// A checkpoint every rank has voted for: rank 0's staging folder, to be renamed to its
/// `ckpt-<step>` folder and committed by its manifest, without the state lock held.
#[derive(Debug)]
pub struct PendingCommit {
    /// Where rank 0 wrote the files (`.staging-g<generation>-<step>`).
    pub staging: PathBuf,
    /// The committed folder (`ckpt-<step>`).
    pub folder: PathBuf,
    pub position: Position,
    manifest: CheckpointManifest,
    dir: PathBuf,
    keep: usize,
    /// Test-only: the writer sleeps this long first (a commit slower than a vote's deadline,
    /// as on a stalled shared file system; see `JobState::set_commit_delay`).
    delay_ms: u64,
}

impl PendingCommit {
    /// Commits the checkpoint: the staging folder becomes `ckpt-<step>`, then its manifest is
    /// written (fsync'ed). Never touches a folder that holds a manifest.
    pub fn write(&self) -> Result<(), String> {
        if self.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
        }
        checkpoint::commit(&self.staging, &self.folder, &self.manifest)
            .map_err(|e| format!("{}: {e}", self.folder.display()))
    }

    /// Removes the checkpoints beyond `keep` (never this one) and what can never be committed
    /// (see `checkpoint::prune`). Best effort, after the commit.
    pub fn prune(&self) -> Result<(), String> {
        checkpoint::prune(&self.dir, self.keep, &self.folder, self.position.step)
            .map_err(|e| format!("pruning {}: {e}", self.dir.display()))
    }
}

/// Checkpoint commits that may fail in a row before the job stops.
pub const MAX_COMMIT_FAILURES: u64 = 3;

impl JobState {
    /// A rank's vote for the checkpoint at `pos.step`; commits when every rank has voted
    /// (here, on this thread: the service writes a commit outside the state lock, through
    /// [`JobState::cast_vote`], [`PendingCommit::write`] and [`JobState::finish_commit`]).
    pub fn vote(
        &mut self,
        voter: Voter,
        pos: Position,
        folder: Option<PathBuf>,
        files: Vec<FileEntry>,
        now: u64,
    ) -> VoteResult {
        match self.cast_vote(voter, pos, folder, files, now) {
            Cast::Done(v) => v,
            Cast::Commit(c) => {
                let written = c.write();
                let pruned = written.as_ref().ok().map(|()| c.prune());
                let v = self.finish_commit(c, written, now);
                if let Some(p) = pruned {
                    self.finish_pruning(p);
                }
                v
            }
        }
    }

    /// A rank's vote, without the commit's disk I/O: when it completes the barrier, the commit
    /// to write (then [`JobState::finish_commit`]).
    pub fn cast_vote(
        &mut self,
        voter: Voter,
        pos: Position,
        folder: Option<PathBuf>,
        files: Vec<FileEntry>,
        now: u64,
    ) -> Cast {
        let Voter {
            rank,
            generation,
            for_group,
        } = voter;
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
        if let Some(c) = &self.committed
            && pos.step <= c.position.step
        {
            return refused(format!(
                "step {} is not after the committed step {}",
                pos.step, c.position.step
            ));
        }
        if let Some(step) = self.commit_in_flight {
            return refused(format!("the commit of step {step} is being written"));
        }
        if for_group && rank != 0 {
            return refused(format!("rank {rank} votes for the group; only rank 0 does"));
        }
        if let Err(reason) =
            self.check_vote_files(rank, generation, pos.step, folder.as_deref(), &files)
        {
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
        let outcome = if for_group {
            self.barrier.vote_for_group(generation, pos.step, votes)
        } else {
            self.barrier.vote(rank, generation, pos.step, votes)
        };
        match outcome {
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

    /// Records a written commit (or its failure); the vote's reply. Groups may form again.
    pub fn finish_commit(
        &mut self,
        c: Box<PendingCommit>,
        written: Result<(), String>,
        now: u64,
    ) -> VoteResult {
        let pos = c.position;
        self.commit_in_flight = None;
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

    /// Records the pruning after a commit: a failure is logged and counted, and the commit
    /// stands (every checkpoint it kept is still whole).
    pub fn finish_pruning(&mut self, pruned: Result<(), String>) {
        if let Err(reason) = pruned {
            self.prune_failures.0 += 1;
            self.log
                .push(format!("{reason} failed (the commit stands)"));
            self.prune_failures.1 = Some(reason);
        }
    }

    /// Prunings that failed after their commit, and the last reason.
    pub fn prune_failures(&self) -> (u64, Option<&str>) {
        (self.prune_failures.0, self.prune_failures.1.as_deref())
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

    /// What a vote may name: rank 0 its staging folder `<checkpoint dir>/.staging-g<generation>-
    /// <step>` and exactly the checkpoint's files (plain names, each once), the other ranks
    /// nothing. The coordinator renames that folder and writes the manifest into it, so a vote
    /// must not point it anywhere else.
    fn check_vote_files(
        &self,
        rank: usize,
        generation: u64,
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
        let expected = self
            .job
            .checkpoint
            .dir
            .join(checkpoint::staging_name(generation, step));
        if folder != expected {
            return Err(format!(
                "folder {} is not {} (generation {generation}'s checkpoint of step {step})",
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

    /// The manifest of the checkpoint every rank has voted for, to be written; no group forms
    /// until it is.
    fn prepare_commit(&mut self) -> Result<PendingCommit, String> {
        let (staging, files, pos) = self
            .pending_folder
            .take()
            .ok_or("rank 0 did not report the checkpoint folder")?;
        self.commit_in_flight = Some(pos.step);
        Ok(PendingCommit {
            staging,
            folder: self
                .job
                .checkpoint
                .dir
                .join(checkpoint::folder_name(pos.step)),
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
            position: pos,
            dir: self.job.checkpoint.dir.clone(),
            keep: self.job.checkpoint.keep,
            delay_ms: match self.commit_delay {
                (ms, None) => ms,
                (ms, Some(step)) if step == pos.step => ms,
                _ => 0,
            },
        })
    }
}
