//! Evaluation on the validation split: top-1, top-5 and mean cross-entropy, read back once at
//! the end (no per-batch host sync).
//!
//! In a group every rank evaluates its share of the split (samples `rank, rank + world, ...`)
//! and the sums are all-reduced, so evaluation takes 1/world of the time and no rank waits
//! for another under the collective timeout. The counts equal a single rank's exactly; the
//! loss is a sum of per-sample float32 losses in float64, equal up to rounding.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::collective::ProcessGroup;
use crate::data::Source;
use crate::data::augment::Transform;
use crate::data::loader::{Loader, LoaderError, Plan};
use crate::model::AxialResNet;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct EvalResult {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub samples: u64,
    pub skipped: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    pub batch_size: usize,
    pub threads: usize,
    pub prefetch: usize,
}

/// Why an evaluation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}

/// Evaluates `net` on `source`: all of it, or with `group` this rank's share, the sums
/// all-reduced over the group (every rank gets the same result).
pub fn evaluate(
    net: &AxialResNet,
    source: Arc<dyn Source>,
    transform: Transform,
    opts: EvalOptions,
    device: Device,
    group: Option<&ProcessGroup>,
) -> Result<EvalResult, EvalError> {
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world()));
    let share: Vec<usize> = (rank..source.len()).step_by(world).collect();
    let plan = Plan::chunked(share, opts.batch_size, false, 0, 0);
    let k = 5.min(source.num_classes().max(1));
    let zeros = || Tensor::zeros([], (Kind::Double, device));
    let (mut correct1, mut correct5, mut loss_sum) = (zeros(), zeros(), zeros());
    let (mut samples, mut skipped) = (0u64, 0u64);
    tch::no_grad(|| -> Result<(), EvalError> {
        for batch in Loader::start(source, transform, plan, opts.threads, opts.prefetch) {
            let batch = batch?;
            skipped += batch.errors.len() as u64;
            if batch.is_empty() {
                continue;
            }
            let images = batch.images.to_device(device);
            let labels = batch.labels.to_device(device);
            let logits = net.forward_t(&images, false).to_kind(Kind::Float);
            let (_, top) = logits.topk(k, 1, true, true);
            let hits = top.eq_tensor(&labels.unsqueeze(1));
            correct1 += hits.narrow(1, 0, 1).sum(Kind::Double);
            correct5 += hits.sum(Kind::Double);
            // Per-sample losses, summed in float64: the same whichever batches they came in.
            let nll = -logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &labels.unsqueeze(1), false);
            loss_sum += nll.to_kind(Kind::Double).sum(Kind::Double);
            samples += batch.len() as u64;
        }
        Ok(())
    })?;
    let totals = Tensor::stack(
        &[
            correct1,
            correct5,
            loss_sum,
            Tensor::from(samples as f64).to_device(device),
            Tensor::from(skipped as f64).to_device(device),
        ],
        0,
    )
    .to_device(Device::Cpu);
    if let Some(g) = group {
        g.allreduce_sum(&[totals.shallow_clone()])?;
    }
    let v: Vec<f64> = (0..5).map(|i| totals.double_value(&[i])).collect();
    let denom = v[3].max(1.0);
    Ok(EvalResult {
        top1: v[0] / denom,
        top5: v[1] / denom,
        loss: v[2] / denom,
        samples: v[3] as u64,
        skipped: v[4] as u64,
    })
}
