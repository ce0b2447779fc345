#!/usr/bin/env bash
# Single-node SLURM for development and tests: tools/slurm_local.sh start|stop|status
#
#   start   install slurm-wlm + munge if missing (apt-get), create the munge key,
#           start munged (unless one already answers), write /etc/slurm/slurm.conf for
#           this one node, start slurmctld + slurmd, resume the node and wait until
#           `sinfo` shows it idle. Safe to run twice: a running cluster of ours is kept.
#   stop    kill exactly the daemons that `start` recorded (by pid), munged only if we
#           started it.
#   status  print the recorded daemons and whether each is alive, then `sinfo`.
#
# Must run as root (it installs packages, writes /etc/slurm and runs the daemons as root).
# Everything of ours lives under $HPC_SPARSE_SLURM_DIR (default /var/tmp/hpc_sparse_slurm):
#   state/ spool/ log/ run/ and daemons.pids ("name pid" per line, the only pids `stop` kills).
# Environment knobs: HPC_SPARSE_SLURM_DIR, HPC_SPARSE_SLURM_TIMEOUT (seconds to wait for
# the node to become idle, default 60), HPC_SPARSE_SLURM_CRED_EXPIRE (seconds; a requeued
# job may start again only after the job credential expired, default 30; slurm's own 120),
# HPC_SPARSE_SLURM_KEEP_JOBS=1 (keep, rather than cancel, jobs that a fresh start finds in
# the saved state, e.g. from a session that ended mid-test).
#
# What made this work on Debian 12 / slurm-wlm 22.05 in VMs without systemd or cgroups:
# SlurmUser=root, auth/munge, proctrack/linuxproc, task/none, select/cons_tres.
set -euo pipefail

