#!/usr/bin/env bash
# Everything GPU-side, proved in one call on a machine with one GPU and a python3 with torch
# 2.11 but no Rust toolchain (the `device` machine of the tool library).
#
#   scripts/gpu-check.sh prepare          # here: release binaries and test executables into
#                                          # gpu-carry/ (stripped, < 64 MiB), with the fixture
#   scripts/gpu-check.sh run              # there: carry gpu-carry/, run this
#   scripts/gpu-check.sh dry-run          # prepare, then run here on the CPU: the GPU tests
#                                          # skip saying why, the benches run small on the CPU
#
# `run` does, in order (each part's output kept in gpu-carry/out/ and printed):
#   1. the GPU (nvidia-smi) and torch's view of it;
#   2. the GPU tests: NCCL world of one (all-reduce, broadcast, synchronized batch norm on
#      CUDA against plain batch norm, training steps), Gloo with CUDA tensors across two
#      processes, autocast that really computes in bf16/fp16, an fp16 run whose loss scale
#      moves, the CUDA-graph step against the uncaptured one, and `train` in bf16 and fp16
#      on CUDA (and with cuda_graphs);
#   3. a two-rank `launch` on the one GPU over Gloo and a one-rank NCCL `launch`;
#   4. the train-step bench on CUDA: axial50s at 224 px, bf16 autocast, against the PyTorch
#      twin in eager AMP and torch.compile (channels-last for the twin), img/s, ratios, memory;
#      axial also with its step captured as a CUDA graph (`[train] cuda_graphs`).
# AXIAL_GPU_CHECK_QUICK=1 skips torch.compile (minutes to compile).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARRY=gpu-carry
MODE="${1:-}"

