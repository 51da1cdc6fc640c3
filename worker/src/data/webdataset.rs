//! WebDataset-style tar shards: samples are the files sharing a key (`<key>.jpg|jpeg|png` and
//! `<key>.cls`, the class index as text). The spec is a `manifest.json` (shards verified
//! against their SHA-256), a folder (its `*.tar`, sorted), a single `.tar`, or a brace pattern
//! such as `data/shard-{000000..000009}.tar`.
//!
//! Opening from a manifest reads only the manifest (it gives each shard's sample count; the
//! shards' SHA-256 are checked through a verified cache); a shard's tar headers and small `.cls`
//! entries are read when one of its samples is first wanted. Opening shards without a manifest
//! reads every shard's headers. Images are read by offset when a sample is requested.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use axial_common::plan::Shard;

use super::manifest::Manifest;
use super::{DataError, Image, Sample, SampleError, Source};

/// The largest image entry a shard may hold.
const MAX_ENTRY_BYTES: u64 = 256 << 20;
/// Class indices a `.cls` entry may hold.
const MAX_CLASSES: i64 = 1_000_000;

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    /// Offset and length of the image bytes, if the key has an image.
    image: Option<(u64, u64)>,
    /// Parsed class, or why not.
    label: Result<i64, String>,
    /// Why the sample cannot be used whatever else it has (an oversized image).
    problem: Option<String>,
}

/// A shard's samples in key order, or why the shard cannot be read.
type ShardIndex = Result<Vec<Entry>, String>;

#[derive(Debug)]
pub struct WebDataset {
    shards: Vec<PathBuf>,
    /// The first sample id of each shard, then the total.
    starts: Vec<u64>,
    /// Each shard's entries: read at open without a manifest; with one (which gives the
    /// counts), when a sample of the shard is first wanted, so opening reads no shard.
    index: Vec<std::sync::OnceLock<ShardIndex>>,
    classes: Vec<String>,
    /// The manifest's shards (path, samples, SHA-256), when opened from one.
    manifest: Option<Vec<super::manifest::ShardEntry>>,
}

/// Expands `a{000..003}b` into `a000b .. a003b` (one brace range).
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let (Some(open), Some(close)) = (pattern.find('{'), pattern.find('}')) else {
        return Ok(vec![pattern.to_owned()]);
    };
    let (head, range, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let (lo, hi) = range
        .split_once("..")
        .ok_or(format!("{pattern}: expected {{first..last}}"))?;
    let width = lo.len();
    let (a, b): (u64, u64) = (
        lo.parse()
            .map_err(|_| format!("{pattern}: {lo} is not a number"))?,
        hi.parse()
            .map_err(|_| format!("{pattern}: {hi} is not a number"))?,
    );
    if a > b || b - a > 1_000_000 {
        return Err(format!("{pattern}: bad range {a}..{b}"));
    }
    Ok((a..=b)
        .map(|i| format!("{head}{i:0width$}{tail}"))
        .collect())
}

fn image_ext(ext: &str) -> bool {
    matches!(ext.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
}

impl WebDataset {
    /// Opens the shards. From a manifest, only the manifest is read (and the shards' SHA-256
    /// checked, through the verified cache: see `Manifest::verify_with`); otherwise every
    /// shard's tar headers are.
    pub fn open(spec: &str) -> Result<Self, DataError> {
        let path = Path::new(spec);
        if spec.ends_with(".json") {
            let m = Manifest::load(path)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            m.verify_with(dir, super::manifest::verified_cache_path(path).as_deref())?;
            if m.samples == 0 {
                return Err(DataError::open(path, "the shards hold no samples"));
            }
            let mut starts = vec![0];
            for s in &m.shards {
                starts.push(starts[starts.len() - 1] + s.samples);
            }
            return Ok(Self {
                shards: m.shards.iter().map(|s| dir.join(&s.path)).collect(),
                starts,
                index: m
                    .shards
                    .iter()
                    .map(|_| std::sync::OnceLock::new())
                    .collect(),
                classes: m.classes.clone(),
                manifest: Some(m.shards),
            });
        }
        let shards: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| DataError::open(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "tar"))
                .collect();
            v.sort();
            v
        } else {
            expand_braces(spec)
                .map_err(DataError::Invalid)?
                .into_iter()
                .map(PathBuf::from)
                .collect()
        };
        if shards.is_empty() {
            return Err(DataError::open(path, "no .tar shards"));
        }
        let mut starts = vec![0];
        let mut index = Vec::new();
        let mut max_label = 0;
        for shard in &shards {
            let entries = index_shard(shard).map_err(|e| DataError::open(shard, e))?;
            starts.push(starts[starts.len() - 1] + entries.len() as u64);
            if let Some(&m) = entries.iter().filter_map(|e| e.label.as_ref().ok()).max() {
                max_label = max_label.max(m);
            }
            index.push(std::sync::OnceLock::from(Ok(entries)));
        }
        if starts[starts.len() - 1] == 0 {
            return Err(DataError::open(path, "the shards hold no samples"));
        }
        Ok(Self {
            shards,
            starts,
            index,
            classes: (0..=max_label).map(|c| c.to_string()).collect(),
            manifest: None,
        })
    }

    /// The shard of sample `index`, and the sample's place in it.
    fn locate(&self, index: usize) -> (usize, usize) {
        let shard = self.starts.partition_point(|&s| s <= index as u64) - 1;
        (shard, index - self.starts[shard] as usize)
    }

    /// Shard `n`'s entries, read now if they were not yet. A shard that holds another count
    /// of samples than the manifest says cannot be used.
    fn entries(&self, n: usize) -> &ShardIndex {
        self.index[n].get_or_init(|| {
            let entries = index_shard(&self.shards[n])?;
            let expected = self.starts[n + 1] - self.starts[n];
            if entries.len() as u64 != expected {
                return Err(format!(
                    "the shard holds {} samples; the manifest says {expected}",
                    entries.len()
                ));
            }
            Ok(entries)
        })
    }
}

