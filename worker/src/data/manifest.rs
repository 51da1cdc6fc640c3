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
        self.verify_with(dir, None)
    }

    /// As [`Manifest::verify`], but a shard verified before (by this user, on this machine)
    /// and unchanged since (the same size and modification time, recorded in the verified
    /// cache `cache`) is not read again: opening ImageNet's shards at every re-formation or
    /// restart takes milliseconds, not minutes. The shards that must be read are hashed on
    /// every core. Modification times that are too recent to tell a later change from the
    /// verified content (within 2 s of the check, as git's "racy" entries) are not trusted.
    pub fn verify_with(&self, dir: &Path, cache: Option<&Path>) -> Result<(), DataError> {
        let mut known = cache.map(VerifiedCache::load).unwrap_or_default();
        let stats: Vec<Option<FileStamp>> = self
            .shards
            .iter()
            .map(|s| FileStamp::of(&dir.join(&s.path)))
            .collect();
        let todo: Vec<usize> = (0..self.shards.len())
            .filter(|&i| {
                let s = &self.shards[i];
                !matches!((&stats[i], known.shards.get(&s.path)),
                    (Some(now), Some(k)) if k.sha256 == s.sha256 && k.stamp == *now && k.trusted())
            })
            .collect();
        let hashes = hash_all(dir, &self.shards, &todo);
        let mut bad = Vec::new();
        let verified_at = unix_nanos();
        for (i, hash) in todo.into_iter().zip(hashes) {
            let s = &self.shards[i];
            match (hash, &stats[i]) {
                (Ok(h), Some(stamp)) if h == s.sha256 => {
                    known.shards.insert(
                        s.path.clone(),
                        Verified {
                            stamp: *stamp,
                            sha256: h,
                            verified_at,
                        },
                    );
                }
                (Ok(h), _) if h == s.sha256 => {}
                (Ok(h), _) => bad.push(format!("{} (sha256 {h}, manifest {})", s.path, s.sha256)),
                (Err(e), _) => bad.push(format!("{} ({e})", s.path)),
            }
        }
        if !bad.is_empty() {
            return Err(DataError::open(
                dir,
                format!("shards do not match the manifest: {}", bad.join("; ")),
            ));
        }
        // A cache that cannot be written (a read-only home) only costs the next open time:
        // said once per process, with the remedy.
        if let Some(path) = cache
            && let Ok(json) = serde_json::to_vec(&known)
        {
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| write_atomic(path, &json));
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if let Err(e) = written
                && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                eprintln!(
                    "warning: cannot write the verified-shard cache {}: {e}; every start hashes \
                     the data set again (set AXIAL_CACHE_DIR to a writable folder)",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

/// The SHA-256 of the shards `todo` (indices into `shards`), on every core.
fn hash_all(dir: &Path, shards: &[ShardEntry], todo: &[usize]) -> Vec<std::io::Result<String>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(todo.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<std::io::Result<String>>>> =
        todo.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = todo.get(k) else { break };
                    let h = sha256_file(&dir.join(&shards[i].path));
                    *results[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(std::io::Error::other("not hashed")))
        })
        .collect()
}

/// A file's size and modification time, as `stat` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    bytes: u64,
    mtime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        let mtime = m.modified().ok()?;
        let mtime_ns = match mtime.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        Some(Self {
            bytes: m.len(),
            mtime_ns,
        })
    }
}

fn unix_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// A shard found to match its SHA-256, and the file as it was then.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Verified {
    stamp: FileStamp,
    sha256: String,
    verified_at: i128,
}

impl Verified {
    /// Whether an unchanged stamp proves unchanged content: a change within the file system's
    /// time granularity of the check could have kept the modification time.
    fn trusted(&self) -> bool {
        self.verified_at - self.stamp.mtime_ns > 2_000_000_000
    }
}

/// The verified cache of one manifest (see [`Manifest::verify_with`]).
#[derive(Debug, Default, Serialize, Deserialize)]
struct VerifiedCache {
    shards: std::collections::BTreeMap<String, Verified>,
}

impl VerifiedCache {
    fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// Where the verified cache of the manifest at `manifest` lives: under `$AXIAL_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/axial`, else `~/.cache/axial` (`verified/<hash of its path>.json`);
/// none without any of them.
pub fn verified_cache_path(manifest: &Path) -> Option<PathBuf> {
    use sha2::Digest;
    let root = std::env::var_os("AXIAL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("axial")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/axial")))?;
    let full = std::fs::canonicalize(manifest).unwrap_or_else(|_| manifest.to_path_buf());
    let digest = sha2::Sha256::digest(full.to_string_lossy().as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Some(root.join("verified").join(format!("{name}.json")))
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
