"""The loader's work done the usual PyTorch way, for scripts/bench-loader-vs-pil.sh: Pillow decodes
each JPEG, a RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear, torchvision's sampling)
and a horizontal flip with probability 1/2, then a float tensor normalized with the ImageNet
mean and std, batched by 32. Worker processes, as a DataLoader's, one per core asked for.

    python loader_pil.py FOLDER SIZE PROCESSES

Prints one line: `processes images seconds images_per_second`.
"""

import math
import multiprocessing as mp
import os
import random
import sys
import time

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


def crop_box(width, height, rng):
    """torchvision's RandomResizedCrop.get_params: 10 tries, then the centre crop."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, width - w)
            y = rng.randint(0, height - h)
            return x, y, w, h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def load(path, size, rng):
    with Image.open(path) as img:
        img = img.convert("RGB")
        x, y, w, h = crop_box(img.width, img.height, rng)
        img = img.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        a = (np.asarray(img, dtype=np.float32) - MEAN) / STD
        return a.transpose(2, 0, 1)


def work(args):
    paths, size, seed = args
    rng = random.Random(seed)
    batch = []
    n = 0
    for p in paths:
        batch.append(load(p, size, rng))
        if len(batch) == 32:
            np.stack(batch)
            n += len(batch)
            batch = []
    if batch:
        np.stack(batch)
        n += len(batch)
    return n


def main():
    folder, size, processes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    paths = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(folder)
        for f in files
        if f.lower().endswith((".jpg", ".jpeg", ".png"))
    )
    chunks = [(paths[i::processes], size, i) for i in range(processes)]
    with mp.Pool(processes) as pool:
        pool.map(work, chunks)  # warm-up: page cache, imports
        start = time.perf_counter()
        n = sum(pool.map(work, chunks))
        seconds = time.perf_counter() - start
    print(f"{processes} {n} {seconds:.3f} {n / seconds:.1f}")


if __name__ == "__main__":
    main()
