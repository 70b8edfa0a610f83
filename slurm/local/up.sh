#!/usr/bin/env bash
# Start a local Slurm cluster of simulated nodes on this one machine: munged, slurmctld, and one slurmd per node
# (node1, node2, ...), partition "cpu". Real Slurm daemons, real jobs; only the "nodes" share one host.
#
#   slurm/local/up.sh              # installs the Debian packages if needed (root), starts, waits until idle
#   source build/slurm/env.sh      # SLURM_CONF for sinfo / sbatch / squeue / scancel in this shell
#   slurm/local/down.sh            # stops what up.sh started
#
# Everything it writes (config, state, spool, logs, pid files, a munge key if the system has none) lives under
# ${LABS_BUILD_DIR:-<repo>/build}/slurm, never in /etc. A second run is a no-op while the daemons are alive.
# Settings (env): LABS_SLURM_NODES (2), LABS_SLURM_CPUS per node (8; declared, not real, so 2 nodes x 4 tasks fit
# on a 2-core machine), LABS_SLURM_PORT (16817: slurmctld; the nodes take the next ports), LABS_SLURM_UP_TIMEOUT (60 s).
# Exit codes: 0 up; 3 Slurm is not installed and cannot be (not root / no apt) - callers fall back to torchrun;
# 1 anything else (with the daemons' log tails, or the ports another cluster holds).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SD=${LABS_BUILD_DIR:-$REPO/build}/slurm
NODES=${LABS_SLURM_NODES:-2}
CPUS=${LABS_SLURM_CPUS:-8}
PORT=${LABS_SLURM_PORT:-16817}
TIMEOUT=${LABS_SLURM_UP_TIMEOUT:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a non-login root shell may lack

log() { echo "slurm-up: $*" >&2; }

have_slurm() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null

# --- 1. packages -----------------------------------------------------------------------------------------------
if ! have_slurm; then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        log "Slurm is not installed and this script cannot install it (needs root and apt-get)."
        log "Install the packages ${PACKAGES[*]} (Debian/Ubuntu) or run on a Slurm cluster."
        log "The labs fall back to torchrun on this machine."
        exit 3
    fi
    log "installing ${PACKAGES[*]} ..."
    start=$SECONDS
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${PACKAGES[@]}"; } >"${TMPDIR:-/tmp}/labs-slurm-apt.log" 2>&1 || ! have_slurm; then
        tail -n 20 "${TMPDIR:-/tmp}/labs-slurm-apt.log" >&2
        log "installing Slurm failed (log above); the labs fall back to torchrun on this machine."
        exit 3
    fi
    log "installed in $((SECONDS - start)) s"
fi

# --- 2. layout -------------------------------------------------------------------------------------------------
# build/logs: where the job scripts' #SBATCH --output puts job logs (Slurm does not create folders).
mkdir -p "$SD"/{etc,state,spool,log,pids} "$SD/../logs"
CONF=$SD/etc/slurm.conf
ME=$(id -un)
# munged is strict about ownership and permissions; as root, run it as Debian's "munge" user, like the package does.
if [[ $ME == root ]] && id munge >/dev/null 2>&1; then MUNGE_USER=munge; else MUNGE_USER=$ME; fi
MUNGE_DIR=$SD/munge
SOCKET=$MUNGE_DIR/munge.socket
if (( ${#SOCKET} > 100 )); then
    log "the munge socket path is too long for a Unix socket (${#SOCKET} > 100 chars): $SOCKET"
    log "set LABS_BUILD_DIR to a shorter folder."
    exit 1
fi

# True if NAME's pid file names a live process running COMM: not a reused pid, not a zombie (a killed daemon
# lingers as one until its adoptive parent reaps it, and in containers that parent may be slow or never do it).
alive() {  # alive NAME COMM
    local f=$SD/pids/$1.pid pid stat
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$2" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }  # the state letter follows the parenthesised command name
    [[ ${stat:0:1} != Z ]]
}

# Start a daemon in the foreground of its own session and remember its pid: the pid file is ours, so down.sh
# stops exactly what we started, and the daemon keeps no file descriptor of the caller (a notebook, pytest).
launch() {  # launch NAME COMMAND...
    local name=$1
    shift
    setsid "$@" </dev/null >>"$SD/log/$name.out" 2>&1 &
    echo $! >"$SD/pids/$name.pid"
}

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }

# Our ports must be free unless our own daemons hold them: another cluster listening there (another checkout's local
# cluster, a second up.sh with other settings) would answer this cluster's sinfo and sbatch and run its jobs.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
taken=()
alive slurmctld slurmctld || { port_taken "$PORT" && taken+=("$PORT (slurmctld)"); }
for ((i = 1; i <= NODES; i++)); do
    alive "slurmd-node$i" slurmd || { port_taken $((PORT + i)) && taken+=("$((PORT + i)) (slurmd node$i)"); }
done
if (( ${#taken[@]} )); then
    joined=$(printf ', %s' "${taken[@]}")
    log "in use by another process, not by this cluster ($SD): port ${joined:2}"
    log "Another local cluster? Stop it with its slurm/local/down.sh, or give this one other ports:"
    log "LABS_SLURM_PORT=$((PORT + 100)) slurm/local/up.sh"
    exit 1
fi

# The last lines each daemon wrote (its own log; munged's and start-up errors go to the .out files).
tails() {
    local f
    for f in "$SD"/log/munged.out "$SD"/log/slurmctld.log "$SD"/log/slurmd-*.log; do
        [[ -s $f ]] && { echo "--- $f"; tail -n 8 "$f"; }
    done >&2
}

# --- 3. munge --------------------------------------------------------------------------------------------------
if alive munged munged; then
    log "munged already running"
else
    install -d -m 0755 -o "$MUNGE_USER" "$MUNGE_DIR"
    KEY=/etc/munge/munge.key
    if [[ ! -r $KEY || $MUNGE_USER != munge ]]; then
        # No system key (or not readable by us): a private one for this cluster only.
        KEY=$MUNGE_DIR/munge.key
        if [[ ! -s $KEY ]]; then
            (umask 077 && head -c 1024 /dev/urandom >"$KEY")
        fi
        chown "$MUNGE_USER" "$KEY"
        chmod 0400 "$KEY"
    fi
    rm -f "$SOCKET"
    as_munge=()
    [[ $MUNGE_USER != "$ME" ]] && as_munge=(setpriv --reuid="$MUNGE_USER" --regid="$MUNGE_USER" --init-groups)
    launch munged "${as_munge[@]}" munged --foreground --key-file="$KEY" --socket="$SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed"
    for _ in $(seq 50); do
        [[ -S $SOCKET ]] && break
        sleep 0.1
    done
    if ! munge --socket="$SOCKET" -n </dev/null | unmunge --socket="$SOCKET" >/dev/null 2>&1; then
        tails
        log "munged did not start (logs above)"
        exit 1
    fi
    log "munged started"
fi

# --- 4. slurm.conf ---------------------------------------------------------------------------------------------
ctld_running=false
alive slurmctld slurmctld && ctld_running=true
HOST=$(hostname -s)
# Memory is not a scheduled resource here (CR_CPU), but declaring it lets jobs that ask for --mem be accepted.
MEM_MB=$(awk '/^MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
NEW_CONF=$(cat <<EOF
# Generated by slurm/local/up.sh: a simulated cluster of $NODES nodes on $HOST. Edit up.sh, not this file.
ClusterName=labs
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=$ME
SlurmdUser=$ME
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$SD/state
SlurmdSpoolDir=$SD/spool/%n
SlurmctldPidFile=$SD/state/slurmctld.pid
SlurmdPidFile=$SD/spool/slurmd-%n.pid
SlurmctldLogFile=$SD/log/slurmctld.log
SlurmdLogFile=$SD/log/slurmd-%n.log
# Several slurmd on one host: no cgroups, no CPU binding, the declared (not detected) CPUs count.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
# No slurmdbd: finished jobs go to a text file, which "sacct -c" reads.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SD/log/jobcomp.txt
# Finished jobs leave squeue after 5 s (the default 300 s makes "sbatch --wait" poll slower and slower).
MinJobAge=5
# Refuse impossible requests at submit time instead of letting them pend forever.
EnforcePartLimits=ALL
# A node that comes back (after down.sh / up.sh) is usable again without an admin.
ReturnToService=2
# scancel: SIGTERM, then SIGKILL 10 s later (room for a last checkpoint).
KillWait=10
SlurmdTimeout=60
NodeName=DEFAULT CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$((PORT + NODES))]
PartitionName=cpu Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ -f $CONF && $(<"$CONF") != "$NEW_CONF" ]] && $ctld_running; then
    log "warning: settings changed but slurmctld is running with the old ones; run down.sh and up.sh to apply"
elif [[ ! -f $CONF || $(<"$CONF") != "$NEW_CONF" ]]; then
    printf '%s\n' "$NEW_CONF" >"$CONF"
fi
export SLURM_CONF=$CONF

# --- 5. slurmctld and the nodes --------------------------------------------------------------------------------
if $ctld_running; then
    log "slurmctld already running"
else
    # -i: keep going past unreadable saved state; saved state is kept so job ids keep counting up across restarts.
    launch slurmctld slurmctld -D -i
    log "slurmctld started"
fi
for node in $(node_names); do
    if alive "slurmd-$node" slurmd; then
        log "slurmd $node already running"
    else
        mkdir -p "$SD/spool/$node"
        launch "slurmd-$node" slurmd -D -N "$node"
        log "slurmd $node started"
    fi
done

# --- 6. wait until every node is idle --------------------------------------------------------------------------
cat >"$SD/env.sh" <<EOF
# Written by slurm/local/up.sh: the local cluster's settings for Slurm's client commands.
export SLURM_CONF=$CONF
case ":\$PATH:" in *:/usr/sbin:*) ;; *) export PATH=\$PATH:/usr/sbin ;; esac
EOF

started=$SECONDS
resumed=false
while :; do
    states=$(sinfo -h -N -p cpu -o '%N %T' 2>/dev/null | sort -u || true)
    idle=$(grep -c ' idle$' <<<"$states" || true)
    (( idle >= NODES )) && break
    # A node an earlier run left drained (or down for a reason ReturnToService does not clear) stays out of
    # service until an admin resumes it: we are the admin. Give the slurmds a few seconds to register first.
    if ! $resumed && (( SECONDS - started >= 5 )) && grep -qE ' (down|drain)' <<<"$states"; then
        log "resuming nodes: $(tr '\n' ' ' <<<"$states")"
        scontrol update NodeName="node[1-$NODES]" State=RESUME >/dev/null 2>&1 || true
        resumed=true
    fi
    for name in slurmctld $(node_names | sed 's/^/slurmd-/'); do
        if ! alive "$name" "${name%%-*}"; then
            tails
            [[ -s $SD/log/$name.out ]] && tail -n 5 "$SD/log/$name.out" >&2
            log "$name exited during start-up (logs above)"
            exit 1
        fi
    done
    if (( SECONDS - started >= TIMEOUT )); then
        tails
        log "timed out after ${TIMEOUT}s waiting for $NODES idle nodes; sinfo says:"
        echo "${states:-<no answer from slurmctld>}" >&2
        exit 1
    fi
    sleep 0.5
done
log "cluster up: $NODES nodes x $CPUS CPUs, partition cpu. In a shell: source $SD/env.sh"
