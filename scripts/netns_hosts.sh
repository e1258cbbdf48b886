#!/usr/bin/env bash
# Two "hosts" on this machine: network namespaces joined by a veth pair, for multi-node launcher tests
# (docs/ARCHITECTURE.md, Slurm test cluster).
#
#   scripts/netns_hosts.sh up       # namespaces wb-hostA (10.77.0.1, dev wbvA) and wb-hostB (10.77.0.2, dev wbvB)
#   scripts/netns_hosts.sh status   # "up: ..." (exit 0) or "down" (exit 1)
#   scripts/netns_hosts.sh down     # deletes both (the veth pair goes with them)
#
# Run a command on a host: ip netns exec wb-hostA CMD. Exit 3 (one line) where namespaces cannot be made.
set -euo pipefail

A=wb-hostA B=wb-hostB

cannot() { echo "netns_hosts: cannot run: $*" >&2; exit 3; }
exists() { ip netns list 2>/dev/null | grep -qw "$1"; }

up() {
    [ "$EUID" = 0 ] || cannot "needs root (ip netns add)"
    command -v ip >/dev/null || cannot "no ip command (iproute2)"
    if exists $A && exists $B; then echo "netns_hosts: already up"; return 0; fi
    down >/dev/null
    ip netns add $A 2>/dev/null || cannot "ip netns add failed (no network namespaces here)"
    ip netns add $B
    ip link add wbvA type veth peer name wbvB 2>/dev/null || { down >/dev/null; cannot "no veth pairs here"; }
    ip link set wbvA netns $A
    ip link set wbvB netns $B
    ip -n $A addr add 10.77.0.1/24 dev wbvA
    ip -n $B addr add 10.77.0.2/24 dev wbvB
    for ns in $A $B; do ip -n "$ns" link set lo up; done
    ip -n $A link set wbvA up
    ip -n $B link set wbvB up
    echo "netns_hosts: up: $A 10.77.0.1 (wbvA), $B 10.77.0.2 (wbvB)"
}

down() {
    for ns in $A $B; do if exists "$ns"; then ip netns del "$ns"; fi; done
    echo "netns_hosts: down"
}

status() {
    if exists $A && exists $B; then echo "up: $A 10.77.0.1, $B 10.77.0.2"; return 0; fi
    echo "down"
    return 1
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
