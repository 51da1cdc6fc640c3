#!/usr/bin/env bash
# The checks of deploy/ that CI runs (scripts/test.sh calls this after the build):
#   - `axial-coordinator validate` on every shipped job file;
#   - the Kubernetes manifests against the API's schemas (kubernetes-validate --strict, from the
#     Python package registry, in a venv beside the torch one);
#   - the pod templates against the "restricted" Pod Security Standard (check-pod-security.py);
#   - shellcheck on every script;
#   - promtool: the alert rules and their unit tests (deploy/prometheus/alerts_test.yml).
# Missing tools are installed first (Debian's shellcheck and prometheus; root needed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/axial"
BIN="${CARGO_TARGET_DIR:-$CACHE/target}/debug"

fail() { echo "check-deploy: $*" >&2; exit 1; }
step() { printf -- '-- %s\n' "$*"; }

# Debian packages, installed when missing.
need() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "check-deploy: installing ${missing[*]}" >&2
  apt-get install -y -q "${missing[@]}" > /dev/null 2>&1 \
    || { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q "${missing[@]}" > /dev/null; } \
    || fail "could not install ${missing[*]} (Debian packages; root and the package registry are needed)"
}
need shellcheck prometheus

step "job files (axial-coordinator validate)"
[[ -x "$BIN/axial-coordinator" ]] || fail "$BIN/axial-coordinator is not built (cargo build --bins)"
for job in examples/*.toml deploy/k8s/job.toml; do
  "$BIN/axial-coordinator" validate "$job" > /dev/null || fail "$job does not validate"
  echo "ok   $job"
done

step "Kubernetes manifests against the API schemas (kubernetes-validate --strict)"
KV="$CACHE/kubernetes-validate"
if [[ ! -x "$KV/bin/kubernetes-validate" ]]; then
  python3 -m venv "$KV" || fail "could not create a venv at $KV"
  "$KV/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 \
    || fail "could not install kubernetes-validate from the Python package registry"
fi
manifests=()
for f in deploy/k8s/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done
"$KV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
echo "ok   ${manifests[*]}"

step "Pod Security Standard \"restricted\" and our rules (scripts/check-pod-security.py)"
"$KV/bin/python" scripts/check-pod-security.py "${manifests[@]}" \
  || fail "pod templates break the rules above"
echo "ok   ${manifests[*]}"

step "shellcheck"
shellcheck scripts/*.sh deploy/slurm/axial.sbatch
echo "ok   scripts/*.sh deploy/slurm/axial.sbatch"

step "promtool"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
# (Not `promtool check config`: Debian builds Prometheus without Kubernetes service discovery,
# so it refuses the kubernetes_sd_configs section that deploy/prometheus/prometheus.yml ships.
# tests/tests/prometheus.rs runs a real Prometheus on a file-discovery copy of it.)
