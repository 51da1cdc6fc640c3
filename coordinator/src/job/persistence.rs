//! What survives a restart of the coordinator besides the checkpoints: `coordinator.json`
//! (the reserved generations, the restart count, the hyperparameter changes).

use super::*;

/// What `coordinator.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Saved {
    /// Every generation this coordinator used is below this one (generations are reserved in
    /// blocks of `GENERATION_BLOCK`); a restarted coordinator goes on above it.
    pub(super) generation: u64,
    pub(super) restarts: u64,
    #[serde(default)]
    pub(super) changes: Vec<HyperParameterChange>,
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

impl JobState {
    /// Writes `coordinator.json` (atomically); a failure is logged, not fatal: the committed
    /// checkpoints still hold everything a resume needs.
    pub(super) fn save(&self) -> Option<String> {
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

    pub(super) fn save_or_log(&mut self) {
        if let Some(e) = self.save() {
            self.log.push(e);
        }
    }
}
