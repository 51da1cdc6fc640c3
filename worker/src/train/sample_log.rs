//! `[data] log_samples`: the audit log of the training samples a worker consumes.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `[data] log_samples`: the audit log of the training samples this worker consumes.
pub(crate) struct SampleLog {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    generation: u64,
}

impl SampleLog {
    pub(crate) fn open(ckpt_dir: &Path, worker: &str, generation: u64) -> Result<Self> {
        let dir = ckpt_dir.join("samples");
        let path = dir.join(format!("{worker}.log"));
        let file = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            })
            .map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            path,
            out: std::io::BufWriter::new(file),
            generation,
        })
    }

    /// One micro-batch: `<generation> <epoch> <step> <index>...`, flushed at once (a process
    /// killed a moment later keeps what it consumed).
    pub(crate) fn write(&mut self, epoch: u64, step: u64, samples: &[usize]) -> Result<()> {
        use std::io::Write;
        let mut line = format!("{} {epoch} {step}", self.generation);
        for s in samples {
            line.push_str(&format!(" {s}"));
        }
        line.push('\n');
        self.out
            .write_all(line.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|source| Error::Write {
                path: self.path.clone(),
                source,
            })
    }
}
