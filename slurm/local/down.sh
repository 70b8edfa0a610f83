#!/usr/bin/env bash
# Stop the local Slurm cluster that slurm/local/up.sh started: only the processes named in its pid files
# (${LABS_BUILD_DIR:-<repo>/build}/slurm/pids), nodes first, then slurmctld, then munged. A system munged or a
# site Slurm is never touched. Config, saved state and logs stay, so job ids keep counting after the next up.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PIDS=${LABS_BUILD_DIR:-$REPO/build}/slurm/pids

log() { echo "slurm-down: $*" >&2; }

# True while PID exists and is not a zombie (killed daemons wait as zombies until pid 1 reaps them).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# stop COMM NAME...: SIGTERM to each live pid file's process that is still COMM (not a reused pid), up to 15 s for
# clean exits (slurmctld saves its state, each daemon takes ~2 s), then SIGKILL. Several names stop in parallel.
stop() {
    local comm=$1 name pid busy pids=() names=()
    shift
    for name in "$@"; do
        [[ -f $PIDS/$name.pid ]] || continue
        pid=$(<"$PIDS/$name.pid")
        if [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$comm" ]] && running "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name")
        fi
        rm -f "$PIDS/$name.pid"
    done
    (( ${#pids[@]} )) || return 0
    for _ in $(seq 150); do
        busy=false
        for pid in "${pids[@]}"; do running "$pid" && busy=true; done
        $busy || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if running "$pid"; then
            log "pid $pid ignored SIGTERM for 15 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    log "stopped ${names[*]}"
}

shopt -s nullglob
nodes=()
for f in "$PIDS"/slurmd-*.pid; do nodes+=("$(basename "$f" .pid)"); done
stop slurmd "${nodes[@]}"
stop slurmctld slurmctld
stop munged munged
log "local cluster down"
