//! Checkpoints: one folder per checkpoint, committed by its `manifest.json` (the format is in
//! `axial_common::checkpoint`).
//!
//! ```text
//! <dir>/.staging-g<generation>-0000001200/   written here by rank 0 (or a single worker),
//!                                              renamed by the commit to:
//! <dir>/ckpt-0000001200/
//!     model.safetensors       weights and buffers, PyTorch names
//!     optimizer.safetensors   momentum buffers / Adam moments, `<kind>.<param name>`
//!     state.json              position: epoch, consumed samples, steps, loss scale
//!     job.toml                the resolved job
//!     manifest.json           written last, atomically: step, model config, SHA-256 of each file
//! ```
//!
//! A single worker commits its own checkpoints; in a distributed job rank 0 writes the files,
//! every rank votes, and the coordinator writes the manifest. Files are written off the
//! training thread ([`Writer`]): the training thread copies the state ([`Snapshot`]) and goes on. Resume takes the newest
//! checkpoint whose files match their hashes, falling back to older ones, and refuses one whose
//! model differs from the job's.

use std::path::{Path, PathBuf};

use axial_common::JobConfig;
pub use axial_common::checkpoint::{CheckpointManifest, FORMAT, FileEntry, Position, list, verify};
use axial_common::checkpoint::{commit, describe, folder_name, prune, staging_name, write_atomic};
use tch::Tensor;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::weights::write_tensors_atomic;

use axial_common::checkpoint::FILES;

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: CheckpointManifest,
    pub optimizer: Vec<(String, Tensor)>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_owned(),
        source,
    }
}

