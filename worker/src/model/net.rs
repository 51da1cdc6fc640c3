//! The network: stem, four stages of bottlenecks, classifier (the authors'
//! `AxialAttentionNet`, shared/reference/MODEL.md §1.6; the seed's and torchvision's `ResNet`).
//!
//! ```text
//! conv1 7x7/2 -> bn1 -> ReLU -> MaxPool 3x3/2 -> layer1..layer4 -> global AvgPool -> fc
//! ```

use std::sync::Arc;

use axial_common::ModelConfig;
use axial_common::job::SyncBn;
use tch::{Tensor, nn};

use super::attention::{AttentionMap, AxialAttention};
use super::batch_norm::{BatchNorm, SyncContext};
use super::block::{AxialBlock, Block, Bottleneck, Conv, conv};

#[derive(Debug)]
pub struct AxialResNet {
    config: ModelConfig,
    conv1: Conv,
    bn1: BatchNorm,
    layers: Vec<Vec<Block>>,
    fc: nn::Linear,
}

impl AxialResNet {
    /// Builds the network under `p` (parameter paths are the PyTorch names, see
    /// [`super::weights`]) with the reference's initialization. Seed the global RNG
    /// (`tch::manual_seed`) first for reproducible weights.
    pub fn new(p: &nn::Path, config: &ModelConfig) -> Self {
        let stem = config.stem_channels();
        let zero_init = config.zero_init_residual;
        let layers = config
            .stages()
            .iter()
            .enumerate()
            .map(|(i, blocks)| {
                let lp = p / format!("layer{}", i + 1);
                blocks
                    .iter()
                    .enumerate()
                    .map(|(b, g)| {
                        if g.attention {
                            Block::Axial(Box::new(AxialBlock::new(
                                &lp / b,
                                g,
                                config.variant,
                                config.heads,
                                zero_init,
                            )))
                        } else {
                            Block::Conv(Box::new(Bottleneck::new(
                                &lp / b,
                                g,
                                config.variant,
                                zero_init,
                            )))
                        }
                    })
                    .collect()
            })
            .collect();
        let features = config.feature_channels();
        // PyTorch's Linear default: U(±1/sqrt(fan_in)) for weight and bias.
        let bound = 1.0 / (features as f64).sqrt();
        let uniform = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Self {
            config: config.clone(),
            conv1: conv(p / "conv1", 3, stem, 7, 2), // padding 3
            bn1: BatchNorm::new(p / "bn1", stem, false),
            layers,
            fc: nn::linear(
                p / "fc",
                features,
                config.num_classes,
                nn::LinearConfig {
                    ws_init: uniform,
                    bs_init: Some(uniform),
                    bias: true,
                },
            ),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `[N, 3, H, W]` -> logits `[N, classes]`. `train` selects batch statistics (and updates
    /// the running ones) in every batch norm.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_inner(xs, train, None)
    }

    /// Like [`Self::forward_t`], also returning every attention layer's softmax weights
    /// (detached; see [`AttentionMap`]).
    pub fn forward_with_attention(&self, xs: &Tensor, train: bool) -> (Tensor, Vec<AttentionMap>) {
        let mut maps = Vec::new();
        let logits = self.forward_inner(xs, train, Some(&mut maps));
        (logits, maps)
    }

    fn forward_inner(
        &self,
        xs: &Tensor,
        train: bool,
        mut maps: Option<&mut Vec<AttentionMap>>,
    ) -> Tensor {
        let mut out = self.conv1.then_norm(&self.bn1, xs, train).relu(); // [N, 64s, H/2, W/2]
        out = out.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false); // [N, 64s, H/4, W/4]
        for stage in &self.layers {
            for block in stage {
                out = block.forward_t(&out, train, maps.as_deref_mut());
            }
        }
        out.adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .apply(&self.fc) // [N, classes]
    }

    /// Synchronizes batch statistics across the ranks of `ctx` (synchronized batch norm) for
    /// the attention layers' norms (`SyncBn::Attention`) or every norm (`SyncBn::All`);
    /// `SyncBn::None` or `ctx = None` makes every norm local again.
    pub fn set_sync_bn(&self, ctx: Option<Arc<SyncContext>>, mode: SyncBn) {
        let stem = std::iter::once((&self.bn1, false));
        let blocks = self.layers.iter().flatten().flat_map(Block::batch_norms);
        for (bn, in_attention) in stem.chain(blocks) {
            let on = match mode {
                SyncBn::None => false,
                SyncBn::Attention => in_attention,
                SyncBn::All => true,
            };
            bn.set_sync(if on { ctx.clone() } else { None });
        }
    }

    /// Every attention layer, in network order.
    pub fn attention_layers(&self) -> Vec<&AxialAttention> {
        self.layers
            .iter()
            .flatten()
            .flat_map(Block::attention_layers)
            .collect()
    }
}
