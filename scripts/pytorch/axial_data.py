"""axial's data pipeline in Python, for the PyTorch twin's train.py (no PIL, no numpy).

Each piece mirrors a Rust file, so that the twin sees the same samples, in the same order, with
the same augmentation draws and the same float32 pixels as `axial-worker train`:

- `Rng`: common/src/rng.rs (SplitMix64; `Rng.derive(seed, keys)` streams).
- `epoch_sequence`, `StepPlan`: common/src/plan.rs. A random-access source such as an image
  folder gets a full permutation of its sample ids per epoch, from Rng.derive(seed,
  [0x5A4D_0011, epoch]); `shards1000=True`
  gives the order axial used before it mixed classes (virtual shards of 1000 consecutive samples
  permuted by (seed, epoch), samples within a shard by (seed, epoch, shard)). Steps of
  world x batch positions, the last one smaller.
- `ImageFolder`: worker/src/data/imagefolder.rs (class sub-folders sorted by name give the
  labels; files sorted by name; .png/.jpg/.jpeg by extension). Only PNG decodes here.
- `decode_png` / `encode_png`: 8-bit greyscale, greyscale+alpha, RGB, RGBA and palette PNGs,
  non-interlaced, via zlib; decoded to RGB the way the `image` crate's `to_rgb8` does
  (grey replicated, alpha dropped).
- `Transform`: worker/src/data/augment.rs (RandomResizedCrop with torchvision's sampling and the
  Rust port's per-sample RNG, horizontal flip, one bilinear resampling of the source rectangle
  with edge clamping and no antialiasing, normalization; eval: centred square of side
  shorter * eval_crop resampled to S x S). Same arithmetic in the same precision (f64
  coordinates, f32 blending, f64 normalization), so pixels are meant to be bit-identical.
- `make_batch`: worker/src/data/loader.rs (train draws from Rng.derive(seed, [epoch, index])).

Library only; see train.py.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import zlib

import torch

M64 = (1 << 64) - 1

# ---------------------------------------------------------------------------------------------
# common/src/rng.rs
# ---------------------------------------------------------------------------------------------


class Rng:
    """SplitMix64, as axial's `Rng` (whole state one u64)."""

    __slots__ = ("state",)

    def __init__(self, seed: int):
        self.state = seed & M64

    @classmethod
    def derive(cls, seed: int, keys) -> "Rng":
        s = cls(seed ^ 0x243F_6A88_85A3_08D3)
        for k in keys:
            s.state = s.next_u64() ^ ((k * 0x9E37_79B9_7F4A_7C15) & M64)
        return s

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E37_79B9_7F4A_7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & M64
        return z ^ (z >> 31)

    def next_f64(self) -> float:
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.next_f64()

    def below(self, n: int) -> int:
        return (self.next_u64() * n) >> 64

    def bernoulli(self, p: float) -> bool:
        return self.next_f64() < p

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


# ---------------------------------------------------------------------------------------------
# common/src/plan.rs
# ---------------------------------------------------------------------------------------------

SHARD_SIZE = 1000  # the earlier plan: samples per virtual shard of an image folder
PERMUTATION = 0x5A4D_0011  # stream key of a random-access source's permutation


