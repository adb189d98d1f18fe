#!/usr/bin/env bash
# A local 2-node SLURM cluster on this one host, for tests, CI and trying the sbatch scripts.
#
#   slurm/local_cluster.sh start    install (if missing), configure, start, wait until idle
#   slurm/local_cluster.sh stop     stop exactly the daemons that `start` started (pid files)
#   slurm/local_cluster.sh status   show the daemons and `sinfo`; exit 0 running, 3 stopped,
#                                   1 partly running
#
# Must run as root (it installs packages, writes /etc/hosts, runs munged as user munge).
# Non-interactive: safe in CI (no stdin).
#
# Two `slurmd -N n1` / `slurmd -N n2` share this host, each with its own port, spool dir,
# log and pid file (the config's %n); both have NodeAddr=127.0.0.1. Everything else lives in
# one state directory, ALBEF_SLURM_DIR (default /tmp/albef-slurm):
#
#   etc/slurm.conf        the config (clients need SLURM_CONF pointing at it: see env.sh)
#   etc/task_prolog.sh    TaskProlog: gives every task (batch script included) its node's
#                         TMPDIR and ALBEF_LOCAL_CACHE
#   env.sh                `source` it to use the cluster: SLURM_CONF and the variables below
#   munge/                munge key, socket, log, pid and seed (our own munged, its own socket)
#   state/ctld            StateSaveLocation (wiped at each start: every start is a fresh cluster)
#   state/slurmd/nN       SlurmdSpoolDir per node
#   log/                  slurmctld.log, slurmd.n1.log, slurmd.n2.log
#   run/                  pid files of the 4 daemons
#   node/nN/tmp           per-node scratch (TMPDIR inside jobs on node nN)
#   node/nN/cache         per-node local cache (ALBEF_LOCAL_CACHE inside jobs on node nN,
#                         e.g. the streaming local cache); kept across jobs and requeues
#
# Settings worth knowing (all explicit in the generated slurm.conf):
#   JobRequeue=1        batch jobs are requeueable by default (`scontrol requeue` works)
#   KillWait=30         seconds between SIGTERM and SIGKILL when a job/step is cancelled,
#                       requeued, preempted or hits its time limit: SLURM's default, kept so
#                       the save-on-SIGTERM path is tested against the real budget
#   ReturnToService=2   a node that was DOWN comes back as soon as its slurmd registers
#   SlurmdParameters=config_overrides
#                       never drain a node because its configured CPUs/memory exceed what
#                       slurmd detects (both "nodes" share the host's cores)
#   Requeue delay       a requeued job waits about 120 s (AuthInfo cred_expire default)
#                       before it may start again; tests skip it with
#                       `scontrol update jobid=JOB starttime=now`.
#
# Environment knobs (all optional):
#   ALBEF_SLURM_DIR           state dir (default /tmp/albef-slurm)
#   ALBEF_SLURM_CPUS          CPUs per node (default: what `slurmd -C` detects, 2 here)
#   ALBEF_SLURM_MEM_MB        RealMemory per node in MB (default: detected / 2)
#   ALBEF_SLURMCTLD_PORT      slurmctld port (default 16817)
#   ALBEF_SLURMD_PORT_BASE    slurmd ports are BASE+1, BASE+2 (default 17000)
#   ALBEF_SLURM_START_TIMEOUT seconds to wait for both nodes idle (default 60)
#   ALBEF_SLURM_NO_INSTALL=1  never call apt-get (fail if the daemons are missing)
set -euo pipefail

DIR="${ALBEF_SLURM_DIR:-/tmp/albef-slurm}"
NODES=(n1 n2)
PARTITION=debug
CTLD_PORT="${ALBEF_SLURMCTLD_PORT:-16817}"
SLURMD_PORT_BASE="${ALBEF_SLURMD_PORT_BASE:-17000}"
START_TIMEOUT="${ALBEF_SLURM_START_TIMEOUT:-60}"
CONF="$DIR/etc/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
HOSTS_TAG="# albef-ds local slurm cluster"

log() { echo "[local_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# daemon name -> pid file
pidfile_of() {
    case "$1" in
        munged) echo "$MUNGE_DIR/munged.pid" ;;
        slurmctld) echo "$DIR/run/slurmctld.pid" ;;
        slurmd.*) echo "$DIR/run/$1.pid" ;;  # slurmd.n1 -> SlurmdPidFile with %n
        *) die "unknown daemon $1" ;;
    esac
}
# daemon name -> executable name as shown in /proc/PID/comm
comm_of() { case "$1" in slurmd.*) echo slurmd ;; *) echo "$1" ;; esac; }
DAEMONS=(munged slurmctld "${NODES[@]/#/slurmd.}")

