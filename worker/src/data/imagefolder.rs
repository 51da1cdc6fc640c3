//! An image folder: one sub-folder per class (sorted names give the class indices), JPEG or PNG
//! files inside (sorted), colour or greyscale.

use std::path::{Path, PathBuf};

use super::{DataError, Image, Sample, SampleError, Source};

#[derive(Debug, Clone)]
pub struct ImageFolder {
    classes: Vec<String>,
    files: Vec<(PathBuf, i64)>,
}

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::open(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

impl ImageFolder {
    pub fn open(root: &Path) -> Result<Self, DataError> {
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len() as i64;
            classes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            files.extend(
                sorted_entries(&dir)?
                    .into_iter()
                    .filter(|p| is_image(p))
                    .map(|p| (p, label)),
            );
        }
        if classes.is_empty() {
            return Err(DataError::open(
                root,
                "no class sub-folders (expected ROOT/<class>/<image>.jpg|png)",
            ));
        }
        if files.is_empty() {
            return Err(DataError::open(
                root,
                "the class folders hold no .jpg, .jpeg or .png files",
            ));
        }
        Ok(Self { classes, files })
    }

    /// (path, label) of every sample, in index order.
    pub fn files(&self) -> &[(PathBuf, i64)] {
        &self.files
    }
}

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }

    fn get(&self, index: usize) -> Result<Sample, SampleError> {
        let (path, label) = &self.files[index];
        let err = |reason: String| SampleError {
            index,
            origin: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let image = Image::decode(&bytes).map_err(err)?;
        Ok(Sample {
            image,
            label: *label,
        })
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    /// Each sample's class folder and file name, in index order.
    fn listing(&self) -> Vec<String> {
        self.files
            .iter()
            .map(|(path, label)| {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                format!(
                    "{} {}",
                    self.classes[*label as usize],
                    name.unwrap_or_default()
                )
            })
            .collect()
    }
}
