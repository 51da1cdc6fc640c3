//! Checkpoints in the loop: [`checkpoint_at`] (a snapshot to the writer thread; in a group, the
//! votes), [`written`] (a finished write counted and voted for), and the replica fingerprint
//! every rank writes at the end.

use std::path::{Path, PathBuf};

use super::checkpoint::{self, Position, Snapshot, Writer};
use super::coordination::Distributed;
use super::optim::Optimizer;
use crate::error::{Error, Result};
use crate::metrics::WorkerMetrics;
use crate::model::Model;

/// The checkpoint at `pos`. Alone, the writer writes and commits it off this thread. In a
/// group, every rank passes a collective barrier here: it proves to rank 0 that the whole
/// group reached this step (rank 0 has also voted for the previous checkpoint by then: the
/// coordinator runs one checkpoint at a time). Rank 0's writer then writes the files, and rank
/// 0 votes for them, for the group, once written; the other ranks send nothing (one vote per
/// checkpoint instead of one per rank). Returns the folder of a previous checkpoint that
/// finished meanwhile.
pub(crate) fn checkpoint_at(
    model: &Model,
    optimizer: &Optimizer,
    pos: Position,
    rank: usize,
    dist: Option<&mut Distributed<'_>>,
    writer: &mut Writer,
    metrics: &WorkerMetrics,
) -> Result<Option<PathBuf>> {
    let snapshot = || Snapshot::take(model, optimizer.state_tensors(), pos);
    match dist {
        None => match writer.start(snapshot())? {
            Some(w) => written(w, None, metrics).map(Some),
            None => Ok(None),
        },
        Some(d) => {
            let mut previous = None;
            if rank == 0
                && let Some(w) = writer.finish()?
            {
                previous = Some(written(w, Some(&mut *d), metrics)?);
            }
            d.group.barrier()?;
            if rank == 0 {
                writer.start(snapshot())?;
            }
            Ok(previous)
        }
    }
}

/// A checkpoint the writer finished: counted, and in a group voted for (rank 0).
pub(crate) fn written(
    w: checkpoint::Written,
    dist: Option<&mut Distributed<'_>>,
    metrics: &WorkerMetrics,
) -> Result<PathBuf> {
    metrics.checkpoint_seconds.record(w.seconds);
    if let Some(d) = dist {
        d.coordination.vote(w.pos, &w.folder, w.files)?;
    }
    Ok(w.folder)
}

/// SHA-256 of this rank's whole state (weights, buffers, optimizer state, in name order),
/// also written to `<checkpoint dir>/replica-<rank>.sha256`: equal on every rank when the
/// replicas are identical, which data-parallel training must keep them.
pub(crate) fn replica_fingerprint(
    model: &Model,
    optimizer: &Optimizer,
    dir: &Path,
    rank: usize,
) -> Result<String> {
    let mut state = model.state_dict();
    state.extend(optimizer.state_tensors());
    let tmp = dir.join(format!(".replica-{rank}.safetensors"));
    crate::model::weights::write_tensors_atomic(&tmp, &state)?;
    let hash = axial_common::checkpoint::sha256_file(&tmp).map_err(|source| Error::Write {
        path: tmp.clone(),
        source,
    })?;
    let _ = std::fs::remove_file(&tmp);
    let path = dir.join(format!("replica-{rank}.sha256"));
    axial_common::checkpoint::write_atomic(&path, hash.as_bytes())
        .map_err(|source| Error::Write { path, source })?;
    Ok(hash)
}
