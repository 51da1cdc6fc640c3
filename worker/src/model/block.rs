//! Residual blocks: the axial bottleneck (official and seed layouts) and the plain conv
//! bottleneck of the ResNet baseline and of the seed's non-attention stages.

use axial_common::model::{BlockGeometry, Variant};
use tch::{Tensor, nn};

use super::attention::{AttentionConfig, AttentionMap, AxialAttention, Axis, Convention};
use super::batch_norm::BatchNorm;

/// Conv weight init of both references: kaiming normal, fan_out, ReLU gain.
pub(crate) fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> nn::Conv2D {
    let fan_out = (cout * k * k) as f64;
    nn::conv2d(
        p,
        cin,
        cout,
        k,
        nn::ConvConfig {
            stride,
            padding: k / 2,
            bias: false,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_out).sqrt(),
            },
            ..Default::default()
        },
    )
}

/// The shortcut `downsample = [conv1x1(stride), BN]`.
#[derive(Debug)]
pub struct Downsample {
    conv: nn::Conv2D,
    bn: BatchNorm,
}

impl Downsample {
    fn new(p: nn::Path, g: &BlockGeometry) -> Self {
        Self {
            conv: conv(&p / 0, g.in_channels, g.out_channels, 1, g.stride),
            bn: BatchNorm::new(&p / 1, g.out_channels, false),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&xs.apply(&self.conv), train)
    }
}

/// Axial bottleneck.
///
/// ```text
/// official: conv_down 1x1 -> bn1 -> ReLU -> height_block -> width_block (AvgPool stride) -> ReLU
///           -> conv_up 1x1 -> bn2 (+ shortcut) -> ReLU          expansion 2
/// seed:     conv1 1x1 (stride) -> bn1 -> ReLU -> height_block -> width_block -> ReLU
///           -> conv3 1x1 -> bn3 (+ shortcut) -> ReLU            expansion 4
/// ```
#[derive(Debug)]
pub struct AxialBlock {
    conv_in: nn::Conv2D,
    bn_in: BatchNorm,
    height_block: AxialAttention,
    width_block: AxialAttention,
    conv_out: nn::Conv2D,
    bn_out: BatchNorm,
    downsample: Option<Downsample>,
}

impl AxialBlock {
    pub fn new(
        p: nn::Path,
        g: &BlockGeometry,
        variant: Variant,
        heads: i64,
        zero_init: bool,
    ) -> Self {
        let (names, convention, conv_stride, attn_stride) = match variant {
            Variant::Official => (
                ["conv_down", "bn1", "conv_up", "bn2"],
                Convention::Official,
                1,
                g.stride,
            ),
            // Variant::Resnet never has attention; it shares the seed's names if asked.
            Variant::Seed | Variant::Resnet => (
                ["conv1", "bn1", "conv3", "bn3"],
                Convention::Seed,
                g.stride,
                1,
            ),
        };
        let attention = |name: &str, axis, span, stride| {
            AxialAttention::new(
                &p / name,
                AttentionConfig {
                    in_planes: g.planes,
                    out_planes: g.planes,
                    heads,
                    span,
                    axis,
                    stride,
                    convention,
                    output_bn: convention == Convention::Official,
                },
            )
        };
        Self {
            conv_in: conv(&p / names[0], g.in_channels, g.planes, 1, conv_stride),
            bn_in: BatchNorm::new(&p / names[1], g.planes, false),
            height_block: attention("height_block", Axis::Height, g.span.0, 1),
            width_block: attention("width_block", Axis::Width, g.span.1, attn_stride),
            conv_out: conv(&p / names[2], g.planes, g.out_channels, 1, 1),
            bn_out: BatchNorm::new(&p / names[3], g.out_channels, zero_init),
            downsample: g
                .has_downsample
                .then(|| Downsample::new(&p / "downsample", g)),
        }
    }

