//! One optimization step, with no host-device sync: the loss comes back as a tensor, to be read
//! when the caller wants it (every N steps), not on every step.

use tch::nn::OptimizerConfig;
use tch::{Tensor, nn};

use crate::model::{AxialResNet, cross_entropy};

/// The authors' recipe (MODEL.md §6): SGD, Nesterov momentum 0.9, weight decay 8e-5 on every
/// parameter.
pub fn sgd(vs: &nn::VarStore, lr: f64) -> Result<nn::Optimizer, tch::TchError> {
    nn::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        wd: 8e-5,
        nesterov: true,
    }
    .build(vs, lr)
}

/// Forward in train mode, mean cross-entropy, backward, optimizer step. Returns the loss
/// (detached, still on the device).
pub fn train_step(
    net: &AxialResNet,
    opt: &mut nn::Optimizer,
    images: &Tensor,
    labels: &Tensor,
) -> Tensor {
    let loss = cross_entropy(&net.forward_t(images, true), labels);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.detach()
}
