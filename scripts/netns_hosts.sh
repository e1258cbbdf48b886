#!/usr/bin/env bash
# Two "hosts" on this machine: network namespaces joined by a veth pair, for multi-node launcher tests
# (docs/ARCHITECTURE.md, Slurm test cluster).
#
#   scripts/netns_hosts.sh up       # namespaces wb-hostA (10.77.0.1, dev wbvA) and wb-hostB (10.77.0.2, dev wbvB)
#   scripts/netns_hosts.sh status   # "up: ..." (exit 0) or "down" (exit 1)
#   scripts/netns_hosts.sh down     # ends every process in them (Ray included), deletes both (and the veth)
#   scripts/netns_hosts.sh ray-up   # a Ray head in wb-hostA (10.77.0.1:6379), a Ray worker node in wb-hostB
#   scripts/netns_hosts.sh ray-down # ends every process in the two namespaces (their Ray nodes), keeps them
#
# WB_NETNS_SUFFIX=X names them wb-hostAX / wb-hostBX (veth wbvAX / wbvBX, Ray under /tmp/wb-netns-rayX).
#
# ray-up: one CPU per node (so Ray Train puts one worker on each), no dashboard, each node's own temp dir
# under /tmp/wb-netns-ray, token authentication with its own token: a driver needs RAY_AUTH_MODE=token
# RAY_AUTH_TOKEN_PATH=/tmp/wb-netns-ray/auth_token. RAY=/path/to/ray picks the binary (its Python runs the
# workers). The port is the namespaces' own, so it cannot clash with a Ray on this machine. `ray stop` is
# not used: it would stop every Ray on the machine; ray-down ends only the processes in the two namespaces
# (ip netns pids).
#
# Run a command on a host: ip netns exec wb-hostA CMD. Exit 3 (one line) where namespaces cannot be made.
set -euo pipefail

SFX=${WB_NETNS_SUFFIX:-}   # a second pair beside another checkout's (names are machine-wide), <= 11 chars
A=wb-hostA$SFX B=wb-hostB$SFX VA=wbvA$SFX VB=wbvB$SFX
RAY=${RAY:-ray} RAY_PORT=${RAY_PORT:-6379} RAY_TMP=/tmp/wb-netns-ray$SFX

cannot() { echo "netns_hosts: cannot run: $*" >&2; exit 3; }
exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

up() {
    [ "$EUID" = 0 ] || cannot "needs root (ip netns add)"
    command -v ip >/dev/null || cannot "no ip command (iproute2)"
    if exists $A && exists $B; then echo "netns_hosts: already up"; return 0; fi
    down >/dev/null
    ip netns add $A 2>/dev/null || cannot "ip netns add failed (no network namespaces here)"
    ip netns add $B
    ip link add $VA type veth peer name $VB 2>/dev/null || { down >/dev/null; cannot "no veth pairs here"; }
    ip link set $VA netns $A
    ip link set $VB netns $B
    ip -n $A addr add 10.77.0.1/24 dev $VA
    ip -n $B addr add 10.77.0.2/24 dev $VB
    for ns in $A $B; do ip -n "$ns" link set lo up; done
    ip -n $A link set $VA up
    ip -n $B link set $VB up
    echo "netns_hosts: up: $A 10.77.0.1 ($VA), $B 10.77.0.2 ($VB)"
}

ns_pids() { for ns in $A $B; do if exists "$ns"; then ip netns pids "$ns"; fi; done; }

# TERM every process in the namespaces, KILL what is left after 1 s.
end_processes() {
    local pids sig
    for sig in TERM KILL; do
        pids=$(ns_pids)
        [ -n "$pids" ] || return 0
        kill -s "$sig" $pids 2>/dev/null || true
        for _ in $(seq 10); do [ -n "$(ns_pids)" ] || return 0; sleep 0.1; done
    done
    echo "netns_hosts: processes left in the namespaces: $(ns_pids | tr '\n' ' ')" >&2
    return 1
}

down() {
    end_processes
    for ns in $A $B; do if exists "$ns"; then ip netns del "$ns"; fi; done
    rm -rf "$RAY_TMP" "$RAY_TMP".?.log
    echo "netns_hosts: down"
}

ray_up() {
    status >/dev/null || { echo "netns_hosts: not up (run: $0 up)" >&2; exit 1; }
    command -v "$RAY" >/dev/null || cannot "no ray command ($RAY)"
    local common=(--num-cpus 1 --disable-usage-stats)
    mkdir -p "$RAY_TMP"   # token authentication with this cluster's own token (not ~/.ray's)
    [ -s "$RAY_TMP/auth_token" ] || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$RAY_TMP/auth_token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_TMP/auth_token
    export RAY_worker_niceness=0   # Ray's workers at nice 15 starve beside busy processes (parallel/runtime/local_ray.py)
    ip netns exec $A "$RAY" start --head --node-ip-address 10.77.0.1 --port "$RAY_PORT" \
        --temp-dir "$RAY_TMP/A" --include-dashboard false "${common[@]}" >"$RAY_TMP.A.log" 2>&1 \
        || { cat "$RAY_TMP.A.log" >&2; exit 1; }
    ip netns exec $B "$RAY" start --address "10.77.0.1:$RAY_PORT" --node-ip-address 10.77.0.2 \
        --temp-dir "$RAY_TMP/B" "${common[@]}" >"$RAY_TMP.B.log" 2>&1 \
        || { cat "$RAY_TMP.B.log" >&2; exit 1; }
    echo "netns_hosts: ray up: head 10.77.0.1:$RAY_PORT ($A), worker node 10.77.0.2 ($B); token $RAY_TMP/auth_token"
}

ray_down() {
    end_processes
    rm -rf "$RAY_TMP" "$RAY_TMP".?.log
    echo "netns_hosts: ray down"
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
    ray-up) ray_up ;;
    ray-down) ray_down ;;
    *) echo "usage: $0 up|down|status|ray-up|ray-down" >&2; exit 2 ;;
esac
