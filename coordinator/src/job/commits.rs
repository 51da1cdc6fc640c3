//! Checkpoint votes and commits: a vote is checked and counted by the barrier; the last one
//! makes a commit, written (manifest, fsync, pruning) without the state lock by the service.

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
                self.finish_commit(c, written, now)
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
        if for_group && rank != 0 {
            return refused(format!("rank {rank} votes for the group; only rank 0 does"));
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
}
