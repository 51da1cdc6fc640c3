"""A PyTorch twin of axial's Axial-ResNets (shared/reference/MODEL.md §1-§3): the authors'
layout ("official"), the seed project's ("seed") and the conv ResNet baseline ("resnet").

The network of csrhddlam/axial-deeplab (`AxialAttentionNet`, bottleneck `AxialBlock` with
expansion 2, position-sensitive `AxialAttention`), written from the specification, with:

- parameter and buffer names equal to the reference `state_dict()` (`hight_block` [sic],
  `qkv_transform`, `bn_qkv`, `bn_similarity`, `bn_output`, `relative`, persistent int64
  `flatten_index`), so a reference state loads with `load_state_dict(strict=True)`;
- the geometry of the Rust port (`common/src/model.rs`, `ModelConfig::stages`): any image size,
  each attention layer's relative table sized for the axis length it sees at the configured size
  (global attention, K = L), or a fixed table K (`span = K`) with the Rust port's semantics for
  other lengths (L <= K: centre of the table; L > K: window |i - j| <= K - 1, masked after the
  similarity batch norm);
- the seed layout (MODEL.md §2, §3.2): ResNet widths, expansion 4, attention per stage, the
  stride in the first 1x1 conv, k-before-q order and the index sign j - i + K - 1, no
  `bn_output`, and the seed's names (`kqv_conv`, `kqv_bn`, `logits_bn`, `rel_encoding`,
  `distance_matrix`, `conv1`/`bn1`/`conv3`/`bn3`); the conv bottleneck (`conv1`..`bn3`, the
  stride in the 3x3 for "resnet", in conv1 for the seed's non-attention stages);
- the reference initialization (MODEL.md §1.4, official only), drawn in the order the Rust port creates its
  variables (`worker/src/model/{net,block,attention}.rs` with tch's `nn::Init`), from a
  `torch.manual_seed(seed)` generator: see `init_like_rust`.

Usage as a library:

    from axial_twin import ModelConfig, AxialAttentionNet, init_like_rust
    cfg = ModelConfig(layers=[1, 2, 4, 1], width=0.25, num_classes=10, image_size=32)
    net = AxialAttentionNet(cfg)
    init_like_rust(net, seed=0)

Also here: `read_safetensors` / `write_safetensors`, a dependency-free safetensors reader and
writer (stdlib + torch only).

    python axial_twin.py [--layers 1 2 4 1] [--width 0.25] [--image-size 32] [--classes 10]

prints the per-block geometry and the parameter count of a configuration.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Configuration and geometry (mirrors common/src/model.rs, official variant only)
# ---------------------------------------------------------------------------------------------

PRESETS = {
    # name: (variant, layers, width)
    "axial26s": ("official", [1, 2, 4, 1], 0.5),
    "axial50s": ("official", [3, 4, 6, 3], 0.5),
    "axial50m": ("official", [3, 4, 6, 3], 0.75),
    "axial50l": ("official", [3, 4, 6, 3], 1.0),
    "seed26": ("seed", [1, 2, 4, 1], 1.0),
    "seed38": ("seed", [2, 3, 5, 2], 1.0),
    "seed50": ("seed", [3, 4, 6, 3], 1.0),
    "resnet26": ("resnet", [1, 2, 4, 1], 1.0),
    "resnet50": ("resnet", [3, 4, 6, 3], 1.0),
}

EXPANSION = {"official": 2, "seed": 4, "resnet": 4}  # bottleneck out = expansion * planes


@dataclass(frozen=True)
class BlockGeometry:
    """One bottleneck block at the configured image size (Rust `BlockGeometry`)."""

    in_channels: int
    planes: int
    out_channels: int
    stride: int
    attention: bool
    attended: tuple  # (height, width) the two attention layers (or the 3x3 conv) see
    span: tuple  # relative-table sizes K of the height and the width layer
    has_downsample: bool


@dataclass
class ModelConfig:
    """The resolved `[model]` table (Rust `ModelConfig`)."""

    layers: list
    width: float = 1.0
    heads: int = 8
    num_classes: int = 1000
    image_size: tuple = (224, 224)  # (height, width); an int means a square
    span: object = "global"  # "global" or an int K
    zero_init_residual: bool | None = None  # default: official only
    arch: str | None = None
    variant: str = field(default="official")
    attention: list | None = None  # per stage; default: every stage but for "resnet"

    def __post_init__(self):
        if self.variant not in EXPANSION:
            raise ValueError(f"model.variant = {self.variant!r}: one of {', '.join(EXPANSION)}")
        if self.attention is None:
            self.attention = [self.variant != "resnet"] * 4
        self.attention = [bool(a) for a in self.attention]
        if self.zero_init_residual is None:
            self.zero_init_residual = self.variant == "official"
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(v) for v in self.image_size)
        self.layers = [int(n) for n in self.layers]
        self.validate()

    @classmethod
    def from_table(cls, table: dict, image_size=None) -> "ModelConfig":
        """Resolves a `[model]` TOML table onto its preset, as `ModelSpec::resolve` does."""
        known = {"arch", "variant", "layers", "width", "heads", "num_classes", "image_size",
                 "attention", "span", "zero_init_residual"}
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"[model]: unknown keys {sorted(unknown)}")
        preset = None
        if "arch" in table:
            if table["arch"] not in PRESETS:
                raise ValueError(f"model.arch = {table['arch']!r}: one of {', '.join(PRESETS)}")
            preset = PRESETS[table["arch"]]
        variant = table.get("variant", preset[0] if preset else "official")
        if "layers" in table:
            layers = table["layers"]
        elif preset:
            layers = preset[1]
        else:
            raise ValueError("[model]: arch or layers is required")
        if image_size is None:
            image_size = table.get("image_size", 224)
        return cls(
            layers=list(layers),
            width=float(table.get("width", preset[2] if preset else 1.0)),
            heads=int(table.get("heads", 8)),
            num_classes=int(table.get("num_classes", 1000)),
            image_size=image_size,
            span=table.get("span", "global"),
            zero_init_residual=table.get("zero_init_residual"),
            arch=table.get("arch"),
            variant=variant,
            attention=table.get("attention"),
        )

    def scaled(self, base: int) -> int:
        # Python's int(base * s): truncation, as the references (and the Rust port) compute it.
        return int(base * self.width)

    def stem_channels(self) -> int:
        return self.scaled(64)

    def planes(self, stage: int) -> int:
        base = 128 if self.variant == "official" else 64
        return self.scaled(base << stage)

    def expansion(self) -> int:
        return EXPANSION[self.variant]

    def feature_channels(self) -> int:
        return self.planes(3) * self.expansion()

    def stage_has_attention(self, stage: int) -> bool:
        return self.variant == "official" or (self.variant == "seed" and self.attention[stage])

    def table_len(self, length: int) -> int:
        return length if self.span == "global" else int(self.span)

    def stages(self) -> list:
        """Geometry of every block, stage by stage (Rust `ModelConfig::stages`)."""

        def conv_out(n):  # 7x7/2 pad 3, 3x3/2 pad 1, 1x1/2 pad 0
            return (n - 1) // 2 + 1

        size = (conv_out(conv_out(self.image_size[0])), conv_out(conv_out(self.image_size[1])))
        in_ch = self.stem_channels()
        stages = []
        for stage in range(4):
            planes = self.planes(stage)
            out_ch = planes * self.expansion()
            blocks = []
            for b in range(self.layers[stage]):
                stride = 2 if stage > 0 and b == 0 else 1
                if stride == 1:
                    attended = out = size
                elif self.variant == "official":
                    # Attention at the input resolution; AvgPool (floor) after the width layer.
                    attended, out = size, (size[0] // 2, size[1] // 2)
                elif self.variant == "seed":
                    # The stride in the first 1x1 conv: attention on the subsampled map.
                    attended = out = (conv_out(size[0]), conv_out(size[1]))
                else:
                    attended, out = size, (conv_out(size[0]), conv_out(size[1]))
                blocks.append(BlockGeometry(
                    in_channels=in_ch, planes=planes, out_channels=out_ch, stride=stride,
                    attention=self.stage_has_attention(stage), attended=attended,
                    span=(self.table_len(attended[0]), self.table_len(attended[1])),
                    has_downsample=stride != 1 or in_ch != out_ch))
                in_ch, size = out_ch, out
            stages.append(blocks)
        return stages

    def final_size(self) -> tuple:
        last = self.stages()[3][-1]
        if last.stride == 2 and self.variant == "official":
            return (last.attended[0] // 2, last.attended[1] // 2)
        if last.stride == 2 and self.variant == "resnet":
            return ((last.attended[0] - 1) // 2 + 1, (last.attended[1] - 1) // 2 + 1)
        return last.attended

    def validate(self):
        if len(self.layers) != 4 or not all(1 <= n <= 64 for n in self.layers):
            raise ValueError(f"model.layers = {self.layers}: 4 stages of 1..=64 blocks")
        if not (0 < self.width <= 16):
            raise ValueError(f"model.width = {self.width}: 0 < s <= 16")
        if self.stem_channels() < 1:
            raise ValueError(f"model.width = {self.width}: the stem would have no channels")
        if not (1 <= self.heads <= 256):
            raise ValueError(f"model.heads = {self.heads}: 1..=256")
        if self.span != "global" and not (isinstance(self.span, int) and 1 <= self.span <= 4096):
            raise ValueError(f"model.span = {self.span!r}: \"global\" or an integer 1..=4096")
        if len(self.attention) != 4:
            raise ValueError(f"model.attention = {self.attention}: exactly 4 booleans")
        if self.variant == "official" and self.attention != [True] * 4:
            raise ValueError("model.attention: the official variant has attention in every stage")
        if self.variant == "resnet" and self.attention != [False] * 4:
            raise ValueError("model.attention: the resnet baseline has no attention")
        for stage in range(4):
            if not self.stage_has_attention(stage):
                continue
            p = self.planes(stage)
            if p % self.heads or (p // self.heads) % 2:
                raise ValueError(f"model.heads = {self.heads}: stage {stage + 1} has {p} channels, "
                                 "which must split into heads of an even depth")
        if self.variant == "official":
            for stage, blocks in enumerate(self.stages()):
                for b in blocks:
                    if b.stride == 2 and (b.attended[0] % 2 or b.attended[1] % 2):
                        raise ValueError(f"model.image_size = {self.image_size}: stage {stage + 1} "
                                         f"halves a {b.attended[0]} x {b.attended[1]} map, which "
                                         "needs even sides")
        h, w = self.final_size()
        if h < 1 or w < 1:
            raise ValueError(f"model.image_size = {self.image_size}: too small")


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


def relative_index(length: int, span: int, seed: bool = False):
    """Table columns for every (query i, key j) pair, row-major: i - j + K - 1 (official) or
    j - i + K - 1 (seed), and whether each pair lies outside the window |i - j| <= K - 1 (those
    point at column 2K - 1, a zero column appended by the caller). For length == span this is
    `flatten_index` (official) or `distance_matrix` (seed)."""
    i = torch.arange(length).view(-1, 1)
    j = torch.arange(length).view(1, -1)
    offset = j - i if seed else i - j
    outside = offset.abs() > span - 1
    index = torch.where(outside, torch.full_like(offset, 2 * span - 1), offset + span - 1)
    return index.reshape(-1), outside


class QKVConv1d(nn.Conv1d):
    """Marker class for the qkv projection (excluded from the network's conv init)."""


# The layer's parts under each layout's names: qkv projection, its norm, the similarity norm,
# the relative table, the index buffer.
ATTENTION_NAMES = {
    False: ("qkv_transform", "bn_qkv", "bn_similarity", "relative", "flatten_index"),
    True: ("kqv_conv", "kqv_bn", "logits_bn", "rel_encoding", "distance_matrix"),
}


class AxialAttention(nn.Module):
    """Position-sensitive axial attention along one axis (MODEL.md §1.2). `kernel_size` is the
    table size K; the axis length L is read from the input at run time.

    `seed=True`: the seed project's layer (MODEL.md §2 #5, #6): each head's qkv channels are
    (k, q, v), the table is indexed with j - i + K - 1, there is no `bn_output`, and the parts
    carry the seed's names (ATTENTION_NAMES)."""

    def __init__(self, in_planes, out_planes, groups=8, kernel_size=56, stride=1, width=False,
                 seed=False):
        super().__init__()
        assert in_planes % groups == 0 and out_planes % groups == 0
        self.in_planes, self.out_planes = in_planes, out_planes
        self.groups = groups
        self.group_planes = out_planes // groups
        assert self.group_planes % 2 == 0
        self.kernel_size = kernel_size
        self.stride = stride
        self.width = width
        self.seed = seed
        qkv, bn_qkv, bn_sim, table, index = ATTENTION_NAMES[seed]
        self._names = ATTENTION_NAMES[seed]
        self.add_module(qkv, QKVConv1d(in_planes, out_planes * 2, kernel_size=1, bias=False))
        self.add_module(bn_qkv, nn.BatchNorm1d(out_planes * 2))
        self.add_module(bn_sim, nn.BatchNorm2d(groups * 3))
        self.bn_output = None if seed else nn.BatchNorm1d(out_planes * 2)
        self.register_parameter(
            table, nn.Parameter(torch.empty(self.group_planes * 2, kernel_size * 2 - 1)))
        self.register_buffer(index, relative_index(kernel_size, kernel_size, seed)[0])
        self._index_cache = {}
        self.reset_parameters()

    # The parts by role, whatever the layout calls them.
    def qkv_conv(self):
        return getattr(self, self._names[0])

    def qkv_norm(self):
        return getattr(self, self._names[1])

    def similarity_norm(self):
        return getattr(self, self._names[2])

    def relative_table(self):
        return getattr(self, self._names[3])

    def norms(self):
        return [n for n in (self.qkv_norm(), self.similarity_norm(), self.bn_output) if n is not None]

    def reset_parameters(self):
        # OFF reset_parameters: N(0, sqrt(1/Cin)) and N(0, sqrt(1/gp)).
        nn.init.normal_(self.qkv_conv().weight, 0.0, math.sqrt(1.0 / self.in_planes))
        nn.init.normal_(self.relative_table(), 0.0, math.sqrt(1.0 / self.group_planes))

    def _index_for(self, length, device):
        key = (length, device)
        if key not in self._index_cache:
            index, outside = relative_index(length, self.kernel_size, self.seed)
            self._index_cache[key] = (
                index.to(device),
                outside.to(device) if length > self.kernel_size else None,
            )
        return self._index_cache[key]

    def forward(self, x):
        n, _, h, w = x.shape
        g, c, gp = self.groups, self.out_planes, self.group_planes
        # Put the attended axis last, fold the other one into the batch.
        if self.width:
            x, other, length = x.permute(0, 2, 1, 3), h, w  # [N, H, Cin, W]
        else:
            x, other, length = x.permute(0, 3, 1, 2), w, h  # [N, W, Cin, H]
        b = n * other
        x = x.contiguous().view(b, self.in_planes, length)

        # qkv: [B, 2C, L] -> per head (q | k | v) (seed: k | q | v) of depths gp/2, gp/2, gp.
        qkv = self.qkv_norm()(self.qkv_conv()(x)).view(b, g, 2 * gp, length)
        first, second, v = torch.split(qkv, [gp // 2, gp // 2, gp], dim=2)
        q, k = (second, first) if self.seed else (first, second)

        # Relative embeddings E[c, i, j] = table[c, i - j + K - 1] (seed: j - i): [2gp, L, L].
        index, outside = self._index_for(length, x.device)
        table = self.relative_table()
        if outside is not None:
            table = torch.cat([table, torch.zeros_like(table[:, :1])], dim=1)
        emb = table.index_select(1, index).view(2 * gp, length, length)
        q_emb, k_emb, v_emb = torch.split(emb, [gp // 2, gp // 2, gp], dim=0)

        # Similarity terms [B, G, L, L]; BN per (term, head); sum over the three terms.
        qr = torch.einsum("bgci,cij->bgij", q, q_emb)
        kr = torch.einsum("bgci,cij->bgij", k, k_emb).transpose(2, 3)
        qk = torch.einsum("bgci,bgcj->bgij", q, k)
        stacked = torch.cat([qk, qr, kr], dim=1)  # [B, 3G, L, L]
        sim = self.similarity_norm()(stacked).view(b, 3, g, length, length).sum(dim=1)
        if outside is not None:
            sim = sim.masked_fill(outside, float("-inf"))
        sim = F.softmax(sim, dim=3)

        # Outputs: content and positional terms, interleaved per channel, BN (official), summed.
        sv = torch.einsum("bgij,bgcj->bgci", sim, v)
        sve = torch.einsum("bgij,cij->bgci", sim, v_emb)
        out = torch.cat([sv, sve], dim=-1).view(b, 2 * c, length)
        if self.bn_output is not None:
            out = self.bn_output(out)
        out = out.view(n, other, c, 2, length).sum(dim=3)
        out = out.permute(0, 2, 1, 3) if self.width else out.permute(0, 2, 3, 1)  # [N, C, H, W]
        if self.stride > 1:
            out = F.avg_pool2d(out, self.stride, self.stride)
        return out


def conv_bn(cin, cout, k, stride):
    """A bias-free conv with padding k // 2 and its batch norm, as (conv, bn)."""
    return (nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout))


class AxialBlock(nn.Module):
    """Axial bottleneck (MODEL.md §1.5): official, expansion 2, attention at the input
    resolution and AvgPool after the width layer; seed (§3.2), expansion 4, the stride in conv1
    and attention on the subsampled map."""

    def __init__(self, geometry: BlockGeometry, heads: int, seed: bool = False):
        super().__init__()
        gm = geometry
        width = gm.planes
        self.seed = seed
        names = ("conv1", "bn1", "conv3", "bn3") if seed else ("conv_down", "bn1", "conv_up", "bn2")
        self._names = names
        conv_in, bn_in = conv_bn(gm.in_channels, width, 1, gm.stride if seed else 1)
        conv_out, bn_out = conv_bn(width, gm.out_channels, 1, 1)
        self.add_module(names[0], conv_in)
        self.add_module(names[1], bn_in)
        setattr(self, "height_block" if seed else "hight_block",
                AxialAttention(width, width, groups=heads, kernel_size=gm.span[0], seed=seed))
        self.width_block = AxialAttention(width, width, groups=heads, kernel_size=gm.span[1],
                                          stride=1 if seed else gm.stride, width=True, seed=seed)
        self.add_module(names[2], conv_out)
        self.add_module(names[3], bn_out)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if gm.has_downsample:
            self.downsample = nn.Sequential(*conv_bn(gm.in_channels, gm.out_channels, 1,
                                                     gm.stride))

    def height(self):
        return getattr(self, "height_block" if self.seed else "hight_block")

    def last_norm(self):
        return getattr(self, self._names[3])

    def forward(self, x):
        conv_in, bn_in, conv_out, bn_out = (getattr(self, n) for n in self._names)
        out = self.relu(bn_in(conv_in(x)))
        out = self.height()(out)
        out = self.relu(self.width_block(out))
        out = bn_out(conv_out(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """Conv bottleneck conv1 1x1 -> bn1 -> conv2 3x3 -> bn2 -> conv3 1x1 -> bn3, expansion 4:
    the ResNet baseline strides in the 3x3 (v1.5), the seed's non-attention stages in conv1."""

    def __init__(self, geometry: BlockGeometry, seed: bool):
        super().__init__()
        gm = geometry
        s1, s2 = (gm.stride, 1) if seed else (1, gm.stride)
        self.conv1, self.bn1 = conv_bn(gm.in_channels, gm.planes, 1, s1)
        self.conv2, self.bn2 = conv_bn(gm.planes, gm.planes, 3, s2)
        self.conv3, self.bn3 = conv_bn(gm.planes, gm.out_channels, 1, 1)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if gm.has_downsample:
            self.downsample = nn.Sequential(*conv_bn(gm.in_channels, gm.out_channels, 1,
                                                     gm.stride))

    def last_norm(self):
        return self.bn3

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class AxialAttentionNet(nn.Module):
    """conv1 7x7/2 -> bn1 -> ReLU -> MaxPool 3x3/2 -> layer1..4 -> global AvgPool -> fc."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        stem = config.stem_channels()
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        seed = config.variant == "seed"
        for i, blocks in enumerate(config.stages()):
            layer = nn.Sequential(*[AxialBlock(g, config.heads, seed) if g.attention
                                    else Bottleneck(g, seed) for g in blocks])
            setattr(self, f"layer{i + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(config.feature_channels(), config.num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference's network init (MODEL.md §1.4), with torch's own RNG order. For the
        Rust port's draw order use `init_like_rust`."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv1d)) and not isinstance(m, QKVConv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if self.config.zero_init_residual:
            for blk in self.blocks():
                nn.init.constant_(blk.last_norm().weight, 0)

    def blocks(self):
        for i in range(4):
            yield from getattr(self, f"layer{i + 1}")

    def attention_layers(self):
        for blk in self.blocks():
            if isinstance(blk, AxialBlock):
                yield blk.height()
                yield blk.width_block

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Initialization in the Rust port's order
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def init_like_rust(net: AxialAttentionNet, seed: int) -> None:
    """Re-initializes every parameter and buffer as `Model::new(config, device, seed)` does.

    `tch::manual_seed(seed)`, then variables are created in this order, each drawn with tch's
    `nn::Init` (Randn: `randn(shape) * std + mean`; Uniform: `zeros(shape).uniform_(lo, up)`;
    Const: zeros/ones): every block of layer1..layer4 (conv_down, bn1, hight_block [qkv
    weight, relative], width_block [same], conv_up, bn2 (zero if zero_init_residual),
    downsample.0, downsample.1), then conv1, bn1, then fc (bias first, then weight, both
    U(±1/sqrt(fan_in))). Convs: N(0, sqrt(2 / (out * k * k))); qkv: N(0, sqrt(1/Cin));
    relative: N(0, sqrt(1/gp)). Same libtorch generator and same ops, so the values are meant to
    equal the Rust port's bit for bit (not verified against a Rust build here). Official layout
    only.
    """
    if net.config.variant != "official":
        raise NotImplementedError("init_like_rust: the official layout only")
    torch.manual_seed(seed)

    def randn_(t, std):
        t.copy_(torch.randn(t.shape, dtype=t.dtype) * std + 0.0)

    def uniform_(t, bound):
        t.copy_(torch.zeros(t.shape, dtype=t.dtype).uniform_(-bound, bound))

    def conv_(conv):
        cout, _, kh, kw = conv.weight.shape
        randn_(conv.weight, math.sqrt(2.0 / (cout * kh * kw)))

    def bn_(bn, zero=False):
        bn.weight.fill_(0.0 if zero else 1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.num_batches_tracked.zero_()

    def attention_(layer):
        randn_(layer.qkv_transform.weight, math.sqrt(1.0 / layer.in_planes))
        for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output):
            bn_(bn)
        randn_(layer.relative, math.sqrt(1.0 / layer.group_planes))

    for blk in net.blocks():
        conv_(blk.conv_down)
        bn_(blk.bn1)
        attention_(blk.hight_block)
        attention_(blk.width_block)
        conv_(blk.conv_up)
        bn_(blk.bn2, zero=net.config.zero_init_residual)
        if blk.downsample is not None:
            conv_(blk.downsample[0])
            bn_(blk.downsample[1])
    conv_(net.conv1)
    bn_(net.bn1)
    bound = 1.0 / math.sqrt(net.fc.in_features)
    uniform_(net.fc.bias, bound)
    uniform_(net.fc.weight, bound)


# ---------------------------------------------------------------------------------------------
# safetensors without the safetensors package
# ---------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path: str, header_only: bool = False):
    """Returns (tensors: dict name -> CPU tensor, metadata: dict). Format: u64 LE header length,
    JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then
    the raw little-endian bytes. `header_only`: no tensors, only the metadata."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {}) or {}
        if header_only:
            return {}, meta
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(data, dtype=dtype, count=(end - begin) // _itemsize(dtype),
                             offset=begin)
        out[name] = t.reshape(shape).clone()
    return out, meta


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Writes CPU tensors (in name order) as safetensors."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        raw = ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        chunks.append(raw)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for c in chunks:
            f.write(c)


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs=4, default=[1, 2, 4, 1])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args()
    cfg = ModelConfig(layers=args.layers, width=args.width, heads=args.heads,
                      num_classes=args.classes, image_size=args.image_size)
    for s, blocks in enumerate(cfg.stages()):
        for b, g in enumerate(blocks):
            print(f"layer{s + 1}.{b}: {g.in_channels}->{g.planes}->{g.out_channels} "
                  f"stride {g.stride} attends {g.attended[0]}x{g.attended[1]} "
                  f"span {g.span} downsample {g.has_downsample}")
    net = AxialAttentionNet(cfg)
    print(f"parameters: {parameter_count(net):,}")


if __name__ == "__main__":
    main()
