#!/usr/bin/env bash
# The chaos campaign on demand: N trials (default 20) of a two-worker job, each with one random
# fault at a random moment (SIGKILL of a worker or of the coordinator, SIGSTOP or SIGTERM of a
# worker, a cut link on the virtual cluster), each checked to end exactly where an uninterrupted
# run ends. Prints the table. Root is needed for the virtual cluster (without it, loopback and
# no link faults). CI runs 3 trials as part of scripts/test.sh.
#
#   scripts/chaos.sh [TRIALS] [SEED]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup-libtorch.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/axial/target}"
LIBTORCH="$(readlink -f .libtorch)"
export LIBTORCH
export AXIAL_CHAOS_TRIALS="${1:-20}"
[[ -n "${2:-}" ]] && export AXIAL_CHAOS_SEED="$2"
cargo build --workspace --bins --locked
cargo test -p axial-e2e --test chaos --locked -- --nocapture
