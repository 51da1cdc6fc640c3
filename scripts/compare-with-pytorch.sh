#!/usr/bin/env bash
# Trains the same model with the same recipe on the same batches of the same real data, once
# with axial and once with PyTorch, and prints the per-epoch accuracies side by side.
#
#   scripts/compare-with-pytorch.sh [JOB.toml]     (default: examples/digits.toml)
#
# - the data: the class-sorted digits image folder (scripts/real-data.py), made once;
# - axial: `axial-worker train` (release build) with `[data] log_samples = true`, which writes
#   every micro-batch it trains on;
# - PyTorch: the twin in scripts/pytorch/ (a PyTorch model written in this repo; its forward
#   and backward reproduce ../shared/fixtures, checked first), trained with the same recipe on
#   exactly axial's batches (`train.py --order`), from the same initial weights;
# - with AXIAL_COMPARE_OLD_ORDER=1, also PyTorch on the order axial used before it mixed classes
#   (runs of 1,000 neighbouring samples), to show what that did to a class-sorted folder.
#
# Output: a table on stdout; the runs under target/compare/ (AXIAL_COMPARE_DIR to change).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
JOB="${1:-examples/digits.toml}"
OUT="${AXIAL_COMPARE_DIR:-$ROOT/target/compare}"

scripts/setup-libtorch.sh
PY="$(readlink -f .libtorch)/../../../../bin/python"
[[ -x "$PY" ]] || { echo "compare: no python beside .libtorch ($PY)" >&2; exit 1; }
export PYTHONWARNINGS=ignore

echo "== PyTorch twin against the reference fixtures" >&2
"$PY" scripts/pytorch/check_fixtures.py >&2

if [[ "$JOB" == examples/digits.toml ]]; then
  python3 scripts/real-data.py digits examples/data/digits
fi
echo "== build axial-worker (release)" >&2
cargo build --release --locked -p axial-worker --bin axial-worker >&2

rm -rf "$OUT" && mkdir -p "$OUT"
# The job as given, its checkpoints moved under $OUT (relative data paths stay relative to the
# job's own folder, so the copy keeps absolute ones).
JOB_DIR="$(cd "$(dirname "$JOB")" && pwd)"
"$PY" - "$JOB" "$JOB_DIR" "$OUT" <<'EOF'
import os, re, sys, tomllib
job, job_dir, out = sys.argv[1:]
text = open(job).read()
cfg = tomllib.loads(text)
if cfg["data"]["format"] != "imagefolder":
    sys.exit("compare: the PyTorch twin reads image folders only")
def absolute(m):
    key, path = m.group(1), m.group(2)
    return f'{key} = "{os.path.normpath(os.path.join(job_dir, path))}"'
text = re.sub(r'^(train|val) = "([^"]+)"', absolute, text, flags=re.M)
text = re.sub(r'^dir = "[^"]+"', f'dir = "{out}/axial"', text, flags=re.M)
text = re.sub(r'^log_samples = \w+', "log_samples = true", text, flags=re.M)
if "log_samples" not in text:
    text = text.replace("[data]\n", "[data]\nlog_samples = true\n", 1)
open(f"{out}/job.toml", "w").write(text)
EOF

echo "== axial" >&2
start=$(date +%s)
target/release/axial-worker train "$OUT/job.toml" --quiet
axial_s=$(( $(date +%s) - start ))
LOG="$(ls "$OUT"/axial/samples/*.log)"

echo "== PyTorch twin, axial's batches" >&2
start=$(date +%s)
"$PY" scripts/pytorch/train.py "$OUT/job.toml" --order "$LOG" --out "$OUT/pytorch.json" --quiet >&2
torch_s=$(( $(date +%s) - start ))
if [[ "${AXIAL_COMPARE_OLD_ORDER:-0}" == 1 ]]; then
  echo "== PyTorch twin, the old order (runs of 1,000 neighbouring samples)" >&2
  "$PY" scripts/pytorch/train.py "$OUT/job.toml" --plan shards1000 --out "$OUT/pytorch-old-order.json" --quiet >&2
fi

"$PY" - "$OUT" "$axial_s" "$torch_s" <<'EOF'
import json, os, sys
out, axial_s, torch_s = sys.argv[1], sys.argv[2], sys.argv[3]
axial = json.load(open(f"{out}/axial/summary.json"))["history"]
torch = json.load(open(f"{out}/pytorch.json"))
torch = torch["history"] if isinstance(torch, dict) else torch
old = None
if os.path.exists(f"{out}/pytorch-old-order.json"):
    old = json.load(open(f"{out}/pytorch-old-order.json"))
    old = old["history"] if isinstance(old, dict) else old
head = "| epoch | axial val top-1 | PyTorch val top-1 | axial train loss | PyTorch train loss |"
if old:
    head += " PyTorch, old order: val top-1 |"
print(head)
print("|" + "---|" * (head.count("|") - 1))
for i, a in enumerate(axial):
    t = torch[i] if i < len(torch) else {}
    row = (f"| {a['epoch']} | {a['val_top1']:.4f} | {t.get('val_top1', float('nan')):.4f} "
           f"| {a['train_loss']:.4f} | {t.get('train_loss', float('nan')):.4f} |")
    if old:
        o = old[i] if i < len(old) else {}
        row += f" {o.get('val_top1', float('nan')):.4f} |"
    print(row)
print(f"\nwall time: axial {axial_s} s, PyTorch {torch_s} s (both on this machine, one after the other)")
EOF
