//! The checkpoint format, shared by the worker (which writes the files) and the coordinator
//! (which commits them): one folder per checkpoint, committed by its `manifest.json`, written
//! last and atomically (temp file, fsync, rename). A folder without a manifest is an
//! interrupted write and does not count.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::ModelConfig;

pub const FORMAT: &str = "axial-checkpoint/1";

/// Where a run stands: everything besides the tensors that resuming needs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Position {
    /// Epoch in progress (0-based).
    pub epoch: u64,
    /// Consumed prefix of that epoch's sample sequence (see `plan`).
    pub consumed: u64,
    /// Optimizer steps over the run.
    pub step: u64,
    pub samples_seen: u64,
    pub skipped_samples: u64,
    /// fp16 dynamic loss scale (1 otherwise) and its count of good steps.
    pub loss_scale: f64,
    pub good_steps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Ranks that voted for it (1 for a single worker).
    #[serde(default = "one")]
    pub world: u64,
    pub files: Vec<FileEntry>,
    /// The hyperparameter changes made to the job up to this checkpoint (a resumed job replays
    /// them at their steps).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<crate::hparams::HyperParameterChange>,
}

fn one() -> u64 {
    1
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `bytes` to `path` atomically: temp file beside it, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The files rank 0 writes into each checkpoint folder (the manifest lists exactly these).
pub const FILES: [&str; 4] = [
    "model.safetensors",
    "optimizer.safetensors",
    "state.json",
    "job.toml",
];

/// Name of the folder of the checkpoint at `step`.
pub fn folder_name(step: u64) -> String {
    format!("ckpt-{step:010}")
}

/// Describes files of a checkpoint folder (size and SHA-256).
pub fn describe(folder: &Path, names: &[&str]) -> std::io::Result<Vec<FileEntry>> {
    names
        .iter()
        .map(|name| {
            let p = folder.join(name);
            Ok(FileEntry {
                name: (*name).to_owned(),
                bytes: std::fs::metadata(&p)?.len(),
                sha256: sha256_file(&p)?,
            })
        })
        .collect()
}

/// Commits a checkpoint folder by writing its manifest.
pub fn commit(folder: &Path, manifest: &CheckpointManifest) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(manifest).map_err(std::io::Error::other)?;
    write_atomic(&folder.join("manifest.json"), json.as_bytes())
}

/// Committed checkpoint folders in `dir`, newest first.
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

/// Keeps the newest `keep` committed checkpoints and removes interrupted writes.
pub fn prune(dir: &Path, keep: usize) -> std::io::Result<()> {
    for old in list(dir).into_iter().skip(keep) {
        std::fs::remove_dir_all(&old)?;
    }
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

/// Reads a checkpoint's manifest and checks every file against its SHA-256.
pub fn verify(folder: &Path) -> Result<CheckpointManifest, String> {
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

/// A checkpoint folder that was skipped, and why.
pub type Skipped = (PathBuf, String);

/// The newest checkpoint in `dir` whose files verify; damaged ones are reported in the
/// returned list and skipped.
pub fn latest_verified(dir: &Path) -> (Option<(PathBuf, CheckpointManifest)>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    for folder in list(dir) {
        match verify(&folder) {
            Ok(m) => return (Some((folder, m)), skipped),
            Err(why) => skipped.push((folder, why)),
        }
    }
    (None, skipped)
}
