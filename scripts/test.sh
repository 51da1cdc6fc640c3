#!/usr/bin/env bash
# The project's one test command: sets up libtorch if needed, then runs the checks cheapest
# first (format, lints, tests). CI (.ci/run) runs exactly this.
#
# The cargo target dir and the torch venv live in a cache outside the clone
# (${XDG_CACHE_HOME:-~/.cache}/axial/), so a second run, or a run from a fresh clone, is quick.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/axial"

scripts/setup-libtorch.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
# Point torch-sys at the venv itself rather than this clone's .libtorch symlink: the path is then
# the same for every clone, and the cached libtorch bindings (2-3 min to compile) are reused.
LIBTORCH="$(readlink -f .libtorch)"
export LIBTORCH

step() { printf '\n== %s\n' "$*"; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "PyTorch twin against the reference fixtures (scripts/pytorch/)"
PYTHONWARNINGS=ignore "$(readlink -f .libtorch)/../../../../bin/python" scripts/pytorch/check_fixtures.py
step "cargo build (every binary: the end-to-end tests run them)"
cargo build --workspace --bins --locked
step "deploy/ checks (job files, Kubernetes schemas, shellcheck, promtool)"
scripts/check-deploy.sh
step "headless Chromium for the dashboard test (Debian's chromium)"
if ! command -v chromium > /dev/null; then
  apt-get install -y -q chromium > /dev/null 2>&1 \
    || { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q chromium > /dev/null 2>&1; } \
    || echo "WARNING: could not install chromium; tests/tests/dashboard.rs will skip" >&2
fi
command -v chromium > /dev/null && chromium --version 2> /dev/null
step "cargo test"
cargo test --workspace --locked
