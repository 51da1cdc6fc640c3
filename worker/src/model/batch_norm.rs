//! Batch normalization with PyTorch's parameters, buffers and names.
//!
//! tch's `nn::BatchNorm` initializes the scale uniformly and has no `num_batches_tracked`; this
//! one matches `torch.nn.BatchNorm{1,2}d` exactly (weight 1, bias 0, momentum 0.1, eps 1e-5,
//! running variance updated with the unbiased batch variance) and keeps `num_batches_tracked`
//! as an int64 buffer so that state dicts move both ways unchanged.

use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, RwLock};

use tch::{Device, Kind, Tensor, nn};

use crate::collective::{CollectiveError, ProcessGroup};

#[allow(unsafe_code)]
mod ffi {
    use super::{c_char, c_int, c_void};
    unsafe extern "C" {
        /// csrc/sync_norm.cpp: `*out` receives a new tensor, y.
        pub fn axial_sync_batch_norm(
            x: *mut c_void,
            weight: *mut c_void,
            bias: *mut c_void,
            running_mean: *mut c_void,
            running_var: *mut c_void,
            group: *mut c_void,
            momentum: f64,
            eps: f64,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

pub const MOMENTUM: f64 = 0.1;
pub const EPS: f64 = 1e-5;
/// Up to this many positions per channel, a norm runs on `[positions, C]` rows. Measured
/// (forward + backward, 2 threads, the two copies included): rows win 4-10x at 2 and 4
/// positions (`[128, 2048, 2]`: 1.2 ms against 12.0; `[32, 2048, 4]`: 0.7 against 4.1) and
/// lose at 8 and 16 (`[256, 512, 8]`: 3.2 against 2.5; `[256, 256, 16]`: 4.5 against 2.8).
const ROWS_BELOW: i64 = 4;

#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    /// Cross-replica statistics in training, when set (synchronized batch norm).
    sync: RwLock<Option<Arc<SyncContext>>>,
}

/// What synchronized batch norms share: the group, and the first collective error, which the
/// training step reports at its end (a forward pass cannot return one; the norm falls back to
/// local statistics, and the step fails).
#[derive(Debug)]
pub struct SyncContext {
    pub group: Arc<ProcessGroup>,
    error: Mutex<Option<CollectiveError>>,
}

impl SyncContext {
    pub fn new(group: Arc<ProcessGroup>) -> Arc<Self> {
        Arc::new(Self {
            group,
            error: Mutex::new(None),
        })
    }

    /// The first error since the last call, if any.
    pub fn take_error(&self) -> Option<CollectiveError> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(crate) fn record(&self, e: CollectiveError) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(e);
    }
}

impl BatchNorm {
    /// `channels` features; `zero_weight` for the zero-init-residual scale.
    pub fn new(p: nn::Path, channels: i64, zero_weight: bool) -> Self {
        let scale = if zero_weight { 0.0 } else { 1.0 };
        Self {
            weight: p.var("weight", &[channels], nn::Init::Const(scale)),
            bias: p.var("bias", &[channels], nn::Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
            num_batches_tracked: p.add(
                "num_batches_tracked",
                Tensor::zeros([], (Kind::Int64, p.device())),
                false,
            ),
            sync: RwLock::new(None),
        }
    }

    /// Synchronizes this norm's training statistics over `ctx`'s group (`None`: local).
    pub fn set_sync(&self, ctx: Option<Arc<SyncContext>>) {
        *self.sync.write().unwrap_or_else(|e| e.into_inner()) = ctx;
    }

    /// Whether training statistics are taken over a group of more than one replica.
    pub fn is_synchronized(&self) -> bool {
        self.sync_context().is_some()
    }

    /// The group this norm's training statistics span, when it has more than one replica.
    pub fn sync_context(&self) -> Option<Arc<SyncContext>> {
        let ctx = self.sync.read().unwrap_or_else(|e| e.into_inner());
        ctx.as_ref().filter(|c| c.group.world() > 1).cloned()
    }

    /// Counts one training batch (`num_batches_tracked`), for a caller that normalizes with
    /// this norm's parameters and statistics itself (the fused attention core).
    pub fn count_batch(&self) {
        tch::no_grad(|| {
            let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
        });
    }

    /// Eval's affine map folded into the bias-free convolution before it: the weight
    /// `[Cout, ...]` scaled per output channel by `gamma / sqrt(running_var + eps)`, and the
    /// bias `beta - running_mean * scale` (the same values to float32 rounding, one pass over
    /// the activations instead of two).
    pub fn fold(&self, weight: &Tensor) -> (Tensor, Tensor) {
        let scale = &self.weight * (&self.running_var + EPS).rsqrt();
        let mut shape = vec![-1i64];
        shape.resize(weight.dim(), 1);
        let folded = weight * scale.view(shape.as_slice());
        (folded, &self.bias - &self.running_mean * &scale)
    }

    /// Normalizes over every dimension but the channel dimension 1 (`[N, C]`, `[N, C, L]`,
    /// `[N, C, H, W]`). In training, uses and records the batch statistics.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train && let Some(ctx) = self.sync_context() {
            match self.forward_synchronized(xs, &ctx.group) {
                Ok(y) => return y,
                Err(e) => ctx.record(e),
            }
        }
        if train {
            self.count_batch();
        }
        // libtorch's contiguous kernel loops over the positions of each channel: for a few
        // positions per channel (the attention of the last stages: 2 or 4) it is 3-8x slower
        // than its channels-last kernel, which the same values take as rows `[positions, C]`.
        let size = xs.size();
        let positions: i64 = size.iter().skip(2).product();
        if size.len() > 2 && xs.numel() > 0 && positions > 1 && positions <= ROWS_BELOW {
            let (c, d) = (size[1], size.len() as i64);
            let to_rows: Vec<i64> = std::iter::once(0).chain(2..d).chain([1]).collect();
            let rows = xs.permute(to_rows.as_slice()).contiguous();
            let shape = rows.size();
            let y = self
                .normalize(&rows.view([-1, c]), train)
                .view(shape.as_slice());
            let back: Vec<i64> = std::iter::once(0).chain([d - 1]).chain(1..d - 1).collect();
            return y.permute(back.as_slice()).contiguous();
        }
        self.normalize(xs, train)
    }