prepare() {
  scripts/setup-libtorch.sh > /dev/null
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/axial/target}"
  LIBTORCH="$(readlink -f .libtorch)"
  export LIBTORCH
  cargo build --release --locked --bins
  local tests
  tests=$(cargo test --release --locked --no-run --message-format=json \
      -p axial-worker --test collective --test gpu -p axial-e2e --test train 2> /dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
  local bench
  bench=$(cargo bench -p axial-worker --bench train_step --locked --no-run --message-format=json 2> /dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        print(m["executable"])')
  rm -rf "$CARRY"
  mkdir -p "$CARRY/release/deps" "$CARRY/fixtures"
  cp "$CARGO_TARGET_DIR/release/axial-worker" "$CARGO_TARGET_DIR/release/axial-coordinator" "$CARRY/release/"
  local t
  for t in $tests; do cp "$t" "$CARRY/release/deps/$(basename "$t" | sed 's/-[0-9a-f]*$//')"; done
  cp "$bench" "$CARRY/release/deps/train_step"
  strip --strip-debug "$CARRY"/release/axial-* "$CARRY"/release/deps/*
  cp ../shared/fixtures/axial26-quarter-official-32px.safetensors "$CARRY/fixtures/"
  du -sh "$CARRY"
  local kib
  kib=$(du -sk "$CARRY" | cut -f1)
  ((kib < 64 * 1024)) || { echo "gpu-check: $CARRY is $kib KiB, over the 64 MiB a carry may hold" >&2; exit 1; }
  ls -l "$CARRY/release" "$CARRY/release/deps"
}

run() {
  local dry="${1:-0}"
  [[ -x $CARRY/release/axial-worker ]] || { echo "gpu-check: no $CARRY/release/axial-worker (run prepare here first)" >&2; exit 1; }
  local py torch
  py=$(command -v python3)
  if [[ $dry == 1 ]]; then py="$(readlink -f .libtorch)/../../../../bin/python"; fi
  torch=$("$py" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
  [[ $dry == 1 ]] || ln -sfn "$torch" .libtorch
  export LD_LIBRARY_PATH="$torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local out=$CARRY/out
  mkdir -p "$out"
  part() { printf '\n== %s\n' "$*"; }

  part "1. the GPU"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "(no nvidia-smi)"
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'

  part "2. GPU tests"
  local failed=0 t
  for t in collective gpu train; do
    echo "-- $t"
    "$CARRY/release/deps/$t" gpu --test-threads 1 --nocapture 2>&1 | tee "$out/test-$t.log" | grep -E "^test |skipped|NCCL|logits|scale|test result" || true
    grep -q "test result: ok" "$out/test-$t.log" || { echo "FAILED: $t"; failed=1; }
  done

  part "3. launch on the GPU: two ranks over Gloo, one over NCCL"
  local device=cuda
  [[ $dry == 1 ]] && device=cpu
  local dir
  for backend in gloo nccl; do
    dir=$(mktemp -d)
    local workers=2
    [[ $backend == nccl ]] && workers=1
    cat > "$dir/job.toml" <<JOB
[model]
arch = "axial26s"
num_classes = 10
[data]
format = "builtin"
train = 512
val = 64
image_size = 32
[train]
epochs = 1
batch_size = 32
device = "$device"
log_every = 4
[checkpoint]
dir = "ckpt"
JOB
    if [[ $dry == 1 && $backend == nccl ]]; then
      echo "-- nccl: skipped (no GPU in a dry run)"
      continue
    fi
    echo "-- $backend, $workers worker(s) on $device"
    if (cd "$dir" && "$ROOT/$CARRY/release/axial-coordinator" launch --workers "$workers" \
        --backend "$backend" --worker-bin "$ROOT/$CARRY/release/axial-worker" job.toml > "$ROOT/$out/launch-$backend.log" 2>&1); then
      grep -E "rank [0-9] of|images/s|val_top1|committed" "$out/launch-$backend.log" | tail -n 6
      if [[ $workers == 2 ]]; then
        cmp "$dir/ckpt/replica-0.sha256" "$dir/ckpt/replica-1.sha256" && echo "replicas identical" || failed=1
      fi
    else
      echo "FAILED: launch over $backend"; tail -n 30 "$out/launch-$backend.log"; failed=1
    fi
  done

  part "4. train step: axial against the PyTorch twin"
  if [[ $dry == 1 ]]; then
    AXIAL_BENCH_BIN="$CARRY/release/deps/train_step" AXIAL_PYTHON="$py" \
      AXIAL_FIXTURE="$CARRY/fixtures/axial26-quarter-official-32px.safetensors" \
      AXIAL_BENCH_ITERS=3 AXIAL_BENCH_COMPILE=0 \
      scripts/bench-vs-pytorch.sh 1 32 | tee "$out/bench.md" || failed=1
  else
    AXIAL_BENCH_BIN="$CARRY/release/deps/train_step" AXIAL_PYTHON="$py" \
      AXIAL_FIXTURE="$CARRY/fixtures/axial26-quarter-official-32px.safetensors" \
      AXIAL_BENCH_ARCH=axial50s AXIAL_BENCH_BATCH=64 AXIAL_BENCH_THREADS=8 AXIAL_BENCH_ITERS=20 \
      AXIAL_BENCH_DEVICE=cuda AXIAL_BENCH_AMP=bf16 AXIAL_BENCH_PT_CHANNELS_LAST=1 AXIAL_BENCH_CUDA_GRAPHS=1 \
      AXIAL_BENCH_COMPILE=$([[ ${AXIAL_GPU_CHECK_QUICK:-0} == 1 ]] && echo 0 || echo 1) \
      scripts/bench-vs-pytorch.sh 2 224 | tee "$out/bench.md" || failed=1
  fi
  [[ -n ${OUT:-} ]] && cp -r "$out" "$OUT/" 2> /dev/null
  if [[ $failed == 1 ]]; then echo "gpu-check: FAILED (see above)"; exit 1; fi
  echo "gpu-check: all parts passed"
}

case "$MODE" in
  prepare) prepare ;;
  run) run 0 ;;
  # Not `prepare && run`: errors inside the left side of && do not stop a set -e script.
  dry-run)
    prepare
    run 1
    ;;
  *) echo "usage: scripts/gpu-check.sh prepare|run|dry-run" >&2; exit 2 ;;
esac
