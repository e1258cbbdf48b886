#!/usr/bin/env bash
# A two-node Slurm on the two "hosts" of scripts/netns_hosts.sh (docs/ARCHITECTURE.md, Slurm test cluster):
# slurmctld and slurmd `hostA` in wb-hostA (10.77.0.1), slurmd `hostB` in wb-hostB (10.77.0.2), one CPU each.
#
#   scripts/slurm_hosts.sh up       # needs `netns_hosts.sh up`; installs the packages (slurm_local.sh install)
#   scripts/slurm_hosts.sh status   # "up: ..." (exit 0) or "down" (exit 1)
#   scripts/slurm_hosts.sh down     # cancels its jobs, stops its daemons, removes its state
#
# Clients run in wb-hostA (the only place slurmctld is reached from besides wb-hostB):
#   ip netns exec wb-hostA env SLURM_CONF=/tmp/wb-slurm-hosts/slurm.conf sbatch ...
# Each daemon runs in its namespace's network with its own hostname (a UTS namespace) and an /etc/hosts that
# names both hosts (bound over it in a private mount namespace), as on real nodes: the jobs' `hostname` is
# the node's, so torchrun's rendezvous and gloo find the right address without flags. nsenter, not `ip netns
# exec`: that one mounts a fresh /sys, without the cgroup hierarchy slurmd needs. munged (a Unix socket on
# the shared filesystem) serves both. WB_NETNS_SUFFIX as for netns_hosts.sh. Exit 3 (one line): cannot run.
set -euo pipefail

SFX=${WB_NETNS_SUFFIX:-}
A=wb-hostA$SFX B=wb-hostB$SFX
DIR=/tmp/wb-slurm-hosts$SFX
CONF=$DIR/slurm.conf SOCKET=$DIR/munge/munge.socket
HERE=$(cd "$(dirname "$0")" && pwd)
export SLURM_CONF=$CONF
# shellcheck source=scripts/slurm_shared.sh
source "$HERE/slurm_shared.sh"

say() { echo "slurm_hosts: $*"; }
fail() {
    echo "slurm_hosts: $*" >&2
    for f in "$DIR"/log/*.log; do [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }; done
    exit 1
}
alive() { local pid; pid=$(cat "$DIR/$1.pid" 2>/dev/null) && [ -d "/proc/$pid" ] && echo "$pid"; return 0; }

write_conf() {
    mkdir -p "$DIR"/{munge,state,spool,log}
    cat > "$CONF" <<EOF
# written by scripts/slurm_hosts.sh: nodes hostA (10.77.0.1) and hostB (10.77.0.2); everything under $DIR
ClusterName=wb-hosts
SlurmctldHost=hostA(10.77.0.1)
$(slurm_shared_auth "$SOCKET")
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
$(slurm_shared_settings)
NodeName=hostA NodeAddr=10.77.0.1 NodeHostname=hostA CPUs=1 State=UNKNOWN
NodeName=hostB NodeAddr=10.77.0.2 NodeHostname=hostB CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    for ns in $A $B; do
        mkdir -p "/etc/netns/$ns"
        printf '127.0.0.1 localhost\n10.77.0.1 hostA\n10.77.0.2 hostB\n' > "/etc/netns/$ns/hosts"
    done
}

# on_host NS NAME CMD...: CMD in NS's network, hostname NAME, /etc/netns/NS/hosts as /etc/hosts
on_host() {
    local ns=$1 name=$2; shift 2
    nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
        "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $name && exec \"\$@\"" sh "$@"
}

start_munge() {
    [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    chmod 755 "$DIR/munge" && chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" || fail "munged did not start"
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state=$(ip netns exec $A sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
        [ "$state" = "idle " ] && return 0
        sleep 0.5
    done
    fail "nodes not idle after 60 s (states '${state:-none}')"
}

up() {
    bash "$HERE/netns_hosts.sh" status >/dev/null || fail "the hosts are not up (scripts/netns_hosts.sh up)"
    bash "$HERE/slurm_local.sh" install
    if status >/dev/null; then wait_idle; say "already up; SLURM_CONF=$CONF"; return 0; fi
    down >/dev/null
    write_conf
    start_munge
    on_host $A hostA slurmctld -f "$CONF" || fail "slurmctld did not start"
    on_host $A hostA slurmd -f "$CONF" -N hostA || fail "slurmd hostA did not start"
    on_host $B hostB slurmd -f "$CONF" -N hostB || fail "slurmd hostB did not start"
    wait_idle
    say "up: hostA, hostB idle; SLURM_CONF=$CONF"
}

down() {
    if [ -n "$(alive slurmctld)" ]; then   # cancel its jobs: no job's processes outlive the cluster
        ip netns exec $A scancel --full --quiet --partition=debug 2>/dev/null || true
        for _ in $(seq 100); do [ -z "$(ip netns exec $A squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    local pids=() name pid
    for name in slurmd.hostA slurmd.hostB slurmctld munged; do pid=$(alive $name); [ -n "$pid" ] && pids+=("$pid"); done
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && { sleep 0.1; continue 2; }; done
            break
        done
        kill -9 "${pids[@]}" 2>/dev/null || true
    fi
    for ns in $A $B; do rm -f "/etc/netns/$ns/hosts"; rmdir "/etc/netns/$ns" 2>/dev/null || true; done
    rm -rf "$DIR"
    say "down"
}

status() {
    if [ -n "$(alive slurmctld)" ] && [ -n "$(alive slurmd.hostA)" ] && [ -n "$(alive slurmd.hostB)" ]; then
        echo "up: $(ip netns exec $A sinfo -h -N -o '%N %T' 2>/dev/null | tr '\n' ' '); SLURM_CONF=$CONF"
        return 0
    fi
    echo "down"
    return 1
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
