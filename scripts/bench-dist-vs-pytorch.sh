#!/usr/bin/env bash
# Distributed training on this machine, axial against PyTorch DDP: 2 processes x 1 thread (Gloo
# on loopback, 8 images per process) and the scaling baseline, 1 process x 2 threads on the
# same global batch (16), axial26s at 32 and 64 px, alternating in rounds; ratios are the
# medians of each round's own ratios (one configuration's images/s moves 30% between rounds on
# this machine).
#
#   scripts/bench-dist-vs-pytorch.sh [ROUNDS] [SIZES]        # default: 5 rounds, sizes 32,64
#
# - axial: `cargo bench --bench train_dist` (the training loop's own step), the attention
#   norms synchronized (sync_bn = "attention", the default of every multi-worker job) and not;
# - PyTorch: the twin (scripts/pytorch/, checked against ../shared/fixtures first) under
#   DistributedDataParallel, without synchronized norms: PyTorch's SyncBatchNorm refuses CPU
#   tensors, so this is what PyTorch users get on CPUs (scripts/gpu-check.sh adds the GPU
#   comparison with SyncBatchNorm on the attention norms). Fair on both sides: SGD with
#   foreach=True and axial's allocator settings (glibc's mmap threshold 64 MiB, trim threshold
#   1 GiB) for the twin; its default settings (foreach off, glibc defaults) are printed too.
#
# Environment: AXIAL_BENCH_ITERS (20), AXIAL_BENCH_ARCH (axial26s), AXIAL_PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${1:-5}"
SIZES="${2:-32,64}"
ITERS="${AXIAL_BENCH_ITERS:-20}"
ARCH="${AXIAL_BENCH_ARCH:-axial26s}"

scripts/setup-libtorch.sh > /dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/axial/target}"
LIBTORCH="$(readlink -f .libtorch)"
export LIBTORCH
cargo bench -p axial-worker --bench train_dist --locked --no-run 2> /dev/null
BENCH=$(find "$CARGO_TARGET_DIR/release/deps" -maxdepth 1 -type f -executable -name 'train_dist-*' -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2)
[[ -x $BENCH ]] || { echo "bench-dist-vs-pytorch: no train_dist bench binary" >&2; exit 1; }
PY="${AXIAL_PYTHON:-$(readlink -f .libtorch)/../../../../bin/python}"
export PYTHONWARNINGS=ignore

echo "== the PyTorch twin against the reference fixtures" >&2
"$PY" scripts/pytorch/check_fixtures.py > /dev/null \
  || { echo "bench-dist-vs-pytorch: the twin does not reproduce the fixtures; no comparison" >&2; exit 1; }

# axial: images/s and sync ms/step for one size ($1), world ($2), threads ($3), batch ($4),
# sync_bn ($5).
axial() {
  "$BENCH" --arch "$ARCH" --sizes "$1" --world "$2" --threads "$3" --batch "$4" --sync-bn "$5" \
    --iters "$ITERS" | awk -F'|' '/^\| [0-9]+x[0-9]+ /{ gsub(/ /, ""); print $4, $6 }'
}
# PyTorch: images/s for one size ($1), world ($2), threads ($3), batch ($4), settings ($5:
# fair or default).
pytorch() {
  local env=() foreach=1
  if [[ $5 == fair ]]; then
    env=(MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=1073741824)
  else
    foreach=0
  fi
  local out try
  # (PyTorch's Gloo teardown sometimes aborts a process at exit: one more try.)
  for try in 1 2; do
    if out=$(env "${env[@]}" "$PY" scripts/pytorch/bench_dist.py --arch "$ARCH" --size "$1" \
      --world "$2" --threads "$3" --batch "$4" --iters "$ITERS" --foreach "$foreach" 2> /dev/null); then
      "$PY" -c 'import json,sys; print("%.2f" % json.loads(sys.stdin.read())["images_per_s"])' <<< "$out"
      return
    fi
    echo "bench-dist-vs-pytorch: the PyTorch run failed (try $try)" >&2
  done
  exit 1
}

configs=(axial_sync axial_none axial_1x2 torch_ddp torch_1x2 torch_ddp_default)
declare -A ips sync
IFS=, read -r -a sizes <<< "$SIZES"
for ((r = 1; r <= ROUNDS; r++)); do
  for size in "${sizes[@]}"; do
    for c in "${configs[@]}"; do
      case $c in
        axial_sync) read -r v s <<< "$(axial "$size" 2 1 8 attention)"; sync[$r,$size]=$s ;;
        axial_none) read -r v _ <<< "$(axial "$size" 2 1 8 none)" ;;
        axial_1x2) read -r v _ <<< "$(axial "$size" 1 2 16 none)" ;;
        torch_ddp) v=$(pytorch "$size" 2 1 8 fair) ;;
        torch_1x2) v=$(pytorch "$size" 1 2 16 fair) ;;
        torch_ddp_default) v=$(pytorch "$size" 2 1 8 default) ;;
      esac
      ips[$r,$size,$c]=$v
    done
    echo "round $r, ${size} px: $(for c in "${configs[@]}"; do printf '%s %s  ' "$c" "${ips[$r,$size,$c]}"; done)" >&2
  done
done

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", a / b }'; }

echo
echo "$ARCH, 2 processes x 1 thread (8 images each) and 1 process x 2 threads (16), Gloo on loopback, CPU; $ROUNDS rounds, medians"
echo
echo "| input | axial sync images/s | axial unsync | axial 1x2 | PyTorch DDP | PyTorch 1x2 | PyTorch DDP default | axial sync / PyTorch DDP | axial sync / axial unsync | axial scaling (sync / 1x2) | PyTorch scaling | axial sync / PyTorch DDP default | sync ms/step |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for size in "${sizes[@]}"; do
  col() { for ((r = 1; r <= ROUNDS; r++)); do echo "${ips[$r,$size,$1]}"; done | median; }
  rat() { for ((r = 1; r <= ROUNDS; r++)); do ratio "${ips[$r,$size,$1]}" "${ips[$r,$size,$2]}"; done | median; }
  s=$(for ((r = 1; r <= ROUNDS; r++)); do echo "${sync[$r,$size]}"; done | median)
  echo "| ${size}x${size} | $(col axial_sync) | $(col axial_none) | $(col axial_1x2) | $(col torch_ddp) | $(col torch_1x2) | $(col torch_ddp_default) | $(rat axial_sync torch_ddp) | $(rat axial_sync axial_none) | $(rat axial_sync axial_1x2) | $(rat torch_ddp torch_1x2) | $(rat axial_sync torch_ddp_default) | $s |"
done
