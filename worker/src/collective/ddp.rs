//! Data-parallel semantics over a [`ProcessGroup`] (what PyTorch DDP does, minus the overlap
//! with backward, which is measured and discussed in the collectives issue):
//!
//! - [`broadcast_state`]: rank 0's parameters and buffers to every rank, before training.
//! - [`allreduce_gradients`]: gradients summed in buckets of about 25 MB, walking the
//!   parameters in reverse order (the order backward produces them); [`into_buckets`] places
//!   them in their bucket's storage, so a bucket is summed in place. Each rank scales its loss
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

/// Moves `tensors` (values kept) into one storage per bucket of [`buckets`], back to back in
/// bucket order: each tensor then is a slice of its bucket's buffer, and an all-reduce of the
/// bucket (`allreduce_gradients`, the overlapping reducer) sums the buffer itself, in place,
/// with no copy into a flat buffer and back. For gradients: autograd accumulates into a
/// defined gradient in place, so they stay there step after step (zeroed in place). A bucket
/// of mixed dtypes or devices is left as it is. Returns the buffers.
pub fn into_buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Tensor> {
    let mut flats = Vec::new();
    tch::no_grad(|| {
        for bucket in buckets(tensors, bucket_bytes) {
            let Some(first) = bucket.first() else {
                continue;
            };
            let (kind, device) = (first.kind(), first.device());
            if bucket
                .iter()
                .any(|t| t.kind() != kind || t.device() != device)
            {
                continue;
            }
            let total: i64 = bucket.iter().map(|t| t.numel() as i64).sum();
            let flat = Tensor::zeros([total], (kind, device));
            let mut offset = 0i64;
            for t in &bucket {
                let n = t.numel() as i64;
                let size = t.size();
                flat.narrow(0, offset, n).copy_(&t.reshape([-1]));
                let _ = t.shallow_clone().set_source_tensor_storage_offset_(
                    &flat,
                    offset,
                    &size,
                    contiguous_strides(&size),
                );
                offset += n;
            }
            flats.push(flat);
        }
    });
    flats
}

/// The strides of a contiguous tensor of `size`.
fn contiguous_strides(size: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * size[i + 1].max(1);
    }
    strides
}

/// Sums `grads` over ranks in place, bucket by bucket (a bucket whose gradients lie in one
/// buffer, see [`into_buckets`], as that one buffer).
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

    /// Gradients placed in their bucket's storage keep their values, lie back to back in
    /// bucket order, and stay there through backward passes (autograd accumulates into them
    /// in place) and zeroing.
    #[test]
    fn gradients_in_bucket_storage_stay_there_across_steps() {
        let cpu = (Kind::Float, tch::Device::Cpu);
        let params: Vec<Tensor> = [[3i64, 4], [5, 1], [2, 2]]
            .iter()
            .map(|s| Tensor::randn(s.as_slice(), cpu).set_requires_grad(true))
            .collect();
        let loss = |ps: &[Tensor]| {
            ps.iter()
                .map(|p| (p * p).sum(Kind::Float))
                .fold(Tensor::zeros([], cpu), |a, b| a + b)
        };
        loss(&params).backward();
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
        let before: Vec<Tensor> = grads.iter().map(|g| g.detach().copy()).collect();
        // 48 B, 20 B, 16 B; buckets of 40 B from the back: [p2, p1], [p0].
        let flats = into_buckets(&grads, 40);
        assert_eq!(flats.len(), 2);
        assert_eq!(flats[0].size(), [9]);
        assert_eq!(flats[1].size(), [12]);
        for (g, b) in grads.iter().zip(&before) {
            assert!(g.equal(b), "values kept");
        }
        let f32 = std::mem::size_of::<f32>();
        let at = |t: &Tensor| t.data_ptr() as usize;
        assert_eq!(at(&params[2].grad()), at(&flats[0]));
        assert_eq!(at(&params[1].grad()), at(&flats[0]) + 4 * f32);
        assert_eq!(at(&params[0].grad()), at(&flats[1]));
        for _ in 0..2 {
            for p in &params {
                let _ = p.grad().detach_().zero_();
            }
            loss(&params).backward();
        }
        assert_eq!(
            at(&params[1].grad()),
            at(&flats[0]) + 4 * f32,
            "still in the bucket"
        );
        let want = Tensor::cat(
            &[
                (&params[2] * 2).reshape([-1]),
                (&params[1] * 2).reshape([-1]),
            ],
            0,
        );
        assert!(
            flats[0].allclose(&want, 1e-6, 1e-6, false),
            "the bucket holds the gradients"
        );
    }
}