    fn forward_t(
        &self,
        xs: &Tensor,
        train: bool,
        mut maps: Option<&mut Vec<AttentionMap>>,
    ) -> Tensor {
        let out = self.bn_in.forward_t(&xs.apply(&self.conv_in), train).relu(); // [N, planes, H, W]
        let out = self
            .height_block
            .forward_t(&out, train, maps.as_deref_mut());
        let out = self.width_block.forward_t(&out, train, maps).relu(); // [N, planes, H/s, W/s]
        let out = self.bn_out.forward_t(&out.apply(&self.conv_out), train); // [N, out, H/s, W/s]
        let identity = match &self.downsample {
            Some(d) => d.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// Conv bottleneck `conv1 1x1 -> bn1 -> conv2 3x3 -> bn2 -> conv3 1x1 -> bn3`, expansion 4.
/// The ResNet baseline strides in the 3x3 (v1.5); the seed strides in conv1, as its checkpoints
/// were trained.
#[derive(Debug)]
pub struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: BatchNorm,
    conv2: nn::Conv2D,
    bn2: BatchNorm,
    conv3: nn::Conv2D,
    bn3: BatchNorm,
    downsample: Option<Downsample>,
}

impl Bottleneck {
    pub fn new(p: nn::Path, g: &BlockGeometry, variant: Variant, zero_init: bool) -> Self {
        let (s1, s2) = match variant {
            Variant::Seed => (g.stride, 1),
            Variant::Official | Variant::Resnet => (1, g.stride),
        };
        Self {
            conv1: conv(&p / "conv1", g.in_channels, g.planes, 1, s1),
            bn1: BatchNorm::new(&p / "bn1", g.planes, false),
            conv2: conv(&p / "conv2", g.planes, g.planes, 3, s2),
            bn2: BatchNorm::new(&p / "bn2", g.planes, false),
            conv3: conv(&p / "conv3", g.planes, g.out_channels, 1, 1),
            bn3: BatchNorm::new(&p / "bn3", g.out_channels, zero_init),
            downsample: g
                .has_downsample
                .then(|| Downsample::new(&p / "downsample", g)),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let out = self.bn1.forward_t(&xs.apply(&self.conv1), train).relu();
        let out = self.bn2.forward_t(&out.apply(&self.conv2), train).relu();
        let out = self.bn3.forward_t(&out.apply(&self.conv3), train);
        let identity = match &self.downsample {
            Some(d) => d.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        (out + identity).relu()
    }
}

#[derive(Debug)]
pub enum Block {
    Axial(Box<AxialBlock>),
    Conv(Box<Bottleneck>),
}

impl Block {
    pub fn forward_t(
        &self,
        xs: &Tensor,
        train: bool,
        maps: Option<&mut Vec<AttentionMap>>,
    ) -> Tensor {
        match self {
            Block::Axial(b) => b.forward_t(xs, train, maps),
            Block::Conv(b) => b.forward_t(xs, train),
        }
    }

    /// Every batch norm of the block, with whether it belongs to an attention layer.
    pub fn batch_norms(&self) -> Vec<(&BatchNorm, bool)> {
        let mut v = Vec::new();
        match self {
            Block::Axial(b) => {
                v.push((&b.bn_in, false));
                for layer in [&b.height_block, &b.width_block] {
                    v.extend(layer.batch_norms().into_iter().map(|bn| (bn, true)));
                }
                v.push((&b.bn_out, false));
                v.extend(b.downsample.as_ref().map(|d| (&d.bn, false)));
            }
            Block::Conv(b) => {
                v.extend([(&b.bn1, false), (&b.bn2, false), (&b.bn3, false)]);
                v.extend(b.downsample.as_ref().map(|d| (&d.bn, false)));
            }
        }
        v
    }

    /// The attention layers of this block (none for a conv block).
    pub fn attention_layers(&self) -> Vec<&AxialAttention> {
        match self {
            Block::Axial(b) => vec![&b.height_block, &b.width_block],
            Block::Conv(_) => Vec::new(),
        }
    }
}
