#!/usr/bin/env bash
# A virtual cluster on this machine: hosts that each have their own network stack (a Linux
# network namespace) and their own address on a shared bridge, so that a coordinator and its
# workers talk over a real network path instead of 127.0.0.1. Needs root (or CAP_NET_ADMIN)
# and iproute2; the file system stays shared, as on a cluster with shared storage.
#
#   scripts/virtual-cluster.sh up N [NAME [SUBNET]]   hosts NAME-c (SUBNET.1: the coordinator)
#                                                     and NAME-w0 .. NAME-w<N-1> (SUBNET.10+i);
#                                                     this machine is SUBNET.254 on the bridge
#   scripts/virtual-cluster.sh down [NAME]            remove them
#   scripts/virtual-cluster.sh cut HOST [NAME]        pull a host's cable (its link goes down)
#   scripts/virtual-cluster.sh restore HOST [NAME]    plug it back in
#   scripts/virtual-cluster.sh limit HOST RATE [NAME] shape a host's link (tc tbf), e.g. 100mbit
#   scripts/virtual-cluster.sh unlimit HOST [NAME]
#   scripts/virtual-cluster.sh exec HOST CMD...       run CMD on a host (ip netns exec)
#
# NAME defaults to "axv" and SUBNET to 10.77.0 (a /24). HOST is "c" or "w<i>". Example:
#
#   scripts/virtual-cluster.sh up 2
#   ip netns exec axv-c  target/release/axial-coordinator serve job.toml --workers 2 \
#       --listen 10.77.0.1:50051 --token-file /tmp/token --insecure &
#   ip netns exec axv-w0 target/release/axial-worker join --coordinator http://10.77.0.1:50051 \
#       --token-file /tmp/token &
#   ip netns exec axv-w1 target/release/axial-worker join --coordinator http://10.77.0.1:50051 \
#       --token-file /tmp/token
#   scripts/virtual-cluster.sh down
set -euo pipefail

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
fail() { echo "virtual-cluster: $*" >&2; exit 1; }

# The host-side end of a host's cable (at most 15 characters).
cable() { echo "${1}-${2}" | cut -c1-15; }

up() {
  local n="$1" name="$2" subnet="$3"
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 200 ]] || fail "N must be 1..200, not $n"
  command -v ip >/dev/null || fail "ip (iproute2) is missing"
  [[ ${#name} -le 8 ]] || fail "NAME must have at most 8 characters"
  down "$name" 2>/dev/null || true
  local bridge="${name}-br"
  ip link add "$bridge" type bridge || fail "cannot create a bridge (root or CAP_NET_ADMIN needed)"
  # This machine is on the cluster network too (an operator's seat): SUBNET.254.
  ip addr add "$subnet.254/24" dev "$bridge"
  ip link set "$bridge" up
  local hosts=("c") i
  for ((i = 0; i < n; i++)); do hosts+=("w$i"); done
  for h in "${hosts[@]}"; do
    local ns="${name}-${h}" end
    end="$(cable "$name" "$h")"
    local addr="$subnet.1"
    [[ "$h" == c ]] || addr="$subnet.$((10 + ${h#w}))"
    ip netns add "$ns"
    ip link add "$end" type veth peer name eth0 netns "$ns"
    ip link set "$end" master "$bridge" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    echo "$ns $addr"
  done
}

down() {
  local name="$1" ns
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${name}-(c|w[0-9]+)$" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns"
  done
  # The cables' host ends (a namespace's end may take a moment to go with it).
  for end in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${name}-(c|w[0-9]+)$" || true); do
    ip link del "$end" 2>/dev/null || true
  done
  ip link del "${name}-br" 2>/dev/null || true
}

cmd="${1:-}"
shift || true
case "$cmd" in
  up) [[ $# -ge 1 ]] || usage; up "$1" "${2:-axv}" "${3:-10.77.0}" ;;
  down) down "${1:-axv}" ;;
  cut) [[ $# -ge 1 ]] || usage; ip link set "$(cable "${2:-axv}" "$1")" down ;;
  restore) [[ $# -ge 1 ]] || usage; ip link set "$(cable "${2:-axv}" "$1")" up ;;
  limit)
    [[ $# -ge 2 ]] || usage
    # Both directions: the cable's host end (traffic to the host) and the host's eth0.
    ip netns exec "${3:-axv}-$1" tc qdisc replace dev eth0 root tbf rate "$2" burst 64kb latency 50ms
    tc qdisc replace dev "$(cable "${3:-axv}" "$1")" root tbf rate "$2" burst 64kb latency 50ms ;;
  unlimit)
    [[ $# -ge 1 ]] || usage
    ip netns exec "${2:-axv}-$1" tc qdisc del dev eth0 root 2>/dev/null || true
    tc qdisc del dev "$(cable "${2:-axv}" "$1")" root 2>/dev/null || true ;;
  exec) [[ $# -ge 2 ]] || usage; host="$1"; shift; exec ip netns exec "axv-$host" "$@" ;;
  *) usage ;;
esac
