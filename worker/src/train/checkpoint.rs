//! Checkpoints: one folder per checkpoint, committed by its `manifest.json`.
//!
//! ```text
//! <dir>/ckpt-0000001200/
//!     model.safetensors       weights and buffers, PyTorch names
//!     optimizer.safetensors   momentum buffers / Adam moments, `<kind>.<param name>`
//!     state.json              position: epoch, batch in epoch, steps, samples, loss scale
//!     job.toml                the resolved job
//!     manifest.json           written last, atomically: step, model config, SHA-256 of each file
//! ```
//!
//! A folder without a manifest is an interrupted write and is ignored (and cleaned up). Resume
//! takes the newest checkpoint whose files match their hashes, falling back to older ones, and
//! refuses one whose model differs from the job's.

use std::path::{Path, PathBuf};

use axial_common::{JobConfig, ModelConfig};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::manifest::{sha256_file, write_atomic};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::weights::write_tensors_atomic;

pub const FORMAT: &str = "axial-checkpoint/1";

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Position {
    /// Epoch in progress (0-based).
    pub epoch: u64,
    /// Micro-batches of that epoch already trained on.
    pub batch_in_epoch: u64,
    /// Optimizer steps over the run.
    pub step: u64,
    pub samples_seen: u64,
    pub skipped_samples: u64,
    /// fp16 dynamic loss scale (1 otherwise) and its count of good steps.
    pub loss_scale: f64,
    pub good_steps: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    pub format: String,
    pub step: u64,
    pub epoch: u64,
    pub position: Position,
    pub model: ModelConfig,
    pub files: Vec<FileEntry>,
}

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

/// Writes a checkpoint for `pos` and commits it; removes all but the newest `keep`.
pub fn save(
    dir: &Path,
    job: &JobConfig,
    model: &Model,
    optimizer: Vec<(String, Tensor)>,
    pos: Position,
    keep: usize,
) -> Result<PathBuf> {
    let folder = dir.join(format!("ckpt-{:010}", pos.step));
    if folder.exists() {
        std::fs::remove_dir_all(&folder).map_err(io_err(&folder))?;
    }
    std::fs::create_dir_all(&folder).map_err(io_err(&folder))?;
    model.save_weights(&folder.join("model.safetensors"))?;
    write_tensors_atomic(&folder.join("optimizer.safetensors"), &optimizer)?;
    let state = serde_json::to_string_pretty(&pos).map_err(|e| Error::Write {
        path: folder.clone(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&folder.join("state.json"), state.as_bytes()).map_err(io_err(&folder))?;
    write_atomic(&folder.join("job.toml"), job.to_toml().as_bytes()).map_err(io_err(&folder))?;
    let mut files = Vec::new();
    for name in [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "job.toml",
    ] {
        let p = folder.join(name);
        files.push(FileEntry {
            name: name.into(),
            bytes: std::fs::metadata(&p).map_err(io_err(&p))?.len(),
            sha256: sha256_file(&p).map_err(io_err(&p))?,
        });
    }
    let manifest = CheckpointManifest {
        format: FORMAT.into(),
        step: pos.step,
        epoch: pos.epoch,
        position: pos,
        model: job.model.clone(),
        files,
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Write {
        path: folder.clone(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&folder.join("manifest.json"), json.as_bytes()).map_err(io_err(&folder))?;
    prune(dir, keep)?;
    Ok(folder)
}

/// Committed checkpoint folders, newest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ckpt-"))
                && p.join("manifest.json").is_file()
        })
        .collect();
    v.sort();
    v.reverse();
    v
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    for old in list(dir).into_iter().skip(keep) {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    // Folders without a manifest are interrupted writes.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let is_ckpt = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ckpt-"));
            if is_ckpt && p.is_dir() && !p.join("manifest.json").exists() {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(())
}

/// Reads and verifies one checkpoint folder.
pub fn verify(folder: &Path) -> std::result::Result<CheckpointManifest, String> {
    let text = std::fs::read_to_string(folder.join("manifest.json"))
        .map_err(|e| format!("manifest.json: {e}"))?;
    let manifest: CheckpointManifest =
        serde_json::from_str(&text).map_err(|e| format!("manifest.json: {e}"))?;
    if manifest.format != FORMAT {
        return Err(format!("format {:?}, expected {FORMAT:?}", manifest.format));
    }
    for f in &manifest.files {
        let p = folder.join(&f.name);
        match sha256_file(&p) {
            Ok(h) if h == f.sha256 => {}
            Ok(_) => return Err(format!("{} does not match its SHA-256 (damaged)", f.name)),
            Err(e) => return Err(format!("{}: {e}", f.name)),
        }
    }
    Ok(manifest)
}

/// Loads the newest verified checkpoint in `dir` into `model`; `None` when there is none.
/// Damaged ones are skipped with a warning on stderr; a different model is an error.
pub fn load_latest(dir: &Path, job: &JobConfig, model: &Model) -> Result<Option<Loaded>> {
    for folder in list(dir) {
        let manifest = match verify(&folder) {
            Ok(m) => m,
            Err(why) => {
                eprintln!("warning: skipping checkpoint {}: {why}", folder.display());
                continue;
            }
        };
        if manifest.model != job.model {
            return Err(Error::BadTensor {
                path: folder.clone(),
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
        return Ok(Some(Loaded {
            dir: folder,
            manifest,
            optimizer,
        }));
    }
    Ok(None)
}
