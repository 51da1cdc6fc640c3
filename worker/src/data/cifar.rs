//! CIFAR-10, binary version: records of one label byte and 3 x 32 x 32 planar RGB bytes.
//! `train` is the folder with `data_batch_1.bin` .. `data_batch_5.bin`, `val` the folder with
//! `test_batch.bin` (or either names a single batch file).

use std::path::{Path, PathBuf};

use super::{DataError, Image, Sample, SampleError, Source, SplitKind};

const RECORD: usize = 1 + 3 * 32 * 32;
const NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

#[derive(Debug, Clone)]
pub struct Cifar10 {
    records: Vec<u8>,
}

impl Cifar10 {
    pub fn open(path: &Path, split: SplitKind) -> Result<Self, DataError> {
        let files: Vec<PathBuf> = if path.is_dir() {
            match split {
                SplitKind::Train => (1..=5)
                    .map(|i| path.join(format!("data_batch_{i}.bin")))
                    .collect(),
                SplitKind::Val => vec![path.join("test_batch.bin")],
            }
        } else {
            vec![path.to_owned()]
        };
        let mut records = Vec::new();
        for f in &files {
            let bytes = std::fs::read(f).map_err(|e| DataError::open(f, e))?;
            if bytes.is_empty() || bytes.len() % RECORD != 0 {
                return Err(DataError::open(
                    f,
                    format!(
                        "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                        bytes.len()
                    ),
                ));
            }
            records.extend_from_slice(&bytes);
        }
        Ok(Self { records })
    }
}

impl Source for Cifar10 {
    fn len(&self) -> usize {
        self.records.len() / RECORD
    }

    fn num_classes(&self) -> i64 {
        10
    }

    fn get(&self, index: usize) -> Result<Sample, SampleError> {
        let r = &self.records[index * RECORD..(index + 1) * RECORD];
        let label = r[0] as i64;
        if label >= 10 {
            return Err(SampleError {
                index,
                origin: "cifar10".into(),
                reason: format!("label byte {label} is not a CIFAR-10 class"),
            });
        }
        let mut image = Image::new(32, 32);
        for p in 0..1024 {
            for c in 0..3 {
                image.pixels[p * 3 + c] = r[1 + c * 1024 + p];
            }
        }
        Ok(Sample { image, label })
    }

    fn class_names(&self) -> Vec<String> {
        NAMES.iter().map(|s| s.to_string()).collect()
    }
}
