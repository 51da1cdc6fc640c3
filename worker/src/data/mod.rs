//! Data: where samples come from, how they are decoded and augmented, and how they reach the
//! training step.
//!
//! - [`Source`]: an indexed collection of samples (`get(i)` decodes sample i). Implementations:
//!   [`builtin::Builtin`] (procedural, no download), [`imagefolder::ImageFolder`],
//!   [`webdataset::WebDataset`] (tar shards), [`cifar::Cifar10`], [`mnist::Mnist`].
//! - [`manifest`]: a dataset manifest (shards, sample counts, SHA-256) and `prepare`, which
//!   turns an image folder into tar shards plus manifest.
//! - [`augment`]: RandomResizedCrop + flip + normalization for training; resize + centre crop
//!   for evaluation. Every draw comes from a stream derived from `(seed, epoch, sample)`, so a
//!   batch is the same whichever thread makes it, and a resumed run sees the same pixels.
//! - [`loader::Loader`]: decoding and augmentation on loader threads, a bounded prefetch queue,
//!   batches in a fixed order. A sample that cannot be read or decoded is skipped and counted.

pub mod augment;
pub mod builtin;
pub mod cifar;
pub mod imagefolder;
pub mod loader;
pub mod manifest;
pub mod mnist;
pub mod webdataset;

use std::path::PathBuf;

use axial_common::checkpoint::DataIdentity;
use axial_common::job::{DataConfig, DataFormat, Split};
use axial_common::plan::{Layout, Shard};

/// The longest side an image may have.
pub const MAX_SIDE: u32 = 16_384;
/// The most memory one image's decoding may take.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

/// An 8-bit RGB image, rows of interleaved R, G, B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Image {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            pixels: vec![0; width as usize * height as usize * 3],
        }
    }

    /// Decodes JPEG or PNG bytes (colour or greyscale) into RGB. The dimensions are checked
    /// before any pixel is decoded (at most [`MAX_SIDE`] per side, [`MAX_DECODE_BYTES`] in
    /// all): a hostile or broken file is an error for that sample, never an out-of-memory.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        reader.limits(limits);
        let img = reader.decode().map_err(|e| e.to_string())?;
        let rgb = img.to_rgb8();
        let (width, height) = rgb.dimensions();
        if width == 0 || height == 0 {
            return Err("image has no pixels".into());
        }
        Ok(Self {
            width,
            height,
            pixels: rgb.into_raw(),
        })
    }
}

/// One labelled image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: Image,
    pub label: i64,
}

/// Why a sample could not be produced; the loader skips it and counts it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("sample {index} ({origin}): {reason}")]
pub struct SampleError {
    pub index: usize,
    pub origin: String,
    pub reason: String,
}

/// An indexed dataset split. `get` may be called from several threads at once.
pub trait Source: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn num_classes(&self) -> i64;
    /// Decodes sample `index` (< len).
    fn get(&self, index: usize) -> Result<Sample, SampleError>;
    /// Class names, where the format has them.
    fn class_names(&self) -> Vec<String> {
        (0..self.num_classes()).map(|c| c.to_string()).collect()
    }
    /// The shards the samples are stored in, for a source read front to back (tar files);
    /// `None` for one that reads any sample at any moment.
    fn shards(&self) -> Option<Vec<Shard>> {
        None
    }
    /// What identifies this split's samples and their order of ids, hashed into the
    /// checkpoint's data identity: by default the count and the class names; sources with a
    /// listing (files, shards) hash it.
    fn listing(&self) -> Vec<String> {
        let mut v = vec![self.len().to_string()];
        v.extend(self.class_names());
        v
    }
}

/// The data identity of `source` under the job's settings, recorded with every checkpoint and
/// checked on resume.
pub fn identity(source: &dyn Source, data: &DataConfig, seed: u64) -> DataIdentity {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for line in source.listing() {
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let sharded = source.shards().is_some();
    DataIdentity {
        samples: source.len() as u64,
        fingerprint: u64::from_be_bytes(first),
        seed,
        shard_window: if sharded {
            data.shard_window() as u64
        } else {
            0
        },
        shuffle_buffer: if sharded {
            data.shuffle_buffer() as u64
        } else {
            0
        },
    }
}

/// How the epoch's order may mix `source` (see `axial_common::plan`): a full permutation, or
/// for sharded sources the job's shard window and shuffle buffer.
pub fn layout(source: &dyn Source, data: &DataConfig) -> Layout {
    match source.shards() {
        None => Layout::RandomAccess {
            samples: source.len() as u64,
        },
        Some(shards) => Layout::Sharded {
            shards,
            window: data.shard_window(),
            buffer: data.shuffle_buffer(),
        },
    }
}

/// A dataset that cannot be opened at all (as opposed to one bad sample).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub fn open(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::Open {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// Which split of a job's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitKind {
    Train,
    Val,
}

/// Opens the train or validation split of a job's `[data]`.
pub fn open(data: &DataConfig, split: SplitKind, seed: u64) -> Result<Box<dyn Source>, DataError> {
    let spec = match split {
        SplitKind::Train => &data.train,
        SplitKind::Val => &data.val,
    };
    let path = |s: &Split| match s {
        Split::Path(p) => Ok(PathBuf::from(p)),
        Split::Count(n) => Err(DataError::Invalid(format!(
            "data.{}: {n} is a sample count; format {:?} needs a path",
            if split == SplitKind::Train {
                "train"
            } else {
                "val"
            },
            data.format
        ))),
    };
    let size = data.image_size.unwrap_or(32);
    Ok(match data.format {
        DataFormat::Builtin => {
            let Split::Count(n) = spec else {
                return Err(DataError::Invalid(
                    "builtin data needs sample counts".into(),
                ));
            };
            Box::new(builtin::Builtin::new(*n as usize, size as u32, seed, split))
        }
        DataFormat::Imagefolder => Box::new(imagefolder::ImageFolder::open(&path(spec)?)?),
        DataFormat::Webdataset => Box::new(webdataset::WebDataset::open(
            &path(spec)?.to_string_lossy(),
        )?),
        DataFormat::Cifar10 => Box::new(cifar::Cifar10::open(&path(spec)?, split)?),
        DataFormat::Mnist => Box::new(mnist::Mnist::open(&path(spec)?, split)?),
    })
}

/// [`open`], once per process for the same `[data]`, split and seed: a group re-formed in the
/// same worker process (a new generation after a failure) reuses the split it opened instead
/// of reading the data again. The newest few are kept.
pub fn open_shared(
    data: &DataConfig,
    split: SplitKind,
    seed: u64,
) -> Result<std::sync::Arc<dyn Source>, DataError> {
    use std::sync::{Arc, Mutex};
    type Opened = Vec<(String, Arc<dyn Source>)>;
    static OPENED: Mutex<Opened> = Mutex::new(Vec::new());
    const KEPT: usize = 4;
    let key = format!("{data:?} {split:?} {seed}");
    let found = OPENED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, s)| s.clone());
    if let Some(source) = found {
        return Ok(source);
    }
    let source: Arc<dyn Source> = Arc::from(open(data, split, seed)?);
    let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
    opened.push((key, source.clone()));
    if opened.len() > KEPT {
        opened.remove(0);
    }
    Ok(source)
}
