//! WebDataset-style tar shards: samples are the files sharing a key (`<key>.jpg|jpeg|png` and
//! `<key>.cls`, the class index as text). The spec is a `manifest.json` (shards verified
//! against their SHA-256), a folder (its `*.tar`, sorted), a single `.tar`, or a brace pattern
//! such as `data/shard-{000000..000009}.tar`.
//!
//! Opening reads only the tar headers and the small `.cls` entries; images are read by offset
//! when a sample is requested.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
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
    shard: usize,
    key: String,
    /// Offset and length of the image bytes, if the key has an image.
    image: Option<(u64, u64)>,
    /// Parsed class, or why not.
    label: Result<i64, String>,
    /// Why the sample cannot be used whatever else it has (an oversized image).
    problem: Option<String>,
}

#[derive(Debug, Clone)]
pub struct WebDataset {
    shards: Vec<PathBuf>,
    entries: Vec<Entry>,
    classes: Vec<String>,
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
    pub fn open(spec: &str) -> Result<Self, DataError> {
        let path = Path::new(spec);
        let mut classes = Vec::new();
        let shards: Vec<PathBuf> = if spec.ends_with(".json") {
            let m = Manifest::load(path)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            m.verify(dir)?;
            classes = m.classes.clone();
            m.shards.iter().map(|s| dir.join(&s.path)).collect()
        } else if path.is_dir() {
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
        let mut entries = Vec::new();
        for (n, shard) in shards.iter().enumerate() {
            index_shard(n, shard, &mut entries)?;
        }
        if entries.is_empty() {
            return Err(DataError::open(path, "the shards hold no samples"));
        }
        if classes.is_empty() {
            let max = entries
                .iter()
                .filter_map(|e| e.label.as_ref().ok())
                .max()
                .copied()
                .unwrap_or(0);
            classes = (0..=max).map(|c| c.to_string()).collect();
        }
        Ok(Self {
            shards,
            entries,
            classes,
        })
    }
}

fn index_shard(n: usize, shard: &Path, entries: &mut Vec<Entry>) -> Result<(), DataError> {
    let file = std::fs::File::open(shard).map_err(|e| DataError::open(shard, e))?;
    let mut archive = tar::Archive::new(file);
    let mut by_key: BTreeMap<String, Entry> = BTreeMap::new();
    let iter = archive.entries().map_err(|e| DataError::open(shard, e))?;
    for entry in iter {
        let mut entry =
            entry.map_err(|e| DataError::open(shard, format!("unreadable tar: {e}")))?;
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some((key, ext)) = name.split_once('.') else {
            continue;
        };
        let e = by_key.entry(key.to_owned()).or_insert_with(|| Entry {
            shard: n,
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
    entries.extend(by_key.into_values());
    Ok(())
}

impl Source for WebDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }

    fn get(&self, index: usize) -> Result<Sample, SampleError> {
        let e = &self.entries[index];
        let shard = &self.shards[e.shard];
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
        let mut f = std::fs::File::open(shard).map_err(|x| err(x.to_string()))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|x| err(x.to_string()))?;
        let mut bytes = vec![0; len as usize];
        f.read_exact(&mut bytes).map_err(|x| err(x.to_string()))?;
        let image = Image::decode(&bytes).map_err(err)?;
        Ok(Sample { image, label })
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    /// Each sample's shard file name and key, in index order.
    fn listing(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| {
                let shard = self.shards[e.shard].file_name();
                format!(
                    "{} {}",
                    shard.map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                    e.key
                )
            })
            .collect()
    }

    /// Entries are indexed shard by shard, so each shard is a run of consecutive ids.
    fn shards(&self) -> Option<Vec<Shard>> {
        let mut counts = vec![0u64; self.shards.len()];
        for e in &self.entries {
            counts[e.shard] += 1;
        }
        let mut first = 0;
        Some(
            counts
                .into_iter()
                .map(|samples| {
                    let shard = Shard { first, samples };
                    first += samples;
                    shard
                })
                .collect(),
        )
    }
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
