//! Residual blocks: the axial bottleneck (official and seed layouts) and the plain conv
//! bottleneck of the ResNet baseline and of the seed's non-attention stages.

use axial_common::model::{BlockGeometry, Variant};
use tch::{Tensor, nn};

use super::attention::{AttentionConfig, AttentionMap, AxialAttention, Axis, Convention};
use super::batch_norm::BatchNorm;

/// A bias-free 2-D convolution with zero padding `k / 2`, as both references build theirs.
#[derive(Debug)]
pub(crate) struct Conv {
    weight: Tensor,
    stride: i64,
    padding: i64,
}

/// Conv weight init of both references: kaiming normal, fan_out, ReLU gain.
pub(crate) fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> Conv {
    let fan_out = (cout * k * k) as f64;
    let init = nn::Init::Randn {
        mean: 0.0,
        stdev: (2.0 / fan_out).sqrt(),
    };
    Conv {
        weight: p.var("weight", &[cout, cin, k, k], init),
        stride,
        padding: k / 2,
    }
}

impl Conv {
    /// `bn(conv(xs))`. In eval the norm is folded into this convolution's weight and a bias
    /// ([`BatchNorm::fold`]); in training (batch statistics) the two run one after the other.
    pub(crate) fn then_norm(&self, bn: &BatchNorm, xs: &Tensor, train: bool) -> Tensor {
        if train {
            return bn.forward_t(&self.apply(xs, &self.weight, None), true);
        }
        let (weight, bias) = bn.fold(&self.weight);
        self.apply(xs, &weight, Some(&bias))
    }

    fn apply(&self, xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (s, p) = (self.stride, self.padding);
        xs.conv2d(weight, bias, [s, s], [p, p], [1, 1], 1)
    }
}

/// The shortcut `downsample = [conv1x1(stride), BN]`.
#[derive(Debug)]
pub struct Downsample {
    conv: Conv,
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
        self.conv.then_norm(&self.bn, xs, train)
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
    conv_in: Conv,
    bn_in: BatchNorm,
    height_block: AxialAttention,
    width_block: AxialAttention,
    conv_out: Conv,
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
        let out = self.conv_in.then_norm(&self.bn_in, xs, train).relu(); // [N, planes, H, W]
        let out = self
            .height_block
            .forward_t(&out, train, maps.as_deref_mut());
        let out = self.width_block.forward_t(&out, train, maps).relu(); // [N, planes, H/s, W/s]
        let out = self.conv_out.then_norm(&self.bn_out, &out, train); // [N, out, H/s, W/s]
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
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Conv,
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
        let out = self.conv1.then_norm(&self.bn1, xs, train).relu();
        let out = self.conv2.then_norm(&self.bn2, &out, train).relu();
        let out = self.conv3.then_norm(&self.bn3, &out, train);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Eval's norm folded into the convolution gives conv-then-norm's values (strided 3x3 with
    /// padding, and 1x1); training still normalizes with the batch statistics and counts them.
    #[test]
    fn eval_folds_the_norm_into_the_convolution_with_the_same_values() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let bn = BatchNorm::new(vs.root() / "bn", 6, false);
        tch::no_grad(|| {
            let set = |t: &Tensor, v: Tensor| {
                t.shallow_clone().copy_(&v);
            };
            set(&bn.weight, Tensor::randn([6], tch::kind::FLOAT_CPU));
            set(&bn.bias, Tensor::randn([6], tch::kind::FLOAT_CPU));
            set(&bn.running_mean, Tensor::randn([6], tch::kind::FLOAT_CPU));
            set(
                &bn.running_var,
                Tensor::rand([6], tch::kind::FLOAT_CPU) + 0.1,
            );
        });
        let x = Tensor::randn([2, 4, 9, 7], tch::kind::FLOAT_CPU);
        for (k, stride) in [(3, 2), (1, 1), (7, 2)] {
            let c = conv(vs.root() / format!("conv{k}"), 4, 6, k, stride);
            let unfolded = bn.forward_t(&c.apply(&x, &c.weight, None), false);
            let folded = c.then_norm(&bn, &x, false);
            assert_eq!(folded.size(), unfolded.size());
            let scale = unfolded.abs().max().double_value(&[]);
            let diff = (&folded - &unfolded).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5 * scale,
                "{k}x{k}/{stride}: folded differs by {diff:e} (scale {scale:e})"
            );
        }
        let c = conv(vs.root() / "train", 4, 6, 1, 1);
        let y = c.then_norm(&bn, &x, true);
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 1);
        let mean = y.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        let off = (mean - &bn.bias).abs().max().double_value(&[]);
        assert!(
            off < 1e-4,
            "training output not normalized with the batch statistics: {off:e}"
        );
    }
}