def virtual_shards(total: int, shard_size: int = SHARD_SIZE):
    size = max(shard_size, 1)
    return [(i * size, min(size, total - i * size)) for i in range(-(-total // size))]


def epoch_sequence(total: int, seed: int, epoch: int, shards1000: bool = False) -> list:
    """The sample ids of one epoch in consumption order (`EpochPlan::new` for a random-access
    source: a full permutation). With `shards1000`, the earlier plan instead."""
    if not shards1000:
        ids = list(range(total))
        Rng.derive(seed, [PERMUTATION, epoch]).shuffle(ids)
        return ids
    shards = virtual_shards(total)
    order = list(range(len(shards)))
    Rng.derive(seed, [0x5A4D_0001, epoch]).shuffle(order)
    sequence = []
    for i in order:
        first, n = shards[i]
        ids = list(range(first, first + n))
        Rng.derive(seed, [0x5A4D_0002, epoch, i]).shuffle(ids)
        sequence.extend(ids)
    return sequence


class StepPlan:
    """How an epoch is cut into steps (`StepPlan`): steps of world x batch positions, the
    remainder one more, smaller step (or added to the last full step when smaller than the
    number of ranks)."""

    def __init__(self, base: int, world: int, batch: int, length: int):
        self.base, self.world, self.batch, self.len = base, world, batch, length

    def global_batch(self):
        return self.world * self.batch

    def steps(self) -> int:
        g = max(self.global_batch(), 1)
        remaining = max(self.len - self.base, 0)
        full, rem = divmod(remaining, g)
        if rem == 0:
            return full
        return full + 1 if rem >= self.world or full == 0 else full

    def span(self, step):
        steps = self.steps()
        if step >= steps:
            return self.len, self.len
        start = self.base + step * self.global_batch()
        end = self.len if step + 1 == steps else start + self.global_batch()
        return start, end

    def range(self, step, rank):
        start, end = self.span(step)
        n = end - start
        if n == self.global_batch():
            a = start + rank * self.batch
            return a, a + self.batch
        q, r = divmod(n, self.world)
        a = start + rank * q + min(rank, r)
        return a, a + q + (1 if rank < r else 0)

    def step_samples(self, step):
        start, end = self.span(step)
        return end - start

    def prefix_after(self, steps):
        return self.len if steps >= self.steps() else self.base + steps * self.global_batch()


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _unfilter(raw: bytes, width: int, height: int, bpp: int) -> bytearray:
    stride = width * bpp
    out = bytearray(stride * height)
    prev = bytearray(stride)
    pos = 0
    for y in range(height):
        ftype = raw[pos]
        line = bytearray(raw[pos + 1: pos + 1 + stride])
        pos += 1 + stride
        if ftype == 0:
            pass
        elif ftype == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif ftype == 3:  # Average
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:  # Paeth
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        else:
            raise ValueError(f"bad PNG filter type {ftype}")
        out[y * stride: (y + 1) * stride] = line
        prev = line
    return out


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 RGB tensor [H, W, 3] (8-bit, non-interlaced)."""
    if data[:8] != _PNG_SIG:
        raise ValueError("not a PNG file")
    pos, idat, palette, ihdr = 8, [], None, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        kind = data[pos + 4: pos + 8]
        body = data[pos + 8: pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if ihdr is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, ctype, _, _, interlace = ihdr
    if depth != 8 or ctype not in _CHANNELS or interlace != 0:
        raise ValueError(f"unsupported PNG (bit depth {depth}, colour type {ctype}, "
                         f"interlace {interlace}); the twin reads 8-bit non-interlaced PNGs")
    if width == 0 or height == 0:
        raise ValueError("image has no pixels")
    ch = _CHANNELS[ctype]
    pixels = _unfilter(zlib.decompress(b"".join(idat)), width, height, ch)
    t = torch.frombuffer(pixels, dtype=torch.uint8).view(height, width, ch)
    if ctype == 3:
        if palette is None:
            raise ValueError("palette PNG without PLTE")
        pal = torch.frombuffer(bytearray(palette), dtype=torch.uint8).view(-1, 3)
        return pal[t[..., 0].long()].contiguous()
    if ch in (1, 2):  # grey (+ alpha): grey replicated, alpha dropped
        return t[..., :1].expand(height, width, 3).contiguous()
    return t[..., :3].contiguous()  # RGB(A): alpha dropped


def encode_png(rgb: torch.Tensor) -> bytes:
    """uint8 [H, W, 3] (or [H, W] greyscale) -> PNG bytes (filter 0 on every row)."""
    rgb = rgb.contiguous().to(torch.uint8)
    grey = rgb.dim() == 2
    height, width = rgb.shape[:2]
    raw = bytes(rgb.flatten().tolist())
    stride = width * (1 if grey else 3)
    rows = b"".join(b"\x00" + raw[y * stride: (y + 1) * stride] for y in range(height))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0 if grey else 2, 0, 0, 0)
    return (_PNG_SIG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 6))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# worker/src/data/imagefolder.rs
# ---------------------------------------------------------------------------------------------


def _sorted_entries(path):
    # Rust sorts PathBufs: component-wise, by bytes.
    return sorted((os.path.join(path, e) for e in os.listdir(path)), key=os.fsencode)


class ImageFolder:
    """ROOT/<class>/<image>: class index = position of the sub-folder in name order; samples in
    (class, file name) order. Decoded images are cached in memory."""

    def __init__(self, root: str, cache: bool = True):
        self.root = root
        self.classes, self.files = [], []
        for d in _sorted_entries(root):
            if not os.path.isdir(d):
                continue
            label = len(self.classes)
            self.classes.append(os.path.basename(d))
            for f in _sorted_entries(d):
                if os.path.splitext(f)[1].lower() in (".png", ".jpg", ".jpeg"):
                    self.files.append((f, label))
        if not self.classes:
            raise ValueError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>.png)")
        if not self.files:
            raise ValueError(f"{root}: the class folders hold no .jpg, .jpeg or .png files")
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.files)

    def num_classes(self):
        return len(self.classes)

    def get(self, index: int):
        """(uint8 RGB [H, W, 3], label)."""
        path, label = self.files[index]
        if self.cache is not None and index in self.cache:
            return self.cache[index], label
        with open(path, "rb") as f:
            data = f.read()
        if data[:8] != _PNG_SIG:
            raise ValueError(f"{path}: not a PNG (the twin decodes PNG only; axial also reads "
                             "JPEG, which the twin cannot reproduce without a JPEG decoder)")
        img = decode_png(data)
        if self.cache is not None:
            self.cache[index] = img
        return img, label


# ---------------------------------------------------------------------------------------------
# worker/src/data/augment.rs
# ---------------------------------------------------------------------------------------------


def _round(x: float) -> float:
    """Rust's f64::round for x >= 0 (half away from zero)."""
    f = math.floor(x)
    return f + 1.0 if x - f >= 0.5 else f


def random_resized_crop(width, height, scale, ratio, rng: Rng):
    """torchvision's RandomResizedCrop.get_params with axial's RNG: (x, y, w, h)."""
    w, h = float(width), float(height)
    area = w * h
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lr0, lr1))
        cw = _round(math.sqrt(target * aspect))
        ch = _round(math.sqrt(target / aspect))
        if 0.0 < cw <= w and 0.0 < ch <= h:
            y = float(rng.below(int(h - ch) + 1))
            x = float(rng.below(int(w - cw) + 1))
            return x, y, cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, _round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = _round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return math.floor((w - cw) / 2.0), math.floor((h - ch) / 2.0), cw, ch


class Transform:
    """Training and evaluation transforms to normalized float32 [3, S, S]."""

    def __init__(self, size: int, augment: dict):
        self.size = size
        self.crop_scale = augment["crop_scale"]
        self.crop_ratio = augment["crop_ratio"]
        self.hflip = augment["hflip"]
        self.mean = torch.tensor(augment["mean"], dtype=torch.float64).view(3, 1, 1)
        self.inv_std = torch.tensor([1.0 / s for s in augment["std"]],
                                    dtype=torch.float64).view(3, 1, 1)
        self.eval_crop = augment["eval_crop"]

    def train(self, img: torch.Tensor, rng: Rng) -> torch.Tensor:
        h, w = img.shape[:2]
        rect = random_resized_crop(w, h, self.crop_scale, self.crop_ratio, rng)
        flip = self.hflip and rng.bernoulli(0.5)
        return self.resample(img, rect, flip)

    def eval(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[:2]
        side = float(min(w, h)) * self.eval_crop
        return self.resample(img, ((w - side) / 2.0, (h - side) / 2.0, side, side), False)

    @staticmethod
    def _coords(n, start, extent, limit):
        lo, hi, frac = [], [], []
        for o in range(n):
            src = start + (o + 0.5) * extent / n - 0.5
            src = min(max(src, 0.0), float(limit - 1))
            i = math.floor(src)
            lo.append(i)
            hi.append(min(i + 1, limit - 1))
            frac.append(src - i)
        return (torch.tensor(lo), torch.tensor(hi),
                torch.tensor(frac, dtype=torch.float64).to(torch.float32))

    def resample(self, img: torch.Tensor, rect, flip: bool) -> torch.Tensor:
        s = self.size
        h, w = img.shape[:2]
        x, y, rw, rh = rect
        x0, x1, fx = self._coords(s, x, rw, w)
        y0, y1, fy = self._coords(s, y, rh, h)
        if flip:
            x0, x1, fx = x0.flip(0), x1.flip(0), fx.flip(0)
        p = img.permute(2, 0, 1).to(torch.float32)  # [3, H, W]
        rows0, rows1 = p[:, y0, :], p[:, y1, :]  # [3, S, W]
        fx, fy = fx.view(1, 1, s), fy.view(1, s, 1)
        top = rows0[:, :, x0] * (1.0 - fx) + rows0[:, :, x1] * fx  # f32, as the Rust loop
        bottom = rows1[:, :, x0] * (1.0 - fx) + rows1[:, :, x1] * fx
        v = (top * (1.0 - fy) + bottom * fy) / 255.0
        return ((v.to(torch.float64) - self.mean) * self.inv_std).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# worker/src/data/loader.rs
# ---------------------------------------------------------------------------------------------


def make_batch(source: ImageFolder, transform: Transform, indices, train: bool, epoch: int,
               seed: int):
    """(images [n, 3, S, S], labels [n], used indices). A sample that cannot be read is
    skipped with a message, as axial's loader does."""
    images, labels, used = [], [], []
    for index in indices:
        try:
            img, label = source.get(index)
        except (OSError, ValueError, zlib.error) as e:
            print(f"skipped sample {index}: {e}", file=sys.stderr)
            continue
        if train:
            images.append(transform.train(img, Rng.derive(seed, [epoch, index])))
        else:
            images.append(transform.eval(img))
        labels.append(label)
        used.append(index)
    s = transform.size
    if not images:
        return torch.empty(0, 3, s, s), torch.empty(0, dtype=torch.int64), used
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), used