/// Reads a shard's tar headers and `.cls` entries (one sequential pass).
fn index_shard(shard: &Path) -> Result<Vec<Entry>, String> {
    let file = std::fs::File::open(shard).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut by_key: BTreeMap<String, Entry> = BTreeMap::new();
    let iter = archive.entries().map_err(|e| e.to_string())?;
    for entry in iter {
        let mut entry = entry.map_err(|e| format!("unreadable tar: {e}"))?;
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some((key, ext)) = name.split_once('.') else {
            continue;
        };
        let e = by_key.entry(key.to_owned()).or_insert_with(|| Entry {
            key: key.to_owned(),
            image: None,
            label: Err("no .cls entry".into()),
            problem: None,
        });
        if image_ext(ext) {
            if entry.size() > MAX_ENTRY_BYTES {
                e.problem = Some(format!(
                    "{name} holds {} bytes; an image may hold {MAX_ENTRY_BYTES}",
                    entry.size()
                ));
            } else {
                e.image = Some((entry.raw_file_position(), entry.size()));
            }
        } else if ext == "cls" {
            let mut text = String::new();
            // A class index is a few digits: read no more than that.
            e.label = match (&mut entry).take(64).read_to_string(&mut text) {
                Ok(_) => text
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|l| (0..MAX_CLASSES).contains(l))
                    .ok_or(format!(
                        ".cls holds {:?}, not a class index (0..{MAX_CLASSES})",
                        text.trim()
                    )),
                Err(err) => Err(format!("unreadable .cls: {err}")),
            };
        }
    }
    Ok(by_key.into_values().collect())
}

impl Source for WebDataset {
    fn len(&self) -> usize {
        self.starts[self.starts.len() - 1] as usize
    }

    fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }

    fn get(&self, index: usize) -> Result<Sample, SampleError> {
        let (n, local) = self.locate(index);
        let shard = &self.shards[n];
        let entries = self.entries(n).as_ref().map_err(|reason| SampleError {
            index,
            origin: shard.display().to_string(),
            reason: reason.clone(),
        })?;
        let e = &entries[local];
        let err = |reason: String| SampleError {
            index,
            origin: format!("{}:{}", shard.display(), e.key),
            reason,
        };
        if let Some(problem) = &e.problem {
            return Err(err(problem.clone()));
        }
        let label = e.label.clone().map_err(err)?;
        if label >= self.num_classes() {
            return Err(err(format!(
                "class {label} is outside the {} classes",
                self.num_classes()
            )));
        }
        let (offset, len) = e.image.ok_or_else(|| err("no .jpg/.png entry".into()))?;
        let bytes = read_at(shard, offset, len).map_err(|x| err(x.to_string()))?;
        let image = Image::decode(&bytes).map_err(err)?;
        Ok(Sample { image, label })
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    /// From a manifest: each shard's name, sample count and SHA-256 (the manifest pins the
    /// content). Otherwise each sample's shard file name and key, in index order.
    fn listing(&self) -> Vec<String> {
        if let Some(shards) = &self.manifest {
            let mut v: Vec<String> = shards
                .iter()
                .map(|s| format!("{} {} {}", s.path, s.samples, s.sha256))
                .collect();
            v.extend(self.classes.iter().cloned());
            return v;
        }
        let mut v = Vec::with_capacity(self.len());
        for (n, shard) in self.shards.iter().enumerate() {
            let name = shard
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            if let Ok(entries) = self.entries(n) {
                v.extend(entries.iter().map(|e| format!("{name} {}", e.key)));
            }
        }
        v
    }

    /// Each shard is a run of consecutive ids.
    fn shards(&self) -> Option<Vec<Shard>> {
        Some(
            self.starts
                .windows(2)
                .map(|w| Shard {
                    first: w[0],
                    samples: w[1] - w[0],
                })
                .collect(),
        )
    }
}

/// `len` bytes of `path` at `offset`. A rank reads its samples from a window of shards in
/// order, so each loader thread keeps the shards it read last open (up to `OPEN_SHARDS`)
/// instead of opening a file per sample.
fn read_at(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    const OPEN_SHARDS: usize = 32;
    thread_local! {
        static OPEN: std::cell::RefCell<Vec<(PathBuf, std::fs::File)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    OPEN.with(|open| {
        let mut open = open.borrow_mut();
        match open.iter().position(|(p, _)| p == path) {
            Some(0) => {}
            Some(i) => {
                let hit = open.remove(i);
                open.insert(0, hit);
            }
            None => {
                open.insert(0, (path.to_path_buf(), std::fs::File::open(path)?));
                open.truncate(OPEN_SHARDS);
            }
        }
        let mut bytes = vec![0; len as usize];
        open[0].1.read_exact_at(&mut bytes, offset)?;
        Ok(bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_patterns_expand() {
        assert_eq!(
            expand_braces("s-{08..10}.tar").expect("ok"),
            vec!["s-08.tar", "s-09.tar", "s-10.tar"]
        );
        assert_eq!(expand_braces("one.tar").expect("ok"), vec!["one.tar"]);
        assert!(expand_braces("s-{3..1}.tar").is_err());
    }
}
