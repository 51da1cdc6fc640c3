//! One optimization step, with no host-device sync: the loss comes back as a tensor, to be read
//! when the caller wants it (every N steps), not on every step. The demo and the benchmarks use
//! it with the same optimizer as the training loop.

use axial_common::job::OptimConfig;
use tch::Tensor;

use super::optim::Optimizer;
use crate::model::{AxialResNet, Model, cross_entropy};

/// The authors' recipe (MODEL.md §6): SGD, Nesterov momentum 0.9, weight decay 8e-5 on every
/// parameter (the `[optim]` defaults).
pub fn recipe_sgd(model: &Model) -> Optimizer {
    Optimizer::new(&OptimConfig::default(), model.named_parameters())
}

/// Forward in train mode, mean cross-entropy, backward, optimizer step at `lr`. Returns the
/// loss (detached, still on the device).
pub fn train_step(
    net: &AxialResNet,
    opt: &mut Optimizer,
    images: &Tensor,
    labels: &Tensor,
    lr: f64,
) -> Tensor {
    let loss = cross_entropy(&net.forward_t(images, true), labels);
    opt.zero_grad();
    loss.backward();
    opt.step(lr);
    loss.detach()
}
