//! The training step: the one function the training loop, `demo` and the benchmarks all run.
//!
//! A step is `accumulate` micro-batches ([`Step::micro_batch`]: forward in train mode, loss,
//! backward, weighted by the micro-batch's share of the step's samples) and one update
//! ([`Step::update`]: the gradient all-reduce, fp16 unscaling and its overflow check, gradient
//! clipping, the optimizer, the running statistics averaged over the ranks). There is no
//! host-device sync besides the fp16 check: losses come back as tensors, to be read when the
//! caller wants them.
//!
//! A micro-batch with no sample still runs (a share of an uneven last step smaller than
//! `accumulate`, every sample undecodable, a resume onto more ranks than samples left): the
//! peers' collectives (the synchronized batch norms in both passes, the gradient buckets) need
//! this rank. Over an empty batch it adds zero statistics and a zero gradient.

use std::time::Instant;

use axial_common::job::OptimConfig;
use tch::{Device, Kind, Tensor};

use super::graph::GraphedStep;
use super::optim::{Optimizer, clip_grad_norm};
use crate::collective::ProcessGroup;
use crate::collective::ddp::{BUCKET_BYTES, allreduce_gradients, average_buffers};
use crate::collective::reducer::Reducer;
use crate::error::Result;
use crate::metrics::{Phase, WorkerMetrics};
use crate::model::batch_norm::SyncContext;
use crate::model::{AxialResNet, Model};

/// The authors' recipe (MODEL.md §6): SGD, Nesterov momentum 0.9, weight decay 8e-5 on every
/// parameter (the `[optim]` defaults).
pub fn recipe_sgd(model: &Model) -> Optimizer {
    Optimizer::new(&OptimConfig::default(), model.named_parameters())
}

/// Mean cross-entropy with label smoothing `eps` (PyTorch's `label_smoothing`).
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Tensor {
    let logp = logits.log_softmax(-1, Kind::Float);
    let nll = logp.nll_loss(labels);
    if eps == 0.0 {
        return nll;
    }
    let uniform = -logp.mean_dim(-1, false, Kind::Float).mean(Kind::Float);
    nll * (1.0 - eps) + uniform * eps
}

/// Dynamic loss scaling for fp16: halve on overflow (and skip the step), double after 2000
/// good steps. Off (scale 1) otherwise.
#[derive(Debug, Clone, Copy)]
pub struct LossScale {
    pub enabled: bool,
    pub scale: f64,
    pub good: u64,
}

impl LossScale {
    /// fp16's scale, starting at 2^16; or none.
    pub fn new(fp16: bool) -> Self {
        Self {
            enabled: fp16,
            scale: if fp16 { 65536.0 } else { 1.0 },
            good: 0,
        }
    }

    /// Unscales the gradients; returns whether they are finite (the step may be taken).
    pub fn unscale_and_check(&mut self, grads: &[Tensor]) -> bool {
        if !self.enabled {
            return true;
        }
        let finite = tch::no_grad(|| {
            let mut all = Tensor::ones(
                [],
                (
                    Kind::Bool,
                    grads.first().map_or(Device::Cpu, Tensor::device),
                ),
            );
            for g in grads {
                let _ = g.shallow_clone().g_mul_scalar_(1.0 / self.scale);
                all = all.logical_and(&g.isfinite().all());
            }
            all.int64_value(&[]) == 1
        });
        if finite {
            self.good += 1;
            if self.good == 2000 {
                self.scale *= 2.0;
                self.good = 0;
            }
        } else {
            self.scale /= 2.0;
            self.good = 0;
        }
        finite
    }
}

/// Where the gradients are summed over ranks.
#[derive(Clone, Copy)]
pub enum Reduce<'a> {
    /// One process: nowhere.
    Local,
    /// After backward, in buckets.
    AfterBackward(&'a ProcessGroup),
    /// During backward: the reducer's hooks start each bucket as it fills (armed for the
    /// step's last micro-batch).
    Overlapped(&'a Reducer, &'a ProcessGroup),
}

