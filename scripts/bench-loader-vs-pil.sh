#!/usr/bin/env bash
# axial's loader against the usual PyTorch pipeline (Pillow decode, RandomResizedCrop, flip,
# normalize, in DataLoader-style worker processes), on the same JPEGs, side by side: images/s
# per thread (axial) and per process (Pillow), and their ratio.
#
#   scripts/bench-loader-vs-pil.sh [IMAGES] [WORKERS]     # default: 512 images, 1,2 workers
#
# Pillow and numpy are installed from PyPI into their own venv under the cache
# (${XDG_CACHE_HOME:-~/.cache}/axial/pil-venv) the first time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGES="${1:-512}"
WORKERS="${2:-1,2}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/axial"
scripts/setup-libtorch.sh > /dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
LIBTORCH="$(readlink -f .libtorch)"
export LIBTORCH

VENV="$CACHE/pil-venv"
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import numpy, PIL' 2> /dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy Pillow
fi

DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT
AXIAL="$DIR/axial.txt"
cargo bench -p axial-worker --bench loader --locked -- --images "$IMAGES" --threads "$WORKERS" \
  --size 224 --dir "$DIR/images" | tee "$AXIAL"
echo
echo "| workers | axial images/s | Pillow images/s | axial per thread | Pillow per process | ratio |"
echo "|---|---|---|---|---|---|"
IFS=, read -ra counts <<< "$WORKERS"
for w in "${counts[@]}"; do
  ours=$(awk -F'|' -v w="$w" '$2+0 == w && $3 ~ /[0-9]/ {gsub(/ /, "", $3); print $3}' "$AXIAL")
  read -r _ _ _ pil < <("$VENV/bin/python" scripts/pytorch/loader_pil.py "$DIR/images" 224 "$w")
  awk -v w="$w" -v a="$ours" -v p="$pil" \
    'BEGIN { printf "| %d | %.1f | %.1f | %.1f | %.1f | %.2fx |\n", w, a, p, a / w, p / w, a / p }'
done
