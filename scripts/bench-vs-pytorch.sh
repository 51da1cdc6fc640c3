#!/usr/bin/env bash
# axial's training step against the PyTorch twin of the same model (scripts/pytorch/, checked
# against ../shared/fixtures first), eager and torch.compile, side by side, alternating, in
# rounds: img/s of the train step (forward, cross-entropy, backward, SGD with Nesterov and
# weight decay) and of the eval forward, and each run's peak RSS. Every configuration runs in
# a process of its own (so its peak RSS is its own), at the same thread count.
#
#   scripts/bench-vs-pytorch.sh [ROUNDS] [SIZES]        # default: 5 rounds, sizes 32,64
#
# Environment: AXIAL_BENCH_ARCH (axial26s), AXIAL_BENCH_BATCH (16), AXIAL_BENCH_THREADS (2),
# AXIAL_BENCH_ITERS (30), AXIAL_BENCH_DEVICE (cpu), AXIAL_BENCH_AMP (none; bf16 or fp16 on
# CUDA), AXIAL_BENCH_COMPILE=0 to skip torch.compile (it compiles for minutes on 2 cores),
# AXIAL_BENCH_CUDA_GRAPHS=1: also axial with `--cuda-graphs true` (CUDA; extra rows),
# AXIAL_BENCH_PT_CHANNELS_LAST=1: the twin in channels-last (axial's tensors stay contiguous
# NCHW), AXIAL_FIXTURE: the fixture file the twin is checked against, AXIAL_BENCH_BIN: a prebuilt train_step bench binary (scripts/gpu-check.sh passes one; default:
# cargo builds it), AXIAL_PYTHON: the python with torch 2.11 (default: the venv of
# scripts/setup-libtorch.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${1:-5}"
SIZES="${2:-32,64}"
ARCH="${AXIAL_BENCH_ARCH:-axial26s}"
BATCH="${AXIAL_BENCH_BATCH:-16}"
THREADS="${AXIAL_BENCH_THREADS:-2}"
ITERS="${AXIAL_BENCH_ITERS:-30}"
DEVICE="${AXIAL_BENCH_DEVICE:-cpu}"
AMP="${AXIAL_BENCH_AMP:-none}"
COMPILE="${AXIAL_BENCH_COMPILE:-1}"

BENCH="${AXIAL_BENCH_BIN:-}"
if [[ -z $BENCH ]]; then
  scripts/setup-libtorch.sh > /dev/null
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/axial/target}"
  LIBTORCH="$(readlink -f .libtorch)"
  export LIBTORCH
  cargo bench -p axial-worker --bench train_step --locked --no-run 2> /dev/null
  BENCH=$(find "$CARGO_TARGET_DIR/release/deps" -maxdepth 1 -type f -executable -name 'train_step-*' -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2)
fi
[[ -x $BENCH ]] || { echo "bench-vs-pytorch: no train_step bench binary ($BENCH)" >&2; exit 1; }
PY="${AXIAL_PYTHON:-$(readlink -f .libtorch)/../../../../bin/python}"
[[ -x $PY ]] || PY=python3
export PYTHONWARNINGS=ignore

echo "== the PyTorch twin against the reference fixtures" >&2
fixture=()
[[ -n ${AXIAL_FIXTURE:-} ]] && fixture=("$AXIAL_FIXTURE")
"$PY" scripts/pytorch/check_fixtures.py "${fixture[@]}" > /dev/null \
  || { echo "bench-vs-pytorch: the twin does not reproduce the fixtures; no comparison" >&2; exit 1; }