impl Reduce<'_> {
    fn group(&self) -> Option<&ProcessGroup> {
        match self {
            Reduce::Local => None,
            Reduce::AfterBackward(g) | Reduce::Overlapped(_, g) => Some(g),
        }
    }
}

/// What a step runs on.
pub struct Step<'a> {
    pub net: &'a AxialResNet,
    pub device: Device,
    /// Mixed precision (bf16 or fp16 autocast on CUDA).
    pub autocast: bool,
    pub label_smoothing: f64,
    pub reduce: Reduce<'a>,
    /// The synchronized batch norms' context: a collective error inside a forward pass is
    /// reported here and surfaces at the update.
    pub sync: Option<&'a SyncContext>,
    /// Running statistics, averaged over the ranks after each update.
    pub buffers: &'a [Tensor],
    /// The forward and backward of full micro-batches as a CUDA graph (`[train] cuda_graphs`;
    /// not with `Reduce::Overlapped`, whose hooks a replay would not run).
    pub graph: Option<&'a GraphedStep>,
}

impl<'a> Step<'a> {
    /// A step on one process, no mixed precision, no smoothing (`demo`, the benchmarks).
    pub fn local(net: &'a AxialResNet, device: Device) -> Self {
        Self {
            net,
            device,
            autocast: false,
            label_smoothing: 0.0,
            reduce: Reduce::Local,
            sync: None,
            buffers: &[],
            graph: None,
        }
    }

    /// Forward, loss and backward of one micro-batch of `images` `[n, 3, S, S]` and `labels`
    /// `[n]` (n may be 0), its loss weighted by its share `n / step_samples` of the step (the
    /// sum over ranks and micro-batches is the mean over the step's samples) and by the fp16
    /// scale. `last`: the step's last micro-batch, whose backward starts the gradient buckets
    /// when they overlap it. Returns the (unweighted, detached) loss of a non-empty batch.
    #[allow(clippy::too_many_arguments)]
    pub fn micro_batch(
        &self,
        images: &Tensor,
        labels: &Tensor,
        n: usize,
        step_samples: f64,
        scale: &LossScale,
        last: bool,
        metrics: Option<&WorkerMetrics>,
    ) -> Result<Option<Tensor>> {
        if last && let Reduce::Overlapped(r, _) = self.reduce {
            r.arm();
        }
        let t = Instant::now();
        let synced = self.sync_wait();
        let weight = scale.scale * n as f64 / step_samples;
        if n > 0
            && !matches!(self.reduce, Reduce::Overlapped(..))
            && let Some(graph) = self.graph
        {
            let pass = |x: &Tensor, y: &Tensor, w: &Tensor| -> Result<Tensor> {
                let loss = self.loss_of(x, y, n);
                (&loss * w).f_backward()?;
                Ok(loss.detach())
            };
            if let Some(loss) = graph.run(images, labels, weight, &pass)? {
                // One replay is forward and backward together: recorded as the forward.
                self.work_done(metrics, Phase::Forward, t, synced);
                return Ok(Some(loss));
            }
        }
        let images = images.to_device(self.device);
        let labels = labels.to_device(self.device);
        let loss = self.loss_of(&images, &labels, n);
        let synced = self.work_done(metrics, Phase::Forward, t, synced);
        let t = Instant::now();
        (&loss * weight).f_backward()?;
        self.work_done(metrics, Phase::Backward, t, synced);
        Ok((n > 0).then(|| loss.detach()))
    }

    /// The forward pass in train mode and the loss of `images` and `labels` on the device
    /// (over an empty batch: zero, still through every layer).
    fn loss_of(&self, images: &Tensor, labels: &Tensor, n: usize) -> Tensor {
        let logits = tch::autocast(self.autocast, || self.net.forward_t(images, true));
        if n == 0 {
            logits.sum(Kind::Float) * 0.0
        } else {
            smoothed_cross_entropy(&logits, labels, self.label_smoothing)
        }
    }

