//! The Axial-ResNet family on tch (Wang et al., "Axial-DeepLab", ECCV 2020; numerically the
//! authors' PyTorch re-implementation, github.com/csrhddlam/axial-deeplab `axialnet.py`).
//!
//! - [`attention::AxialAttention`]: position-sensitive axial attention along one axis, with
//!   the span decoupled from the input size (global when the axis fits the table, a masked
//!   local window when it does not).
//! - [`block::AxialBlock`] / [`block::Bottleneck`]: the residual blocks.
//! - [`net::AxialResNet`]: stem, four stages, classifier; built from a
//!   [`axial_common::ModelConfig`].
//! - [`weights`]: state dicts under the PyTorch names of each layout (`official`, `seed`,
//!   `resnet`), through one explicit name table per layout.
//! - [`batch_norm::BatchNorm`]: PyTorch's batch norm, `num_batches_tracked` included.

pub mod attention;
pub mod attention_core;
pub mod batch_norm;
pub mod block;
pub mod net;
pub mod weights;

pub use attention::{AttentionMap, AxialAttention, Axis};
pub use net::AxialResNet;

use axial_common::ModelConfig;
use tch::{Device, nn};

/// A network and the variable store that owns its parameters and buffers.
#[derive(Debug)]
pub struct Model {
    pub vs: nn::VarStore,
    pub net: AxialResNet,
}

impl Model {
    /// Builds the network on `device`, initialized from `seed` (the reference's init).
    pub fn new(config: &ModelConfig, device: Device, seed: i64) -> Self {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(device);
        let net = AxialResNet::new(&vs.root(), config);
        Self { vs, net }
    }

    /// Number of trainable scalars (PyTorch's `sum(p.numel() for p in parameters())`).
    pub fn parameter_count(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }
}

/// Mean cross-entropy of `logits` `[N, classes]` against `labels` `[N]`, in the logits' own
/// precision (tch's `cross_entropy_for_logits` always computes in float32).
pub fn cross_entropy(logits: &tch::Tensor, labels: &tch::Tensor) -> tch::Tensor {
    logits.log_softmax(-1, logits.kind()).nll_loss(labels)
}
