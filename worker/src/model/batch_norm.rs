//! Batch normalization with PyTorch's parameters, buffers and names.
//!
//! tch's `nn::BatchNorm` initializes the scale uniformly and has no `num_batches_tracked`; this
//! one matches `torch.nn.BatchNorm{1,2}d` exactly (weight 1, bias 0, momentum 0.1, eps 1e-5,
//! running variance updated with the unbiased batch variance) and keeps `num_batches_tracked`
//! as an int64 buffer so that state dicts move both ways unchanged.

use tch::{Kind, Tensor, nn};

pub const MOMENTUM: f64 = 0.1;
pub const EPS: f64 = 1e-5;

#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
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
        }
    }

    /// Normalizes over every dimension but the channel dimension 1 (`[N, C]`, `[N, C, L]`,
    /// `[N, C, H, W]`). In training, uses and records the batch statistics.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
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
}
