//! MNIST in IDX files (uncompressed). `train`/`val` name a folder holding
//! `train-images-idx3-ubyte` + `train-labels-idx1-ubyte` (`t10k-*` for val), or an images file
//! whose labels file sits beside it (`images` -> `labels` in the name). Grey becomes RGB.

use std::path::{Path, PathBuf};

use super::{DataError, Image, Sample, SampleError, Source, SplitKind};

#[derive(Debug, Clone)]
pub struct Mnist {
    rows: u32,
    cols: u32,
    images: Vec<u8>,
    labels: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Mnist {
    pub fn open(path: &Path, split: SplitKind) -> Result<Self, DataError> {
        let (images_path, labels_path): (PathBuf, PathBuf) = if path.is_dir() {
            let prefix = if split == SplitKind::Train {
                "train"
            } else {
                "t10k"
            };
            (
                path.join(format!("{prefix}-images-idx3-ubyte")),
                path.join(format!("{prefix}-labels-idx1-ubyte")),
            )
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().replace("images", "labels"))
                .unwrap_or_default();
            (path.to_owned(), path.with_file_name(name))
        };
        for p in [&images_path, &labels_path] {
            if p.extension().is_some_and(|e| e == "gz") {
                return Err(DataError::open(
                    p,
                    "gzip-compressed; decompress it first (gunzip)",
                ));
            }
        }
        let images = std::fs::read(&images_path).map_err(|e| DataError::open(&images_path, e))?;
        let labels = std::fs::read(&labels_path).map_err(|e| DataError::open(&labels_path, e))?;
        if images.len() < 16 || be32(&images, 0) != 2051 {
            return Err(DataError::open(
                &images_path,
                "not an IDX image file (magic 2051)",
            ));
        }
        if labels.len() < 8 || be32(&labels, 0) != 2049 {
            return Err(DataError::open(
                &labels_path,
                "not an IDX label file (magic 2049)",
            ));
        }
        let (n, rows, cols) = (
            be32(&images, 4) as usize,
            be32(&images, 8),
            be32(&images, 12),
        );
        if images.len() != 16 + n * rows as usize * cols as usize || rows == 0 || cols == 0 {
            return Err(DataError::open(
                &images_path,
                format!(
                    "header says {n} images of {rows}x{cols}, but the file has {} bytes",
                    images.len()
                ),
            ));
        }
        if be32(&labels, 4) as usize != n || labels.len() != 8 + n {
            return Err(DataError::open(
                &labels_path,
                format!("expected {n} labels to match the image file"),
            ));
        }
        Ok(Self {
            rows,
            cols,
            images: images[16..].to_vec(),
            labels: labels[8..].to_vec(),
        })
    }
}

impl Source for Mnist {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> i64 {
        10
    }

    fn get(&self, index: usize) -> Result<Sample, SampleError> {
        let label = self.labels[index] as i64;
        if label >= 10 {
            return Err(SampleError {
                index,
                origin: "mnist".into(),
                reason: format!("label {label} is not a digit"),
            });
        }
        let px = (self.rows * self.cols) as usize;
        let grey = &self.images[index * px..(index + 1) * px];
        let mut image = Image::new(self.cols, self.rows);
        for (i, g) in grey.iter().enumerate() {
            image.pixels[i * 3..i * 3 + 3].fill(*g);
        }
        Ok(Sample { image, label })
    }
}