/// Writes the files of the checkpoint at `pos.step` (not yet committed) into this
/// generation's staging folder for it (never into a committed folder); returns the folder and
/// the files' entries.
pub fn write_files(
    dir: &Path,
    generation: u64,
    job: &JobConfig,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    pos: Position,
) -> Result<(PathBuf, Vec<FileEntry>)> {
    let folder = dir.join(staging_name(generation, pos.step));
    // A staging folder is this writer's own (an earlier try of the same generation and step):
    // it never holds a manifest.
    if folder.exists() {
        std::fs::remove_dir_all(&folder).map_err(io_err(&folder))?;
    }
    std::fs::create_dir_all(&folder).map_err(io_err(&folder))?;
    // The folder's entry is durable before anything in it counts.
    axial_common::checkpoint::sync_parent(&folder).map_err(io_err(&folder))?;
    write_tensors_atomic(&folder.join("model.safetensors"), model)?;
    write_tensors_atomic(&folder.join("optimizer.safetensors"), optimizer)?;
    let state = serde_json::to_string_pretty(&pos).map_err(|e| Error::Write {
        path: folder.clone(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&folder.join("state.json"), state.as_bytes()).map_err(io_err(&folder))?;
    write_atomic(&folder.join("job.toml"), job.to_toml().as_bytes()).map_err(io_err(&folder))?;
    let files = describe(&folder, &FILES).map_err(io_err(&folder))?;
    Ok((folder, files))
}

/// A checkpoint's content copied off the live model and optimizer (into new CPU memory), so
/// that training goes on while it is written.
pub struct Snapshot {
    model: Vec<(String, Tensor)>,
    optimizer: Vec<(String, Tensor)>,
    pos: Position,
}

fn owned_copy(named: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    tch::no_grad(|| {
        named
            .into_iter()
            .map(|(n, t)| {
                let t = t.detach();
                let copy = if t.device() == tch::Device::Cpu {
                    t.copy()
                } else {
                    t.to_device(tch::Device::Cpu)
                };
                (n, copy)
            })
            .collect()
    })
}

impl Snapshot {
    pub fn take(model: &Model, optimizer: Vec<(String, Tensor)>, pos: Position) -> Self {
        Self {
            model: owned_copy(model.state_dict()),
            optimizer: owned_copy(optimizer),
            pos,
        }
    }
}

/// A checkpoint written (and, for a single worker, committed).
#[derive(Debug)]
pub struct Written {
    pub pos: Position,
    pub folder: PathBuf,
    pub files: Vec<FileEntry>,
    /// Time to write it (on the writer thread).
    pub seconds: f64,
}

/// Writes checkpoints on a thread of its own, one at a time: the training thread takes a
/// [`Snapshot`] (a memory copy) and goes on. Alone, a worker's writer also commits and prunes;
/// in a group, rank 0's writer only writes, and the finished write is voted for from the
/// training thread. Nothing is committed before its files are complete.
pub struct Writer {
    dir: PathBuf,
    generation: u64,
    job: JobConfig,
    /// Commit and keep this many (a single worker); None: leave the commit to the coordinator.
    commit_keep: Option<usize>,
    pending: Option<std::thread::JoinHandle<Result<Written>>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("dir", &self.dir)
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

impl Drop for Writer {
    /// A write in progress is finished, never abandoned half-way (a later generation may write
    /// the same folder).
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Writer {
    pub fn new(job: &JobConfig, generation: u64, commit_keep: Option<usize>) -> Self {
        Self {
            dir: job.checkpoint.dir.clone(),
            generation,
            job: job.clone(),
            commit_keep,
            pending: None,
        }
    }

    /// Starts writing `snapshot`; first waits for the previous write and returns it.
    pub fn start(&mut self, snapshot: Snapshot) -> Result<Option<Written>> {
        let previous = self.finish()?;
        let (dir, job, keep) = (self.dir.clone(), self.job.clone(), self.commit_keep);
        let generation = self.generation;
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let Snapshot {
                    model,
                    optimizer,
                    pos,
                } = snapshot;
                let (mut folder, files) =
                    write_files(&dir, generation, &job, &model, &optimizer, pos)?;
                if let Some(keep) = keep {
                    let committed = dir.join(folder_name(pos.step));
                    commit(&folder, &committed, &manifest(&job, pos, 1, files.clone()))
                        .map_err(io_err(&committed))?;
                    folder = committed;
                    // Best effort: the commit stands whatever pruning meets.
                    if let Err(e) = prune(&dir, keep, &folder, pos.step) {
                        eprintln!("warning: pruning {}: {e}", dir.display());
                    }
                }
                Ok(Written {
                    pos,
                    folder,
                    files,
                    seconds: t.elapsed().as_secs_f64(),
                })
            })
            .map_err(io_err(&self.dir))?;
        self.pending = Some(handle);
        Ok(previous)
    }

    /// The write in progress, if it has finished (never blocks).
    pub fn poll(&mut self) -> Result<Option<Written>> {
        if self.pending.as_ref().is_some_and(|h| h.is_finished()) {
            return self.finish();
        }
        Ok(None)
    }

    /// Waits for the write in progress, if any.
    pub fn finish(&mut self) -> Result<Option<Written>> {
        match self.pending.take() {
            None => Ok(None),
            Some(h) => match h.join() {
                Ok(r) => r.map(Some),
                Err(_) => Err(Error::Write {
                    path: self.dir.clone(),
                    source: std::io::Error::other("the checkpoint writer thread panicked"),
                }),
            },
        }
    }
}

/// The manifest that commits a checkpoint.
pub fn manifest(
    job: &JobConfig,
    pos: Position,
    world: u64,
    files: Vec<FileEntry>,
) -> CheckpointManifest {
    CheckpointManifest {
        format: FORMAT.into(),
        step: pos.step,
        epoch: pos.epoch,
        position: pos,
        model: job.model.clone(),
        world,
        files,
        changes: Vec::new(),
    }
}

/// Loads a verified checkpoint folder into `model`; refuses another model.
pub fn load(
    folder: &Path,
    manifest: CheckpointManifest,
    job: &JobConfig,
    model: &Model,
) -> Result<Loaded> {
    if manifest.model != job.model {
        return Err(Error::BadTensor {
            path: folder.to_owned(),
            message: format!(
                "this checkpoint is of another model; refusing to resume.\n  checkpoint: {}\n  job:        {}",
                manifest.model.to_toml().replace('\n', " "),
                job.model.to_toml().replace('\n', " ")
            ),
        });
    }
    model.load_weights(&folder.join("model.safetensors"))?;
    let optimizer =
        Tensor::read_safetensors(folder.join("optimizer.safetensors")).map_err(|source| {
            Error::Read {
                path: folder.join("optimizer.safetensors"),
                source,
            }
        })?;
    Ok(Loaded {
        dir: folder.to_owned(),
        manifest,
        optimizer,
    })
}

/// Loads the newest verified checkpoint in `dir` into `model`; `None` when there is none.
/// Damaged ones are skipped with a warning on stderr.
pub fn load_latest(dir: &Path, job: &JobConfig, model: &Model) -> Result<Option<Loaded>> {
    let (found, skipped) = axial_common::checkpoint::latest_verified(dir);
    for (folder, why) in skipped {
        eprintln!("warning: skipping checkpoint {}: {why}", folder.display());
    }
    match found {
        Some((folder, manifest)) => load(&folder, manifest, job, model).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path) -> JobConfig {
        let text = format!(
            "[model]\nvariant = \"official\"\nlayers = [1, 1, 1, 1]\nwidth = 0.125\nnum_classes = 10\n[data]\nformat = \"builtin\"\ntrain = 100\nval = 10\nimage_size = 32\n[checkpoint]\ndir = \"{}\"\nkeep = 2\n",
            dir.display()
        );
        JobConfig::parse(&text, "test", Path::new("/")).expect("job")
    }

    fn first_float(model: &Model) -> (String, Tensor) {
        model
            .state_dict()
            .into_iter()
            .find(|(_, t)| t.is_floating_point() && t.numel() > 1)
            .expect("a float tensor")
    }

    /// The writer writes what the state was when the snapshot was taken, however the live
    /// model changes meanwhile; alone it commits (verified manifests) and keeps the last K; in
    /// a group (no commit) it leaves the manifest to the coordinator.
    #[test]
    fn writer_writes_the_snapshot_off_thread_and_commits() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let job = job(tmp.path());
        let model = Model::new(&job.model, tch::Device::Cpu, 3);
        let (name, original) = first_float(&model);
        let original = original.copy();
        let mut writer = Writer::new(&job, 0, Some(2));
        for step in [10u64, 20, 30] {
            let pos = Position {
                step,
                loss_scale: 1.0,
                ..Position::default()
            };
            writer
                .start(Snapshot::take(&model, Vec::new(), pos))
                .expect("start");
            if step == 20 {
                // The live weights change while the checkpoint of step 20 is being written.
                tch::no_grad(|| {
                    for (_, t) in model.state_dict() {
                        if t.is_floating_point() {
                            let _ = t.shallow_clone().fill_(7.0);
                        }
                    }
                });
            }
        }
        let last = writer.finish().expect("finish").expect("a write");
        assert_eq!(last.pos.step, 30);
        let mut names: Vec<String> = list(tmp.path())
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        assert_eq!(names, ["ckpt-0000000020", "ckpt-0000000030"], "keep = 2");
        let restored = Model::new(&job.model, tch::Device::Cpu, 99);
        for (step, expect_seven) in [(20, false), (30, true)] {
            let folder = tmp.path().join(folder_name(step));
            verify(&folder).expect("committed and verified");
            restored
                .load_weights(&folder.join("model.safetensors"))
                .expect("load");
            let (n, t) = first_float(&restored);
            assert_eq!(n, name);
            if expect_seven {
                assert_eq!(t.max().double_value(&[]), 7.0);
            } else {
                assert!(
                    t.equal(&original),
                    "step {step} holds the snapshot's values"
                );
            }
        }
        let mut group_writer = Writer::new(&job, 7, None);
        group_writer
            .start(Snapshot::take(&model, Vec::new(), Position::default()))
            .expect("start");
        let w = group_writer.finish().expect("finish").expect("written");
        assert!(
            !w.folder.join("manifest.json").exists(),
            "left to the coordinator"
        );
        assert_eq!(
            w.folder,
            tmp.path().join(staging_name(7, 0)),
            "written into generation 7's staging folder"
        );
        assert_eq!(w.files.len(), 4);
    }
}