    fn normalize(&self, xs: &Tensor, train: bool) -> Tensor {
        Tensor::batch_norm(
            xs,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            MOMENTUM,
            EPS,
            true,
        )
    }

    /// Training-mode batch norm with the mean and variance of the whole global batch. On the
    /// CPU in float32, one autograd function of the shim (csrc/sync_norm.cpp: two passes each
    /// way, one float64 all-reduce of the sums per pass); otherwise the same maths as tensor
    /// operations: the per-channel sums of x and x^2 and the count are summed over ranks by a
    /// differentiable all-reduce, so the backward pass carries the cross-rank terms too (2 ranks x batch B
    /// train like 1 rank x batch 2B). Running statistics are updated from the global
    /// statistics, so they are identical on every rank. The sums are accumulated and reduced
    /// in float64: the variance E[x^2] - E[x]^2 cancels, and in float32 how the batch is split
    /// over the ranks changed the update by 0.25% (test
    /// `a_step_split_by_shares_equals_the_even_split`).
    fn forward_synchronized(
        &self,
        xs: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Tensor, CollectiveError> {
        if xs.device() == Device::Cpu && xs.kind() == Kind::Float && xs.dim() >= 2 {
            return self.forward_synchronized_cpu(xs, group);
        }
        let c = xs.size()[1];
        let dims: Vec<i64> = (0..xs.dim() as i64).filter(|d| *d != 1).collect();
        let x = xs.to_kind(Kind::Float);
        let count = (x.numel() as i64 / c) as f64;
        let local = Tensor::cat(
            &[
                x.sum_dim_intlist(dims.as_slice(), false, Kind::Double),
                x.square()
                    .sum_dim_intlist(dims.as_slice(), false, Kind::Double),
                Tensor::full([1], count, (Kind::Double, x.device())),
            ],
            0,
        );
        let global = group.allreduce_sum_differentiable(&local)?;
        let n = global.narrow(0, 2 * c, 1);
        let mean64 = global.narrow(0, 0, c) / &n;
        let var = (global.narrow(0, c, c) / &n - mean64.square())
            .clamp_min(0.0)
            .to_kind(Kind::Float);
        let mean = mean64.to_kind(Kind::Float);
        let n = n.to_kind(Kind::Float);
        let mut shape = vec![1i64; xs.dim()];
        shape[1] = c;
        let scale = (&var + EPS).rsqrt() * &self.weight;
        let y = (&x - mean.view(shape.as_slice())) * scale.view(shape.as_slice())
            + self.bias.view(shape.as_slice());
        tch::no_grad(|| {
            // n / (n - 1) as a tensor: no host sync per norm per step.
            let unbiased = &var * (&n / (&n - 1.0).clamp_min(1.0));
            let _ = self
                .running_mean
                .shallow_clone()
                .g_mul_scalar_(1.0 - MOMENTUM)
                .g_add_(&(mean.detach() * MOMENTUM));
            let _ = self
                .running_var
                .shallow_clone()
                .g_mul_scalar_(1.0 - MOMENTUM)
                .g_add_(&(unbiased.detach() * MOMENTUM));
            let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
        });
        Ok(y.to_kind(xs.kind()))
    }

    /// [`Self::forward_synchronized`] on the CPU, through the shim.
    #[allow(unsafe_code)]
    fn forward_synchronized_cpu(
        &self,
        xs: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Tensor, CollectiveError> {
        let x = xs.contiguous();
        let mut out: *mut c_void = std::ptr::null_mut();
        let ptr = |t: &Tensor| t.as_ptr() as *mut c_void;
        crate::collective::call(
            "synchronized batch norm",
            group.rank(),
            group.world(),
            |err, len| {
                // SAFETY: live at::Tensor pointers and a live group for the call (the group
                // outlives the step's backward, which reads it); the shim checks the tensors
                // before it writes anything, and on success *out is a new heap at::Tensor.
                unsafe {
                    ffi::axial_sync_batch_norm(
                        ptr(&x),
                        ptr(&self.weight),
                        ptr(&self.bias),
                        ptr(&self.running_mean),
                        ptr(&self.running_var),
                        group.ptr,
                        MOMENTUM,
                        EPS,
                        &mut out,
                        err,
                        len,
                    )
                }
            },
        )?;
        self.count_batch();
        // SAFETY: `out` is a fresh at::Tensor* whose ownership passes to the Tensor.
        Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(vs: &nn::VarStore, name: &str) -> BatchNorm {
        let bn = BatchNorm::new(vs.root() / name, 6, false);
        tch::no_grad(|| {
            bn.weight
                .shallow_clone()
                .copy_(&Tensor::randn([6], tch::kind::FLOAT_CPU));
            bn.bias
                .shallow_clone()
                .copy_(&Tensor::randn([6], tch::kind::FLOAT_CPU));
        });
        bn
    }

    #[test]
    fn few_positions_per_channel_run_as_rows_with_the_same_result() {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let (rows, plain) = (norm(&vs, "a"), norm(&vs, "b"));
        tch::no_grad(|| {
            plain.weight.shallow_clone().copy_(&rows.weight);
            plain.bias.shallow_clone().copy_(&rows.bias);
        });
        for shape in [vec![5i64, 6, 3], vec![4, 6, 2, 2]] {
            let x = (Tensor::randn(shape.as_slice(), tch::kind::FLOAT_CPU) * 3.0 + 1.0)
                .set_requires_grad(true);
            let dy = Tensor::randn(shape.as_slice(), tch::kind::FLOAT_CPU);
            for train in [true, false] {
                let a = rows.forward_t(&x, train); // the rows path: 3 or 4 positions
                let b = plain.normalize(&x, train);
                assert_eq!(a.size(), shape);
                assert!(a.is_contiguous());
                let diff = (&a - &b).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "{shape:?} train {train}: output differs by {diff}"
                );
                let ga = Tensor::run_backward(
                    &[(&a * &dy).sum(Kind::Float)],
                    &[&x, &rows.weight],
                    false,
                    false,
                );
                let gb = Tensor::run_backward(
                    &[(&b * &dy).sum(Kind::Float)],
                    &[&x, &plain.weight],
                    false,
                    false,
                );
                for (u, v) in ga.iter().zip(&gb) {
                    let d = (u - v).abs().max().double_value(&[]);
                    assert!(d < 1e-4, "{shape:?} train {train}: gradient differs by {d}");
                }
            }
            for (u, v) in [
                (&rows.running_mean, &plain.running_mean),
                (&rows.running_var, &plain.running_var),
            ] {
                let d = (u - v).abs().max().double_value(&[]);
                assert!(d < 1e-5, "{shape:?}: running statistics differ by {d}");
            }
        }
        assert_eq!(rows.num_batches_tracked.int64_value(&[]), 2);
    }
}