# Prints the pid of a daemon if its pid file names a live process of the right program.
live_pid() {
    local name="$1" pf pid comm
    pf="$(pidfile_of "$name")"
    [[ -s "$pf" ]] || return 1
    pid="$(tr -dc '0-9' 2>/dev/null <"$pf")" || return 1  # gone: the daemon exited
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    [[ "$comm" == "$(comm_of "$name")" ]] || return 1
    # A zombie is dead for our purposes.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]] || return 1
    echo "$pid"
}

slurm_env() { SLURM_CONF="$CONF" "$@"; }

require_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (installs packages, edits /etc/hosts, runs munged as user munge)"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]})) || return 0
    [[ "${ALBEF_SLURM_NO_INSTALL:-0}" != 1 ]] || die "missing ${missing[*]} and ALBEF_SLURM_NO_INSTALL=1"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} with apt-get"
    # Keep the packages' init scripts from starting system-wide daemons during install.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Options::=--force-confdef
               -o Dpkg::Options::=--force-confold install --no-install-recommends)
    local rc=0
    "${apt[@]}" "${missing[@]}" </dev/null >&2 || rc=$?
    if ((rc)); then
        log "apt-get install failed (rc=$rc); running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get -q update </dev/null >&2 || true
        rc=0
        "${apt[@]}" "${missing[@]}" </dev/null >&2 || rc=$?
    fi
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
    for exe in slurmctld slurmd sinfo munged; do
        command -v "$exe" >/dev/null || die "$exe still missing after install"
    done
}

ensure_hosts() {
    local n ok=1
    for n in "${NODES[@]}"; do
        [[ "$(getent ahostsv4 "$n" 2>/dev/null | awk 'NR==1{print $1}')" == 127.0.0.1 ]] || ok=0
    done
    ((ok)) && return 0
    if grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
        die "/etc/hosts has our line but ${NODES[*]} do not resolve to 127.0.0.1: check /etc/hosts"
    fi
    log "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
    printf '127.0.0.1 %s %s\n' "${NODES[*]}" "$HOSTS_TAG" >>/etc/hosts
}

detect_hw() {
    # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
    local line
    line="$(slurmd -C 2>/dev/null | head -n1)" || true
    DET_CPUS="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$line")"
    DET_MEM="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$line")"
    [[ -n "$DET_CPUS" ]] || DET_CPUS="$(nproc)"
    [[ -n "$DET_MEM" ]] || DET_MEM=4000
}