# One axial run ($2: with CUDA graphs, true or false): "train_ips eval_ips rss_mb".
axial() {
  "$BENCH" --arch "$ARCH" --sizes "$1" --batch "$BATCH" --threads "$THREADS" --iters "$ITERS" \
    --device "$DEVICE" --amp "$AMP" --cuda-graphs "$2" | awk -F'|' '/^\| [0-9]+x[0-9]+ /{ gsub(/ /, ""); print $5, $6, $7 }'
}
# One PyTorch run (mode eager or compile): the same three numbers.
pytorch() {
  local amp=()
  [[ $AMP != none ]] && amp=(--amp "$AMP")
  [[ ${AXIAL_BENCH_PT_CHANNELS_LAST:-0} == 1 ]] && amp+=(--channels-last)
  "$PY" scripts/pytorch/bench.py --mode "$2" --arch "$ARCH" --size "$1" --batch "$BATCH" \
    --threads "$THREADS" --iters "$ITERS" --device "$DEVICE" "${amp[@]}" |
    "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%.1f %.1f %.0f" % (r["train_images_per_s"], r["eval_images_per_s"], r["peak_rss_mb"]))'
}

modes=(axial eager)
[[ $COMPILE == 1 ]] && modes+=(compile)
GRAPHS="${AXIAL_BENCH_CUDA_GRAPHS:-0}"
[[ $GRAPHS == 1 ]] && modes+=(graphs)
declare -A train eval rss
IFS=, read -r -a sizes <<< "$SIZES"
for ((r = 1; r <= ROUNDS; r++)); do
  for size in "${sizes[@]}"; do
    for mode in "${modes[@]}"; do
      case $mode in
        axial) out=$(axial "$size" false) ;;
        graphs) out=$(axial "$size" true) ;;
        *) out=$(pytorch "$size" "$mode") ;;
      esac
      read -r t e m <<< "$out"
      [[ -n ${m:-} ]] || { echo "bench-vs-pytorch: $mode at $size px gave no numbers" >&2; exit 1; }
      train[$size,$mode]+="$t "
      eval[$size,$mode]+="$e "
      rss[$size,$mode]+="$m "
      echo "round $r: $size px $mode: train $t img/s, eval $e img/s, peak RSS $m MB" >&2
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
# The median of the rounds' own ratios ($1, $2: one value per round, in round order): the two
# runs of a round ran back to back, so a slow spell of the machine divides out.
paired() {
  paste -d' ' <(tr ' ' '\n' <<< "$1" | grep -v '^$') <(tr ' ' '\n' <<< "$2" | grep -v '^$') |
    awk '{ printf "%.4f\n", $1 / $2 }' | median | awk '{ printf "%.2f", $1 }'
}
echo
echo "$ARCH, batch $BATCH, $THREADS threads, $DEVICE, amp $AMP; medians of $ROUNDS rounds (each a median of $ITERS steps); ratios: the median of the rounds' own ratios"
echo
echo "| input | what | axial | PyTorch eager | axial / eager | torch.compile | axial / compile |"
echo "|---|---|---|---|---|---|---|"
for size in "${sizes[@]}"; do
  for what in train eval rss; do
    declare -n table=$what
    a=$(median <<< "${table[$size,axial]}")
    e=$(median <<< "${table[$size,eager]}")
    if [[ $COMPILE == 1 ]]; then
      c=$(median <<< "${table[$size,compile]}")
      cr=$(paired "${table[$size,axial]}" "${table[$size,compile]}")
    else
      c=-; cr=-
    fi
    label=$([[ $what == rss ]] && echo "peak RSS MB" || echo "$what img/s")
    echo "| $size px | $label | $a | $e | $(paired "${table[$size,axial]}" "${table[$size,eager]}") | $c | $cr |"
    # The eval forward is never captured: graphs add train and memory rows.
    if [[ $GRAPHS == 1 && $what != eval ]]; then
      g=$(median <<< "${table[$size,graphs]}")
      [[ $COMPILE == 1 ]] && cr=$(paired "${table[$size,graphs]}" "${table[$size,compile]}")
      echo "| $size px | $label, CUDA graphs | $g | $e | $(paired "${table[$size,graphs]}" "${table[$size,eager]}") | $c | $cr |"
    fi
  done
done