BASE=${HPC_SPARSE_SLURM_DIR:-/var/tmp/hpc_sparse_slurm}
PIDS="$BASE/daemons.pids"
CONF=/etc/slurm/slurm.conf
MARK="# written by hpc_sparse tools/slurm_local.sh"
TIMEOUT=${HPC_SPARSE_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${HPC_SPARSE_SLURM_CRED_EXPIRE:-30}
NODE=$(hostname -s)

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: ERROR: $*" >&2; exit 1; }

# alive PID [NAME]: running (not a zombie) and, if NAME is given, its command is NAME.
# The name check guards against a pid reused after a reboot (/var/tmp survives one).
alive() {
    local pid=${1:-} name=${2:-} st
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    st=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$st" != Z ] && [ "$st" != X ] || return 1
    [ -z "$name" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

recorded_pid() {  # recorded_pid NAME -> pid or empty
    [ -f "$PIDS" ] || return 0
    awk -v n="$1" '$1 == n { print $2 }' "$PIDS" | tail -n 1
}

record() {  # record NAME PID
    mkdir -p "$BASE"
    { [ -f "$PIDS" ] && grep -v "^$1 " "$PIDS" || true; echo "$1 $2"; } > "$PIDS.tmp"
    mv "$PIDS.tmp" "$PIDS"
}

wait_pidfile() {  # wait_pidfile FILE SECONDS -> prints the pid once the process is alive
    local f=$1 n=$(( $2 * 5 )) pid
    for _ in $(seq "$n"); do
        if [ -s "$f" ]; then
            pid=$(tr -dc '0-9' < "$f")
            if alive "$pid"; then echo "$pid"; return 0; fi
        fi
        sleep 0.2
    done
    return 1
}

ensure_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and we are not root to install them"
    say "installing slurm-wlm and munge (apt-get)..."
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q slurm-wlm munge >"$BASE/log/apt.log" 2>&1; then
        say "apt-get install failed; running apt-get update and trying again"
        apt-get update -q >>"$BASE/log/apt.log" 2>&1 || true
        apt-get install -y -q slurm-wlm munge >>"$BASE/log/apt.log" 2>&1 \
            || die "apt-get install slurm-wlm munge failed; see $BASE/log/apt.log"
    fi
    command -v slurmctld >/dev/null || die "slurmctld still missing after installing slurm-wlm"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        say "creating $key (1024 random bytes)"
        install -d -o munge -g munge -m 0700 /etc/munge
        ( umask 077; dd if=/dev/urandom of="$key" bs=1024 count=1 status=none )
    fi
    chown munge:munge "$key"
    chmod 400 "$key"
    if munge_works; then
        say "munged already running"
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    rm -f /run/munge/munged.pid
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force \
        || die "munged did not start; see /var/log/munge/munged.log"
    local pid
    pid=$(wait_pidfile /run/munge/munged.pid 10) || die "munged wrote no pid file"
    record munged "$pid"
    for _ in $(seq 50); do munge_works && return 0; sleep 0.2; done
    die "munged runs (pid $pid) but munge -n | unmunge fails; see /var/log/munge/munged.log"
}

write_conf() {
    local mem_total margin mem cpus
    mem_total=$(free -m | awk '/^Mem:/ { print $2 }')
    margin=$(( mem_total / 10 > 512 ? mem_total / 10 : 512 ))
    mem=$(( mem_total - margin ))
    cpus=$(nproc)
    mkdir -p /etc/slurm
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        say "keeping a copy of the existing $CONF as $CONF.before-hpc_sparse"
        cp -n "$CONF" "$CONF.before-hpc_sparse"
    fi
    cat > "$CONF.tmp" <<EOF
$MARK (single-node development cluster)
ClusterName=hpcsparse
# Everything talks over the loopback address, whatever the hostname resolves to.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only once its old credential expired (slurm's default 120 s).
AuthInfo=cred_expire=$CRED_EXPIRE
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Rescan pending jobs often: a requeued job becomes eligible after cred_expire and
# should not wait for the default 30-60 s scheduling passes.
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Completed job records stay visible to scontrol for this long (seconds).
MinJobAge=120
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.log
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    say "wrote $CONF (node $NODE, CPUs=$cpus, RealMemory=$mem MiB)"
}

# Jobs saved in state/ by an earlier start (e.g. a session that ended mid-test) would
# run again as soon as slurmd is up and hold the node for minutes: cancel them, before
# slurmd starts, unless HPC_SPARSE_SLURM_KEEP_JOBS=1.
cancel_leftovers() {
    local ids
    for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    ids=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ' || true)
    [ -n "${ids// /}" ] || return 0
    if [ "${HPC_SPARSE_SLURM_KEEP_JOBS:-0}" = 1 ]; then
        say "keeping jobs left from an earlier start: $ids"
        return 0
    fi
    say "cancelling jobs left from an earlier start: $ids(HPC_SPARSE_SLURM_KEEP_JOBS=1 keeps them)"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }

wait_idle() {
    local st="" deadline=$(( $(date +%s) + TIMEOUT ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        st=$(node_state || true)
        case "$st" in
            idle|mixed|allocated|completing) say "node $NODE is $st"; return 0 ;;
            down*|drain*|fail*)
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    echo "slurm_local: ERROR: node $NODE not idle after ${TIMEOUT}s (state: '${st:-no answer}')." >&2
    echo "  see $BASE/log/slurmctld.log and $BASE/log/slurmd.log; last lines:" >&2
    tail -n 5 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 2>/dev/null || true
    exit 1
}

start_daemon() {  # start_daemon NAME
    local name=$1 pid
    pid=$(recorded_pid "$name")
    if alive "$pid" "$name"; then say "$name already running (pid $pid)"; return 0; fi
    rm -f "$BASE/run/$name.pid"
    say "starting $name"
    "/usr/sbin/$name" >>"$BASE/log/$name.stdout" 2>&1 \
        || die "$name failed to start; see $BASE/log/$name.log"
    pid=$(wait_pidfile "$BASE/run/$name.pid" 15) \
        || die "$name did not stay up; see $BASE/log/$name.log"
    record "$name" "$pid"
}

cmd_start() {
    [ "$(id -u)" = 0 ] || die "run as root (it runs the SLURM daemons as root)"
    mkdir -p "$BASE/state" "$BASE/spool" "$BASE/log" "$BASE/run"
    ensure_packages
    ensure_munge
    local ctld slurmd
    ctld=$(recorded_pid slurmctld); slurmd=$(recorded_pid slurmd)
    if alive "$ctld" slurmctld && alive "$slurmd" slurmd && [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        say "already running (slurmctld $ctld, slurmd $slurmd)"
    else
        # a half-started cluster of ours: stop what is left, then start afresh
        for name in slurmd slurmctld; do
            local p; p=$(recorded_pid "$name")
            if alive "$p" "$name"; then say "stopping leftover $name (pid $p)"; kill "$p" || true; fi
        done
        sleep 1
        local other
        for other in $(pgrep -x slurmctld; pgrep -x slurmd); do
            alive "$other" && die "a slurmctld/slurmd that this script did not start is running" \
                "(pid $other); stop it first"
        done
        write_conf
        start_daemon slurmctld
        cancel_leftovers
        start_daemon slurmd
    fi
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_idle
    say "ready: pids in $PIDS, logs in $BASE/log"
}

cmd_stop() {
    if [ ! -f "$PIDS" ]; then say "nothing recorded in $PIDS; nothing to stop"; return 0; fi
    local name pid
    for name in slurmd slurmctld munged; do
        pid=$(recorded_pid "$name")
        [ -n "$pid" ] || continue
        if alive "$pid" "$name"; then
            say "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
            if alive "$pid"; then say "$name ignored TERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
        else
            say "$name (pid $pid) was not running"
        fi
    done
    rm -f "$PIDS"
    say "stopped"
}

cmd_status() {
    local name pid any=0
    for name in munged slurmctld slurmd; do
        pid=$(recorded_pid "$name")
        [ -n "$pid" ] || continue
        any=1
        if alive "$pid" "$name"; then echo "$name pid $pid running"; else echo "$name pid $pid DEAD"; fi
    done
    [ "$any" = 1 ] || echo "no daemons recorded in $PIDS"
    if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then
        sinfo -N -o '%N %T %c %m %P'
    else
        echo "sinfo: controller not reachable"
        return 1
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