    /// The synchronized batch norms' all-reduce seconds so far (0 without them).
    fn sync_wait(&self) -> f64 {
        self.sync.map_or(0.0, |c| c.group.sync_wait_seconds())
    }

    /// Records the pass begun at `t` as `phase`, without the synchronized batch norms' time
    /// since `synced` (recorded as `Phase::SyncWait`): a fast rank's forward then measures its
    /// own work, not its wait for a slow one. Returns the new sync total.
    fn work_done(
        &self,
        metrics: Option<&WorkerMetrics>,
        phase: Phase,
        t: Instant,
        synced: f64,
    ) -> f64 {
        let Some(m) = metrics else {
            return synced;
        };
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        let now = self.sync_wait();
        let waited = (now - synced).max(0.0);
        m.record(phase, (t.elapsed().as_secs_f64() - waited).max(0.0));
        if self.sync.is_some() {
            m.record(Phase::SyncWait, waited);
        }
        now
    }

    /// The update after the step's micro-batches: gradients summed over the ranks, unscaled
    /// and checked (fp16), clipped to `clip` (0: off), the optimizer at `lr`, gradients zeroed,
    /// running statistics averaged. Returns false when fp16 overflowed and the step was
    /// skipped (the scale is then halved).
    pub fn update(
        &self,
        optimizer: &mut Optimizer,
        scale: &mut LossScale,
        clip: f64,
        lr: f64,
        metrics: Option<&WorkerMetrics>,
    ) -> Result<bool> {
        let grads = optimizer.grads();
        let wait = Instant::now();
        match self.reduce {
            Reduce::Local => {}
            // Armed already unless the step ended early: every rank then starts the same
            // buckets here, in the same order.
            Reduce::Overlapped(r, _) => {
                r.arm();
                r.finish()?;
            }
            Reduce::AfterBackward(g) => allreduce_gradients(g, &grads, BUCKET_BYTES)?,
        }
        if self.reduce.group().is_some() {
            self.phase_done(metrics, Phase::AllReduceWait, wait);
        }
        let t = Instant::now();
        if let Some(e) = self.sync.and_then(SyncContext::take_error) {
            return Err(e.into());
        }
        let stepped = scale.unscale_and_check(&grads);
        if stepped {
            if clip > 0.0 {
                let _norm = clip_grad_norm(&grads, clip);
            }
            optimizer.step(lr);
        }
        optimizer.zero_grad();
        if let Some(g) = self.reduce.group() {
            average_buffers(g, self.buffers)?;
        }
        self.phase_done(metrics, Phase::Optimizer, t);
        Ok(stepped)
    }

    /// Records the phase begun at `t` (when metrics are kept). On CUDA the device is
    /// synchronized first, so that the time is the phase's work, not its kernel launches.
    fn phase_done(&self, metrics: Option<&WorkerMetrics>, phase: Phase, t: Instant) {
        if let Some(m) = metrics {
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
            m.record(phase, t.elapsed().as_secs_f64());
        }
    }
}

/// One whole step on one process and one batch at `lr` (`demo`, the benchmarks): the same
/// [`Step`] the training loop runs. Returns the loss (detached, still on the device).
pub fn train_step(
    net: &AxialResNet,
    opt: &mut Optimizer,
    images: &Tensor,
    labels: &Tensor,
    lr: f64,
) -> Result<Tensor> {
    let step = Step::local(net, images.device());
    let n = images.size().first().copied().unwrap_or(0) as usize;
    let mut scale = LossScale::new(false);
    let loss = step.micro_batch(images, labels, n, n as f64, &scale, true, None)?;
    step.update(opt, &mut scale, 0.0, lr, None)?;
    Ok(loss.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, images.device()))))
}
