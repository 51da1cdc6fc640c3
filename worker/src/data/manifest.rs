//! Dataset manifests and `axial-worker prepare`.
//!
//! A manifest (`manifest.json` beside the shards) lists every shard with its sample count and
//! SHA-256, plus the class names: the coordinator plans epochs from it, and a worker can tell a
//! damaged or swapped shard from a good one before training on it.
//!
//! `prepare` turns an image folder into WebDataset-style tar shards (`<key>.jpg|png` with the
//! original bytes + `<key>.cls` holding the class index) and writes the manifest last,
//! atomically, so a manifest always describes complete shards.

use std::io::Write;
use std::path::{Path, PathBuf};

use axial_common::Rng;
use serde::{Deserialize, Serialize};

use super::DataError;
use super::imagefolder::ImageFolder;

pub const FORMAT: &str = "axial-webdataset/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Relative to the manifest's folder.
    pub path: String,
    pub samples: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub classes: Vec<String>,
    pub samples: u64,
    pub shards: Vec<ShardEntry>,
}

pub use axial_common::checkpoint::{sha256_file, write_atomic};

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::open(path, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| DataError::open(path, format!("not a dataset manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(DataError::open(
                path,
                format!("format {:?}; this build reads {FORMAT:?}", m.format),
            ));
        }
        let total: u64 = m.shards.iter().map(|s| s.samples).sum();
        if total != m.samples {
            return Err(DataError::open(
                path,
                format!(
                    "shards hold {total} samples but the manifest says {}",
                    m.samples
                ),
            ));
        }
        Ok(m)
    }

    /// Checks every shard's SHA-256; names each one that differs or is missing.
    pub fn verify(&self, dir: &Path) -> Result<(), DataError> {
        let mut bad = Vec::new();
        for s in &self.shards {
            let p = dir.join(&s.path);
            match sha256_file(&p) {
                Ok(h) if h == s.sha256 => {}
                Ok(h) => bad.push(format!("{} (sha256 {h}, manifest {})", s.path, s.sha256)),
                Err(e) => bad.push(format!("{} ({e})", s.path)),
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(DataError::open(
                dir,
                format!("shards do not match the manifest: {}", bad.join("; ")),
            ))
        }
    }
}

/// What `prepare` wrote.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
}

/// Turns an image folder into tar shards of at most `shard_size` samples plus `manifest.json`
/// in `out`. Files are shuffled by `seed` first so that every shard mixes the classes.
pub fn prepare(
    input: &Path,
    out: &Path,
    shard_size: usize,
    seed: u64,
) -> Result<Prepared, DataError> {
    if shard_size == 0 {
        return Err(DataError::Invalid("--shard-size must be at least 1".into()));
    }
    let folder = ImageFolder::open(input)?;
    let classes = super::Source::class_names(&folder);
    let mut files = folder.files().to_vec();
    Rng::derive(seed, &[0x5A4D]).shuffle(&mut files);
    std::fs::create_dir_all(out).map_err(|e| DataError::open(out, e))?;
    let mut shards = Vec::new();
    for (n, chunk) in files.chunks(shard_size).enumerate() {
        let name = format!("shard-{n:06}.tar");
        let path = out.join(&name);
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let file = std::fs::File::create(&tmp).map_err(|e| DataError::open(&tmp, e))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        for (i, (src, label)) in chunk.iter().enumerate() {
            let key = format!("{:08}", n * shard_size + i);
            let ext = src
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("jpg")
                .to_ascii_lowercase();
            let ext = if ext == "jpeg" { "jpg".to_owned() } else { ext };
            let bytes = std::fs::read(src).map_err(|e| DataError::open(src, e))?;
            append(&mut tar, &format!("{key}.{ext}"), &bytes)
                .map_err(|e| DataError::open(&tmp, e))?;
            append(
                &mut tar,
                &format!("{key}.cls"),
                label.to_string().as_bytes(),
            )
            .map_err(|e| DataError::open(&tmp, e))?;
        }
        let mut w = tar.into_inner().map_err(|e| DataError::open(&tmp, e))?;
        w.flush().map_err(|e| DataError::open(&tmp, e))?;
        w.get_ref()
            .sync_all()
            .map_err(|e| DataError::open(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| DataError::open(&path, e))?;
        shards.push(ShardEntry {
            path: name,
            samples: chunk.len() as u64,
            sha256: sha256_file(&path).map_err(|e| DataError::open(&path, e))?,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        classes,
        samples: files.len() as u64,
        shards,
    };
    let manifest_path = out.join("manifest.json");
    let json =
        serde_json::to_string_pretty(&manifest).map_err(|e| DataError::Invalid(e.to_string()))?;
    write_atomic(&manifest_path, json.as_bytes())
        .map_err(|e| DataError::open(&manifest_path, e))?;
    Ok(Prepared {
        manifest_path,
        manifest,
    })
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)
}
