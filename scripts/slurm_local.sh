#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests and for trying `wb slurm render --submit`
# (docs/ARCHITECTURE.md, Slurm test cluster).
#
#   scripts/slurm_local.sh up       # install slurmctld/slurmd/client + munge if missing, start, wait for idle
#   scripts/slurm_local.sh status   # "up: ..." (exit 0) or "down: ..." (exit 1)
#   scripts/slurm_local.sh down     # cancel its jobs, stop what it started, remove its state
#   scripts/slurm_local.sh install  # only the packages (scripts/slurm_hosts.sh uses them)
#
# Everything lives under WB_SLURM_DIR (default /tmp/wb-slurm): slurm.conf, the munge key and socket,
# state, spool, logs, pid files. Clients find the cluster with SLURM_CONF=$WB_SLURM_DIR/slurm.conf
# (`up` also links /etc/slurm/slurm.conf to it when that file does not exist; `down` removes the link).
# Exit status: 0 ok, 1 failed (with the log tail), 3 cannot run here (one line: not root, no apt-get).
set -euo pipefail

DIR=${WB_SLURM_DIR:-/tmp/wb-slurm}
CTLD_PORT=${WB_SLURM_PORT:-6817}
UP_TIMEOUT=${WB_SLURM_UP_TIMEOUT:-60}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
ETC_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$CONF
# shellcheck source=scripts/slurm_shared.sh
source "$(cd "$(dirname "$0")" && pwd)/slurm_shared.sh"

say() { echo "slurm_local: $*"; }
cannot() { echo "slurm_local: cannot run: $*" >&2; exit 3; }
fail() {
    echo "slurm_local: $*" >&2
    for f in "$DIR"/log/*.log; do [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }; done
    exit 1
}

have_packages() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null

install_packages() {
    have_packages && return 0
    command -v apt-get >/dev/null || cannot "slurm and munge are not installed and there is no apt-get"
    say "installing ${PACKAGES[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then   # package lists missing or stale
        apt-get update -q >/dev/null || fail "apt-get update failed"
    fi
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null || fail "apt-get install failed"
    have_packages || fail "installed ${PACKAGES[*]} but slurmctld/slurmd/sbatch/munged are not on PATH"
}

# pid of a daemon we started (its pid file, the process alive and of that name), or nothing
our_pid() {
    local pid
    pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 0
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
    return 0
}

node_line() {   # NodeName=... CPUs=... RealMemory=...: what slurmd detects, so the node is not drained
    slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]*/NodeName='"$(hostname -s)"' NodeAddr=127.0.0.1/'
}

write_conf() {
    mkdir -p "$DIR"/{munge,state,spool,log}
    cat > "$CONF" <<EOF
# written by scripts/slurm_local.sh: one node, this host; everything under $DIR
ClusterName=wb-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
$(slurm_shared_auth "$SOCKET")
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$(slurm_shared_settings)
$(node_line) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    [ -n "$(our_pid munged)" ] && return 0
    if [ ! -f "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    fi
    chmod 755 "$DIR/munge" && chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" || fail "munged did not start"
}

wait_idle() {
    local deadline=$((SECONDS + UP_TIMEOUT)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null || true)
        [ "$state" = idle ] && return 0
        sleep 0.5
    done
    fail "node $(hostname -s) not idle after ${UP_TIMEOUT}s (state '${state:-none}')"
}

up() {
    [ "$EUID" = 0 ] || cannot "needs root (it installs packages and runs slurmctld/slurmd as root)"
    install_packages
    if [ -n "$(our_pid slurmctld)" ] && [ -n "$(our_pid slurmd)" ]; then
        wait_idle && say "already up: node $(hostname -s) idle; export SLURM_CONF=$CONF" && return 0
    fi
    if [ -z "$(our_pid slurmctld)" ]; then   # a fresh start: no jobs of an earlier one come back
        rm -rf "$DIR/state" "$DIR/spool"
        write_conf
    fi
    start_munge
    [ -n "$(our_pid slurmctld)" ] || slurmctld -f "$CONF" || fail "slurmctld did not start"
    [ -n "$(our_pid slurmd)" ] || slurmd -f "$CONF" || fail "slurmd did not start"
    if [ ! -e "$ETC_CONF" ]; then mkdir -p /etc/slurm && ln -s "$CONF" "$ETC_CONF"; fi
    wait_idle
    say "up: node $(hostname -s) idle; export SLURM_CONF=$CONF"
}

stop() {   # stop NAME...: SIGTERM to each of our daemons at once, SIGKILL to any still there after 10 s
    local pids=() pid name
    for name in "$@"; do pid=$(our_pid "$name"); [ -n "$pid" ] && pids+=("$pid"); done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && { sleep 0.1; continue 2; }; done
        return 0
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

down() {
    if [ -n "$(our_pid slurmctld)" ]; then   # cancel its jobs, so no job's processes outlive the cluster
        scancel --full --quiet --partition=debug 2>/dev/null || true
        for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    stop slurmd slurmctld munged
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
    rm -rf "$DIR"
    say "down"
}

status() {
    if [ -n "$(our_pid slurmctld)" ] && [ -n "$(our_pid slurmd)" ]; then
        echo "up: $(sinfo -h -o '%N %T %c CPUs' 2>/dev/null || echo 'slurmctld not answering'); SLURM_CONF=$CONF"
        return 0
    fi
    echo "down ($DIR)"
    return 1
}

case "${1:-}" in
    up) up ;;
    install) [ "$EUID" = 0 ] || cannot "needs root (apt-get install)"; install_packages ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status|install" >&2; exit 2 ;;
esac
