//! The checkpoint format, shared by the worker (which writes the files) and the coordinator
//! (which commits them): one folder per checkpoint, committed by its `manifest.json`, written
//! last and atomically (temp file, fsync, rename). A folder without a manifest is an
//! interrupted write and does not count.
//!
//! Rank 0 (or a single worker) writes a checkpoint's files into a staging folder of its own,
//! `.staging-g<generation>-<step>`, never into a committed one. The commit ([`commit`]) renames
//! the staging folder to `ckpt-<step>` and then writes the manifest into it: nothing ever
//! removes or overwrites a folder that holds a manifest (pruning the oldest committed ones
//! aside), and a crash in between leaves a `ckpt-<step>` without a manifest, which does not
//! count and which the next commit of that step or the next pruning removes.

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
    /// The training data the consumed prefix counts, and the order's settings: a resume on
    /// other data (or another seed or shard window) would take the prefix to mean other samples,
    /// so it is refused. Absent in checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataIdentity>,
}

/// The identity of a training split and its epoch order (see [`Position::data`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataIdentity {
    /// Samples in the split.
    pub samples: u64,
    /// A hash of the split's listing (file names and labels, shard names and keys; the
    /// count and seed for generated data), as 16 hex digits.
    pub fingerprint: u64,
    /// `[train] seed`: it fixes every epoch's order.
    pub seed: u64,
    /// Tar shards: `[data] shard_window` and `shuffle_buffer` (0 for random-access data).
    pub shard_window: u64,
    pub shuffle_buffer: u64,
}

impl DataIdentity {
    /// What differs between a checkpoint's data (`self`) and the job's (`now`), if anything.
    pub fn differences(&self, now: &DataIdentity) -> Vec<String> {
        let mut out = Vec::new();
        let mut diff = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what} {a} in the checkpoint, {b} now"));
            }
        };
        diff("samples", self.samples.to_string(), now.samples.to_string());
        diff(
            "listing fingerprint",
            format!("{:016x}", self.fingerprint),
            format!("{:016x}", now.fingerprint),
        );
        diff("seed", self.seed.to_string(), now.seed.to_string());
        diff(
            "shard_window",
            self.shard_window.to_string(),
            now.shard_window.to_string(),
        );
        diff(
            "shuffle_buffer",
            self.shuffle_buffer.to_string(),
            now.shuffle_buffer.to_string(),
        );
        out
    }
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
    // Unique per process and per call, so that two threads (or two processes on shared
    // storage) never write the same temp file; `prune` removes ones a crash left behind.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}-{n}", std::process::id()));
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

/// Name of the folder rank 0 of `generation` writes the checkpoint at `step` into, before the
/// commit renames it to [`folder_name`].
pub fn staging_name(generation: u64, step: u64) -> String {
    format!(".staging-g{generation}-{step:010}")
}

/// The step of a staging folder's name (see [`staging_name`]).
fn staging_step(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(".staging-g")?;
    let (_, step) = rest.split_once('-')?;
    step.parse().ok()
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

/// Commits the checkpoint written into `staging`: renames it to `folder` (`ckpt-<step>`) and
/// writes the manifest into it, atomically. A `folder` that already holds a manifest (a
/// checkpoint committed before) is never touched: the commit fails, naming it. One without a
/// manifest (a commit cut short) is removed first.
pub fn commit(staging: &Path, folder: &Path, manifest: &CheckpointManifest) -> std::io::Result<()> {
    if folder.join("manifest.json").exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} already holds a committed checkpoint; it is not overwritten",
                folder.display()
            ),
        ));
    }
    if folder.exists() {
        std::fs::remove_dir_all(folder)?;
    }
    std::fs::rename(staging, folder)?;
    sync_parent(folder)?;
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

/// Keeps the newest `keep` committed checkpoints, never `just_committed` (the checkpoint at
/// `committed_step`), and removes what can never be committed: `ckpt-*` folders without a
/// manifest (commits cut short), staging folders of steps up to `committed_step` (a vote at
/// or below the committed step is refused; later ones may still be being written), temp
/// files of crashed writers.
pub fn prune(
    dir: &Path,
    keep: usize,
    just_committed: &Path,
    committed_step: u64,
) -> std::io::Result<()> {
    for old in list(dir).into_iter().skip(keep) {
        if old != just_committed {
            std::fs::remove_dir_all(&old)?;
        }
    }
    remove_stale_temp_files(dir);
    remove_stale_temp_files(just_committed);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let uncommitted = name.starts_with("ckpt-") && !p.join("manifest.json").exists();
            let dead_staging = staging_step(&name).is_some_and(|s| s <= committed_step);
            if (uncommitted || dead_staging) && p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(())
}

/// Removes `*.tmp<pid>-<n>` files that a writer left when it crashed (older than a minute, so
/// that a write in progress is never touched).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60));
        if name.contains(".tmp") && stale && e.path().is_file() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A fresh run must not write into a folder that holds another run's checkpoints (its
/// pruning would delete them, and a resume would mix the two): the error names them.
pub fn refuse_foreign(dir: &Path) -> Result<(), String> {
    let found = list(dir);
    if found.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = found
        .iter()
        .take(3)
        .map(|p| {
            p.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        })
        .collect();
    Err(format!(
        "{} already holds the checkpoints of a run ({}{}): resume it with --resume, or give \
         [checkpoint] dir a new folder (or delete this one) to start over",
        dir.display(),
        names.join(", "),
        if found.len() > 3 { ", ..." } else { "" }
    ))
}

/// Makes `folder`'s entry in its parent durable (after creating it).
pub fn sync_parent(folder: &Path) -> std::io::Result<()> {
    match folder.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
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
