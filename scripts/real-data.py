#!/usr/bin/env python3
"""Writes a real, labelled image data set as class-sorted image folders, the way users store them.

    scripts/real-data.py digits OUT_DIR

`digits`: the 1,797 handwritten digits (8x8 greyscale scans, 16 grey levels, 10 classes, from
the UCI "Optical Recognition of Handwritten Digits" set) that scikit-learn ships inside its wheel.
The wheel comes from the Python package registry (`pip download`, cached in
${XDG_CACHE_HOME:-~/.cache}/axial/wheels); nothing else is fetched and nothing is installed.

Output: OUT_DIR/train/<class>/<id>.png and OUT_DIR/val/<class>/<id>.png, 8-bit greyscale PNGs;
every sixth sample (in the data set's own order) is held out for validation: 1,498 train and
299 val images. An image folder lists its samples class by class, so a loader that keeps runs
of neighbouring samples together sees one class at a time: the condition that real data sets
create and that synthetic data hides.

Idempotent: OUT_DIR/.complete marks a finished folder, and a second run does nothing.
Standard library only.
"""

import argparse
import gzip
import os
import pathlib
import struct
import subprocess
import sys
import zipfile
import zlib

SKLEARN = "scikit-learn==1.9.1"
DIGITS = "sklearn/datasets/data/digits.csv.gz"
HELD_OUT_EVERY = 6


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "axial" / "wheels"


def sklearn_wheel() -> pathlib.Path:
    """The scikit-learn wheel, downloaded once (any platform's wheel holds the same data)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("scikit_learn-1.9.1-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--only-binary=:all:", SKLEARN, "-d", str(cache)]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"real-data: `{' '.join(cmd)}` failed; is the Python package registry reachable?")
    found = sorted(cache.glob("scikit_learn-1.9.1-*.whl"))
    if not found:
        sys.exit(f"real-data: pip reported success but no scikit-learn wheel is in {cache}")
    return found[0]


def png_grey(width: int, height: int, pixels: bytes) -> bytes:
    """An 8-bit greyscale PNG (filter 0 on every row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def digits(out: pathlib.Path) -> None:
    with zipfile.ZipFile(sklearn_wheel()) as wheel:
        text = gzip.decompress(wheel.read(DIGITS)).decode()
    rows = [line.split(",") for line in text.splitlines() if line.strip()]
    if len(rows) != 1797 or any(len(r) != 65 for r in rows):
        sys.exit(f"real-data: {DIGITS} does not hold 1797 rows of 64 pixels + label")
    counts = {"train": 0, "val": 0}
    for i, row in enumerate(rows):
        values = [int(v) for v in row]
        label, grey = values[64], bytes(v * 255 // 16 for v in values[:64])
        split = "val" if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(png_grey(8, 8, grey))
        counts[split] += 1
    print(f"real-data: digits -> {out} ({counts['train']} train, {counts['val']} val, 10 classes)",
          file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["digits"])
    parser.add_argument("out", type=pathlib.Path)
    args = parser.parse_args()
    done = args.out / ".complete"
    if done.exists():
        return
    tmp = args.out.with_name(args.out.name + ".partial")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    digits(tmp)
    (tmp / ".complete").write_text(SKLEARN + "\n")
    if args.out.exists():
        import shutil
        shutil.rmtree(args.out)
    tmp.rename(args.out)


if __name__ == "__main__":
    main()
