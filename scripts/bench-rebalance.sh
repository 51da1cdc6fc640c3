#!/usr/bin/env bash
# Stragglers: two workers, one held to half a core by a CPU quota (a cgroup), training the same
# job with and without `[train] rebalance`, alternately; prints the group's steps per second
# (global steps of the same global batch) once the split has settled, and what the coordinator
# decided.
#
#   scripts/bench-rebalance.sh [ROUNDS] [QUOTA_PERCENT]    # default: 1 round, 50 %
#
# Needs root (a cgroup, v1 `cpu` or v2 `cpu.max`) and 2 cores: the fast worker runs on core 0,
# the slow one on core 1 under the quota, one libtorch thread each.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${1:-1}"
QUOTA="${2:-50}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/axial"
scripts/setup-libtorch.sh > /dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
LIBTORCH="$(readlink -f .libtorch)"
export LIBTORCH
cargo build --release --locked --bins -q
BIN="$CARGO_TARGET_DIR/release"

# The slow worker's cgroup.
if [[ -d /sys/fs/cgroup/cpu && ! -f /sys/fs/cgroup/cgroup.controllers ]]; then
  CG=/sys/fs/cgroup/cpu/axial-slow-$$
  mkdir "$CG"
  echo 100000 > "$CG/cpu.cfs_period_us"
  echo $((QUOTA * 1000)) > "$CG/cpu.cfs_quota_us"
else
  CG=/sys/fs/cgroup/axial-slow-$$
  echo +cpu > /sys/fs/cgroup/cgroup.subtree_control 2> /dev/null || true
  mkdir "$CG"
  echo "$((QUOTA * 1000)) 100000" > "$CG/cpu.max"
fi
DIR="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rmdir "$CG" 2> /dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

STEPS=100     # one epoch: 100 steps of 2 x 64 samples
FROM=45       # steps per second measured from here to the end (the split settles by ~35)
job() { # $1: rebalance true|false
  cat > "$DIR/job-$1.toml" << EOF
[model]
arch = "axial26s"
width = 0.25
num_classes = 10
[data]
format = "builtin"
train = $((STEPS * 128))
val = 64
image_size = 32
loader_threads = 1
[train]
epochs = 1
batch_size = 64
threads = 1
log_every = 5
sync_bn = "all"
rebalance = $1
[checkpoint]
dir = "$DIR/ckpt-$1"
every_steps = 0
[eval]
every_epochs = 1
EOF
}

# One run: prints "steps/s shares straggler_ratio".
run() { # $1: rebalance true|false
  job "$1"
  rm -rf "$DIR/ckpt-$1"
  local port http token log
  port=$((20000 + RANDOM % 20000))
  http=$((port + 1))
  token="$DIR/token-$1"
  log="$DIR/run-$1.log"
  "$BIN/axial-coordinator" serve "$DIR/job-$1.toml" --workers 2 --token-file "$token" \
    --listen "127.0.0.1:$port" --http "127.0.0.1:$http" > "$log" 2>&1 &
  PIDS+=($!)
  local coordinator=$!
  for _ in $(seq 100); do [[ -s $token ]] && break; sleep 0.1; done
  taskset -c 0 "$BIN/axial-worker" join --coordinator "http://127.0.0.1:$port" \
    --token-file "$token" --host 127.0.0.1 >> "$log" 2>&1 &
  PIDS+=($!)
  sh -c "echo \$\$ > $CG/cgroup.procs; exec taskset -c 1 $BIN/axial-worker join \
    --coordinator http://127.0.0.1:$port --token-file $token --host 127.0.0.1" >> "$log" 2>&1 &
  PIDS+=($!)
  local samples="$DIR/steps-$1"
  : > "$samples"
  local status=""
  while kill -0 "$coordinator" 2> /dev/null; do
    status="$(curl -sf "http://127.0.0.1:$http/api/status" || true)"
    if [[ -n $status ]]; then
      echo "$(date +%s.%N) $(jq -r .global_step <<< "$status")" >> "$samples"
      [[ $(jq -r .finished <<< "$status") == true ]] && break
      jq -c '{b: .batch_shares.samples, r: .straggler_ratio}' <<< "$status" > "$DIR/last-$1"
    fi
    sleep 0.5
  done
  wait "$coordinator" 2> /dev/null || true
  awk -v from="$FROM" '$2 >= from && !t0 { t0 = $1; s0 = $2 } { t1 = $1; s1 = $2 }
    END { if (t1 > t0) printf "%.3f", (s1 - s0) / (t1 - t0); else printf "nan" }' "$samples"
  printf ' %s\n' "$(cat "$DIR/last-$1" 2> /dev/null || echo '{}')"
  grep -o 'the batch split by speed from step [0-9]*: \[[0-9, ]*\][^)]*)' "$log" | head -3 >&2 || true
}

echo "two workers, axial26s width 0.25, 32 px, global batch 128, sync_bn all;" \
  "one worker held to ${QUOTA}% of a core"
echo
echo "| round | even split (steps/s) | rebalanced (steps/s) | speed-up | shares | median/slowest speed |"
echo "|---|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  read -r even _ < <(run false)
  read -r shared last < <(run true)
  printf '| %d | %.3f | %.3f | %.2fx | %s | %s |\n' "$r" "$even" "$shared" \
    "$(awk -v a="$shared" -v b="$even" 'BEGIN { print a / b }')" \
    "$(jq -c .b <<< "$last")" "$(jq -r '.r // "-"' <<< "$last")"
done
