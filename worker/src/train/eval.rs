//! Evaluation on the validation split: top-1, top-5 and mean cross-entropy, read back once at
//! the end (no per-batch host sync).

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::data::Source;
use crate::data::augment::Transform;
use crate::data::loader::{Loader, Plan};
use crate::model::{AxialResNet, cross_entropy};

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

pub fn evaluate(
    net: &AxialResNet,
    source: Arc<dyn Source>,
    transform: Transform,
    opts: EvalOptions,
    device: Device,
) -> EvalResult {
    let plan = Plan::chunked((0..source.len()).collect(), opts.batch_size, false, 0, 0);
    let k = 5.min(source.num_classes().max(1));
    let zeros = || Tensor::zeros([], (Kind::Double, device));
    let (mut correct1, mut correct5, mut loss_sum) = (zeros(), zeros(), zeros());
    let (mut samples, mut skipped) = (0u64, 0u64);
    tch::no_grad(|| {
        for batch in Loader::start(source, transform, plan, opts.threads, opts.prefetch) {
            skipped += batch.errors.len() as u64;
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as f64;
            let images = batch.images.to_device(device);
            let labels = batch.labels.to_device(device);
            let logits = net.forward_t(&images, false).to_kind(Kind::Float);
            let (_, top) = logits.topk(k, 1, true, true);
            let hits = top.eq_tensor(&labels.unsqueeze(1));
            correct1 += hits.narrow(1, 0, 1).sum(Kind::Double);
            correct5 += hits.sum(Kind::Double);
            loss_sum += cross_entropy(&logits, &labels).to_kind(Kind::Double) * n;
            samples += batch.len() as u64;
        }
    });
    let denom = samples.max(1) as f64;
    EvalResult {
        top1: correct1.double_value(&[]) / denom,
        top5: correct5.double_value(&[]) / denom,
        loss: loss_sum.double_value(&[]) / denom,
        samples,
        skipped,
    }
}