write_config() {
    local host cpus mem
    host="$(hostname)"
    detect_hw
    cpus="${ALBEF_SLURM_CPUS:-$DET_CPUS}"
    mem="${ALBEF_SLURM_MEM_MB:-$((DET_MEM / 2))}"
    ((mem >= 500)) || mem=500
    mkdir -p "$DIR/etc" "$DIR/log" "$DIR/run" "$DIR/state/ctld"
    local n
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/state/slurmd/$n" "$DIR/node/$n/tmp" "$DIR/node/$n/cache"
    done
    chmod 1777 "$DIR"/node/*/tmp
    # Every start is a fresh cluster: no jobs recovered from an earlier run.
    rm -rf "${DIR:?}/state/ctld/"* "${DIR:?}/state/slurmd/"*/*
    # ...and fresh logs (the previous run's are kept as *.prev).
    local f
    for f in "$DIR"/log/*.log "$MUNGE_DIR/munged.log"; do
        [[ -f "$f" ]] && mv -f "$f" "$f.prev"
    done

    cat >"$DIR/etc/task_prolog.sh" <<EOF
#!/bin/sh
# TaskProlog: lines 'export NAME=VALUE' set the task's environment (runs for every task,
# the batch script included, on the node that runs it).
node="\${SLURMD_NODENAME:-unknown}"
echo "export TMPDIR=$DIR/node/\$node/tmp"
echo "export ALBEF_LOCAL_CACHE=$DIR/node/\$node/cache"
echo "export ALBEF_NODE_DIR=$DIR/node/\$node"
EOF
    chmod 755 "$DIR/etc/task_prolog.sh"

    {
        echo "# Generated by slurm/local_cluster.sh on $(date -u +%FT%TZ): 2 nodes on host $host."
        echo "ClusterName=albeflocal"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$MUNGE_SOCKET"
        echo "StateSaveLocation=$DIR/state/ctld"
        echo "SlurmdSpoolDir=$DIR/state/slurmd/%n"
        echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/run/slurmd.%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd.%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "TaskProlog=$DIR/etc/task_prolog.sh"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SchedulerType=sched/backfill"
        echo "MpiDefault=none"
        echo "MailProg=/bin/true"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "# Requeue/preemption behaviour, explicit for the tests:"
        echo "JobRequeue=1"
        echo "# SIGTERM -> SIGKILL grace on cancel/requeue/preemption/time limit (SLURM default 30 s)."
        echo "KillWait=30"
        echo "ReturnToService=2"
        echo "SlurmdParameters=config_overrides"
        echo "SlurmdTimeout=300"
        echo "InactiveLimit=0"
        echo "MinJobAge=300"
        local i=0
        for n in "${NODES[@]}"; do
            i=$((i + 1))
            echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((SLURMD_PORT_BASE + i))" \
                 "CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"

    {
        echo "# Generated by slurm/local_cluster.sh: source it to use the local cluster."
        echo "export ALBEF_SLURM_DIR=$DIR"
        echo "export SLURM_CONF=$CONF"
        echo "export ALBEF_SLURM_NODES=\"${NODES[*]}\""
        echo "export ALBEF_SLURM_PARTITION=$PARTITION"
        echo "export ALBEF_SLURM_CPUS_PER_NODE=$cpus"
        echo "# Per-node scratch: \$ALBEF_SLURM_NODE_ROOT/<node>/tmp and <node>/cache. Inside a job,"
        echo "# TaskProlog sets TMPDIR, ALBEF_LOCAL_CACHE and ALBEF_NODE_DIR to the running node's."
        echo "export ALBEF_SLURM_NODE_ROOT=$DIR/node"
        for n in "${NODES[@]}"; do
            local up="${n^^}"
            echo "export ALBEF_SLURM_${up}_TMPDIR=$DIR/node/$n/tmp"
            echo "export ALBEF_SLURM_${up}_CACHE=$DIR/node/$n/cache"
        done
    } >"$DIR/env.sh"
}

start_munge() {
    if live_pid munged >/dev/null; then return 0; fi
    id munge >/dev/null 2>&1 || die "user munge missing (the munge package creates it)"
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"   # clients (slurm, any user) must reach the socket
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    runuser -u munge -- test -x "$MUNGE_DIR" ||
        die "user munge cannot reach $MUNGE_DIR: make every parent of ALBEF_SLURM_DIR=$DIR traversable (chmod o+x)"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MUNGE_DIR/munged.pid"
    log "starting munged"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --log-file="$MUNGE_DIR/munged.log" --pid-file="$MUNGE_DIR/munged.pid" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null 9>&- ||
        { show_logs; die "munged failed to start"; }
    wait_pid munged 10 || { show_logs; die "munged wrote no pid file"; }
    local t
    for t in $(seq 1 50); do
        munge -n --socket="$MUNGE_SOCKET" </dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    show_logs
    die "munge round trip failed on $MUNGE_SOCKET"
}

# wait until the daemon's pid file names a live process
wait_pid() {
    local name="$1" timeout="$2" i
    for i in $(seq 1 $((timeout * 10))); do
        live_pid "$name" >/dev/null && return 0
        sleep 0.1
    done
    return 1
}

show_logs() {
    local f
    for f in "$MUNGE_DIR/munged.log" "$DIR/log/slurmctld.log" "$DIR"/log/slurmd.*.log; do
        [[ -f "$f" ]] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2 || true
    done
    if live_pid slurmctld >/dev/null; then
        echo "----- sinfo / scontrol show node -----" >&2
        slurm_env sinfo -N -l >&2 2>&1 || true
        slurm_env scontrol show node >&2 2>&1 || true
    fi
}

fail_start() {
    log "ERROR: $*"
    show_logs
    log "stopping what was started"
    do_stop || true
    exit 1
}

do_start() {
    require_root
    install_packages
    if live_pid slurmctld >/dev/null && live_pid "slurmd.${NODES[0]}" >/dev/null; then
        log "already running in $DIR"
        wait_idle || fail_start "running cluster's nodes are not idle"
        return 0
    fi
    # Leftovers from a half-started cluster in this dir: stop them first.
    do_stop >/dev/null 2>&1 || true
    ensure_hosts
    mkdir -p "$DIR"
    chmod 0755 "$DIR"
    write_config
    start_munge
    log "starting slurmctld"
    slurmctld -f "$CONF" </dev/null 9>&- || fail_start "slurmctld failed to start"
    wait_pid slurmctld 15 || fail_start "slurmctld did not come up"
    local n
    for n in "${NODES[@]}"; do
        log "starting slurmd -N $n"
        slurmd -f "$CONF" -N "$n" </dev/null 9>&- || fail_start "slurmd -N $n failed to start"
    done
    for n in "${NODES[@]}"; do
        wait_pid "slurmd.$n" 15 || fail_start "slurmd -N $n did not come up"
    done
    wait_idle || fail_start "nodes not idle within ${START_TIMEOUT}s"
    log "cluster up in $DIR: $(slurm_env sinfo -h -o '%P %t %N' | tr '\n' ' ')"
    log "use it with: source $DIR/env.sh"
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) states
    while ((SECONDS < deadline)); do
        states="$(slurm_env sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
        local all_idle=1 n
        for n in "${NODES[@]}"; do
            grep -qE "^$n idle\$" <<<"$states" || all_idle=0
        done
        ((all_idle)) && return 0
        if grep -qE ' (drain|drng|drained|fail)' <<<"$states"; then
            log "node drained/failed: $states"
            return 1
        fi
        sleep 0.3
    done
    log "last sinfo: $(tr '\n' ';' <<<"${states:-}")"
    return 1
}

# This cluster's step daemons (slurmstepd, they outlive slurmd): they keep the node's
# slurmd log open under $DIR/log (and run with it as their cwd).
ours_stepds() {
    local p
    for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
        if [[ "$(readlink "/proc/$p/cwd" 2>/dev/null)" == "$DIR/log" ]] ||
            find "/proc/$p/fd" -maxdepth 1 -lname "$DIR/log/*" 2>/dev/null | grep -q .; then
            echo "$p"
        fi
    done
    return 0
}

do_stop() {
    require_root
    local name pid
    # Cancel this cluster's jobs so that their steps end before the daemons go.
    if live_pid slurmctld >/dev/null && [[ -f "$CONF" ]]; then
        local jobs
        jobs="$(slurm_env squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)"
        if [[ -n "${jobs// /}" ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            slurm_env scancel $jobs 2>/dev/null || true
            local i
            for i in $(seq 1 50); do
                [[ -z "$(slurm_env squeue -h -o %A 2>/dev/null)" && -z "$(ours_stepds)" ]] && break
                sleep 0.1
            done
        fi
    fi
    # slurmd first, then slurmctld, munged last (the others authenticate through it).
    for name in "${NODES[@]/#/slurmd.}" slurmctld munged; do
        pid="$(live_pid "$name")" || { rm -f "$(pidfile_of "$name")"; continue; }
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for i in $(seq 1 100); do
            live_pid "$name" >/dev/null || break
            sleep 0.1
        done
        if live_pid "$name" >/dev/null; then
            log "$name did not exit on SIGTERM in 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    done
    # Step daemons whose jobs did not end (they outlive slurmd).
    if [[ -n "$(ours_stepds)" ]]; then
        log "killing leftover slurmstepd: $(ours_stepds | tr '\n' ' ')"
        # shellcheck disable=SC2046
        kill -TERM $(ours_stepds) 2>/dev/null || true
        sleep 1
        # shellcheck disable=SC2046
        kill -KILL $(ours_stepds) 2>/dev/null || true
        sleep 0.5
    fi
    # Verify.
    local left=()
    for name in "${DAEMONS[@]}"; do
        if pid="$(live_pid "$name")"; then left+=("$name:$pid"); else rm -f "$(pidfile_of "$name")"; fi
    done
    for pid in $(ours_stepds); do left+=("slurmstepd:$pid"); done
    if ((${#left[@]})); then
        log "ERROR: still running after stop: ${left[*]}"
        return 1
    fi
    log "stopped (state dir $DIR kept)"
}

do_status() {
    local name pid up=0 total=0
    for name in "${DAEMONS[@]}"; do
        total=$((total + 1))
        if pid="$(live_pid "$name")"; then
            echo "$name running pid $pid"
            up=$((up + 1))
        else
            echo "$name stopped"
        fi
    done
    if live_pid slurmctld >/dev/null; then
        slurm_env sinfo -N -o '%N %P %t %c' 2>&1 || true
    fi
    ((up == total)) && return 0
    ((up == 0)) && return 3
    return 1
}

# start and stop of one state dir never overlap (concurrent callers wait their turn).
lock() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 300 9 || die "could not lock $DIR/.lock in 300 s"
}

case "${1:-}" in
    start) require_root; lock; do_start ;;
    stop) require_root; lock; do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 start|stop|status   (state dir: ALBEF_SLURM_DIR, default /tmp/albef-slurm)" >&2; exit 2 ;;
esac
