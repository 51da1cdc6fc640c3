//! Data-parallel semantics over a [`ProcessGroup`] (what PyTorch DDP does, minus the overlap
//! with backward, which is measured and discussed in the collectives issue):
//!
//! - [`broadcast_state`]: rank 0's parameters and buffers to every rank, before training.
//! - [`allreduce_gradients`]: gradients summed in buckets of about 25 MB, walking the
//!   parameters in reverse order (the order backward produces them). Each rank scales its loss
//!   by `local samples / global samples` first, so the sum is the exact global mean gradient,
//!   whatever the number of samples on each rank (an uneven last step included).
//! - [`average_buffers`]: running statistics averaged, so they stay identical on every rank.

use tch::{Kind, Tensor};

use super::{CollectiveError, ProcessGroup};

/// About 25 MB, DDP's default bucket.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Splits `tensors` (taken in reverse order) into buckets of at most `bucket_bytes`.
pub fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut size = 0usize;
    for t in tensors.iter().rev() {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if out.is_empty() || size + bytes > bucket_bytes {
            out.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(b) = out.last_mut() {
            b.push(t.shallow_clone());
        }
    }
    out
}

/// Sums `grads` over ranks in place, bucket by bucket.
pub fn allreduce_gradients(
    pg: &ProcessGroup,
    grads: &[Tensor],
    bucket_bytes: usize,
) -> Result<(), CollectiveError> {
    if pg.world() == 1 {
        return Ok(());
    }
    for bucket in buckets(grads, bucket_bytes) {
        pg.allreduce_sum(&bucket)?;
    }
    Ok(())
}

/// Copies rank 0's value of every tensor to all ranks (one flat buffer per dtype).
pub fn broadcast_state(pg: &ProcessGroup, tensors: &[Tensor]) -> Result<(), CollectiveError> {
    if pg.world() == 1 {
        return Ok(());
    }
    for kind in [
        Kind::Float,
        Kind::Double,
        Kind::Half,
        Kind::BFloat16,
        Kind::Int64,
    ] {
        let group: Vec<&Tensor> = tensors.iter().filter(|t| t.kind() == kind).collect();
        if group.is_empty() {
            continue;
        }
        let flat = Tensor::cat(
            &group
                .iter()
                .map(|t| t.detach().flatten(0, -1))
                .collect::<Vec<_>>(),
            0,
        );
        pg.broadcast(&flat, 0)?;
        let mut offset = 0;
        tch::no_grad(|| {
            for t in &group {
                let n = t.numel() as i64;
                t.shallow_clone()
                    .copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
        });
    }
    Ok(())
}

/// Averages floating-point buffers (running statistics) over ranks, in place.
pub fn average_buffers(pg: &ProcessGroup, buffers: &[Tensor]) -> Result<(), CollectiveError> {
    if pg.world() == 1 {
        return Ok(());
    }
    let floats: Vec<Tensor> = buffers
        .iter()
        .filter(|t| t.is_floating_point())
        .map(Tensor::shallow_clone)
        .collect();
    pg.allreduce_sum(&floats)?;
    let scale = 1.0 / pg.world() as f64;
    tch::no_grad(|| {
        for t in &floats {
            let _ = t.shallow_clone().g_mul_scalar_(scale);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_walk_backwards_and_respect_the_size() {
        let ts: Vec<Tensor> = (0..5)
            .map(|i| Tensor::zeros([(i + 1) * 100], (Kind::Float, tch::Device::Cpu)))
            .collect();
        // 400 B, 800 B, 1200 B, 1600 B, 2000 B; buckets of 2400 B from the back.
        let b = buckets(&ts, 2400);
        let sizes: Vec<Vec<i64>> = b
            .iter()
            .map(|bk| bk.iter().map(|t| t.size()[0]).collect())
            .collect();
        assert_eq!(sizes, vec![vec![500], vec![400], vec![300, 200, 100]]);
    }
}
