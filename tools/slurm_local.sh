#!/usr/bin/env bash
# SLURM on this one machine, for development and tests:
#
#   tools/slurm_local.sh start [--nodes 1|2]   (default 1)
#   tools/slurm_local.sh stop | status
#
#   start   install slurm-wlm + munge if missing (apt-get), create the munge key, start
#           munged (unless one already answers), write /etc/slurm/slurm.conf, start
#           slurmctld and the slurmd(s), resume the node(s) and wait until `sinfo` shows
#           them idle. Safe to run twice: a running cluster of ours of the same shape is
#           kept; one of the other shape is stopped first (refused while it has jobs).
#     --nodes 1   one node named after this host (`hostname -s`), all CPUs.
#     --nodes 2   two nodes, node1 and node2, that SLURM, MPI and the trainer see as two
#                 hosts (see "Two nodes" below); each has all CPUs of the machine.
#   stop    kill exactly the daemons that `start` recorded (by pid), munged only if we
#           started it; in two-node mode also every process left in the nodes'
#           namespaces (job steps the slurmds started), which takes their mounts with them.
#   status  print the recorded daemons and whether each is alive, then `sinfo`.
#
# Must run as root (it installs packages, writes /etc/slurm and runs the daemons as root).
# Everything of ours lives under $HPC_SPARSE_SLURM_DIR (default /var/tmp/hpc_sparse_slurm):
#   state/ spool/ log/ run/ nodes/, mode (1 or 2) and daemons.pids ("name pid" per line:
#   the only daemons `stop` kills; in two-node mode also "ns-nodeN uts:[...]", each node's
#   namespace, and the boot id they belong to).
# Environment knobs: HPC_SPARSE_SLURM_DIR, HPC_SPARSE_SLURM_TIMEOUT (seconds to wait for
# the nodes to become idle, default 60), HPC_SPARSE_SLURM_CRED_EXPIRE (seconds; a requeued
# job may start again only after the job credential expired, default 30; slurm's own 120),
# HPC_SPARSE_SLURM_KEEP_JOBS=1 (keep, rather than cancel, jobs that a fresh start finds in
# the saved state, e.g. from a session that ended mid-test).
#
# What made this work on Debian 12 / slurm-wlm 22.05 in VMs without systemd or cgroups:
# SlurmUser=root, auth/munge, proctrack/linuxproc, task/none, select/cons_tres.
#
# Two nodes: each slurmd runs in its own UTS and mount namespace (`unshare --uts --mount`):
#   - `hostname nodeN` there, so slurmd, the job steps it starts (they inherit its
#     namespaces), MPI and the trainer all see the host name nodeN: MPI groups ranks by
#     host name, so ranks on node1 and node2 are on different "nodes" for it, talk through
#     its network path and get a node-local size of 1 from Split_type(COMM_TYPE_SHARED);
#   - a hosts file bind-mounted over /etc/hosts maps node1 and node2 to 127.0.0.1;
#   - $BASE/node-local is, on each node, that node's own folder $BASE/nodes/nodeN/local
#     (a bind mount): a path that every node has but with different contents, as a
#     node-local disk would (tests put a run dir there to simulate one that is not shared).
#   slurm.conf gives each node NodeHostname=nodeN, NodeAddr=127.0.0.1 and its own Port,
#   and %n in the slurmd spool, pid and log paths. Everything goes over the loopback
#   address: SLURM's RPCs (NodeAddr, SlurmctldHost), and MPI's traffic, which a TaskProlog
#   sends through libfabric's tcp provider on `lo` for every task (see prepare_nodes).
#   The namespaces are unnamed (nothing is mounted in the host's namespace): they and
#   their mounts disappear with their last process, and `stop` ends those processes.
#   Why not `slurmd -N nodeN` on the host: the slurmds would then share this machine's
#   host name, so MPI (hydra, MPI_Get_processor_name, Split_type) and the trainer would
#   see one host, and the multi-node path would not be exercised.
set -euo pipefail

BASE=${HPC_SPARSE_SLURM_DIR:-/var/tmp/hpc_sparse_slurm}
PIDS="$BASE/daemons.pids"
CONF=/etc/slurm/slurm.conf
MARK="# written by hpc_sparse tools/slurm_local.sh"
TIMEOUT=${HPC_SPARSE_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${HPC_SPARSE_SLURM_CRED_EXPIRE:-30}
MODE_FILE="$BASE/mode"
HOST=$(hostname -s)
NODE_LOCAL="$BASE/node-local"
NNODES=1          # set by `start --nodes N`, or read from $MODE_FILE
NODES=("$HOST")   # the node names of the cluster

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

set_nodes() {  # set_nodes N: NNODES and NODES for a cluster of N nodes
    NNODES=$1
    if [ "$NNODES" = 1 ]; then NODES=("$HOST"); else NODES=(node1 node2); fi
}

recorded_mode() { [ -f "$MODE_FILE" ] && cat "$MODE_FILE" || echo 1; }

daemon_names() {  # the recorded daemon names of our cluster, in the order to stop them
    local n
    if [ "$NNODES" = 1 ]; then echo slurmd; else for n in "${NODES[@]}"; do echo "slurmd-$n"; done; fi
    echo slurmctld
}

comm_of() { echo "${1%%-*}"; }  # process name of a recorded daemon: slurmd-node1 -> slurmd

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
    local slurmd_files node_lines port=17001 n prolog=""
    if [ "$NNODES" = 1 ]; then
        slurmd_files="SlurmdSpoolDir=$BASE/spool
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmdLogFile=$BASE/log/slurmd.log"
        node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    else
        # %n: the node's name; one spool, pid file and log per slurmd
        slurmd_files="SlurmdSpoolDir=$BASE/spool/%n
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmdLogFile=$BASE/log/slurmd-%n.log"
        node_lines=""
        for n in "${NODES[@]}"; do
            [ -z "$node_lines" ] || node_lines+=$'\n'
            node_lines+="NodeName=$n NodeHostname=$n NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem State=UNKNOWN"
            port=$(( port + 1 ))
        done
        prolog="# Pins MPI's traffic between the nodes to the loopback interface.
TaskProlog=$BASE/task_prolog.sh"
    fi
    cat > "$CONF.tmp" <<EOF
$MARK ($NNODES-node development cluster: ${NODES[*]})
ClusterName=hpcsparse
# Everything talks over the loopback address, whatever the hostname resolves to.
SlurmctldHost=$HOST(127.0.0.1)
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
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
$slurmd_files
SlurmctldDebug=info
SlurmdDebug=info
$prolog
$node_lines
PartitionName=local Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    say "wrote $CONF (nodes ${NODES[*]}, CPUs=$cpus, RealMemory=$mem MiB each)"
}

# Two-node mode: each node's hosts file and node-local folder, and the TaskProlog.
prepare_nodes() {
    local n
    mkdir -p "$NODE_LOCAL"
    for n in "${NODES[@]}"; do
        mkdir -p "$BASE/nodes/$n/local" "$BASE/spool/$n"
        # ours first: the first line that names a host wins
        { echo "127.0.0.1 ${NODES[*]}"; cat /etc/hosts; } > "$BASE/nodes/$n/hosts"
    done
    # Lines "export NAME=VALUE" printed by a TaskProlog go into the environment of every
    # task, the batch shell included (so mpiexec and the ranks it starts have them too).
    # MPICH's network path between the nodes: libfabric's tcp provider on `lo` (a TCP
    # connection per pair of ranks on different nodes). Not UCX, MPICH's default: it sees
    # through the namespaces (same machine id), picks shared memory between node1 and
    # node2, and refuses tcp on `lo` between them. Hydra's own sockets: `lo` too.
    cat > "$BASE/task_prolog.sh" <<'EOF'
#!/bin/sh
echo "export MPIR_CVAR_CH4_NETMOD=ofi"
echo "export FI_PROVIDER=tcp"
echo "export FI_TCP_IFACE=lo"
echo "export HYDRA_IFACE=lo"
echo "export UCX_NET_DEVICES=lo"
EOF
    chmod 755 "$BASE/task_prolog.sh"
}

# start_node_slurmd NODE: slurmd for NODE in new UTS + mount namespaces (see the header).
# --propagation slave: mounts made on the host later (e.g. a tmpfs) are seen on the
# nodes, the nodes' own bind mounts never reach the host.
start_node_slurmd() {
    local node=$1 name="slurmd-$1" pid
    pid=$(recorded_pid "$name")
    if alive "$pid" slurmd; then say "$name already running (pid $pid)"; return 0; fi
    rm -f "$BASE/run/$name.pid"
    say "starting $name (host name $node, own UTS + mount namespace)"
    unshare --uts --mount --propagation slave -- /bin/sh -ec '
        hostname "$1"
        mount --bind "$2/nodes/$1/hosts" /etc/hosts
        mount --bind "$2/nodes/$1/local" "$3"
        exec /usr/sbin/slurmd -f "$4"' sh "$node" "$BASE" "$NODE_LOCAL" "$CONF" \
        >>"$BASE/log/$name.stdout" 2>&1 \
        || die "$name failed to start; see $BASE/log/$name.log and $BASE/log/$name.stdout"
    pid=$(wait_pidfile "$BASE/run/$name.pid" 15) \
        || die "$name did not stay up; see $BASE/log/$name.log"
    record "$name" "$pid"
    record "ns-$node" "$(readlink "/proc/$pid/ns/uts")"
    record boot "$(cat /proc/sys/kernel/random/boot_id)"
}

# pids of every process in NODE's UTS namespace (as recorded at start; none if unknown,
# or if the machine rebooted since: namespace numbers are reused)
ns_pids() {
    local ns p
    ns=$(recorded_pid "ns-$1")
    [ -n "$ns" ] || return 0
    [ "$(recorded_pid boot)" = "$(cat /proc/sys/kernel/random/boot_id)" ] || return 0
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/ns/uts" 2>/dev/null)" = "$ns" ] && echo "${p#/proc/}"
    done
    return 0
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

node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n 1; }

wait_idle() {  # every node of NODES up (idle, or running jobs)
    local st="" node deadline=$(( $(date +%s) + TIMEOUT ))
    for node in "${NODES[@]}"; do
        while :; do
            st=$(node_state "$node" || true)
            case "$st" in
                idle|mixed|allocated|completing) say "node $node is $st"; break ;;
                down*|drain*|fail*)
                    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
            esac
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "slurm_local: ERROR: node $node not idle after ${TIMEOUT}s (state: '${st:-no answer}')." >&2
                echo "  see the logs in $BASE/log; last lines:" >&2
                tail -n 5 "$BASE"/log/slurm*.log >&2 2>/dev/null || true
                exit 1
            fi
            sleep 1
        done
    done
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
    local want=$1 have name p other
    mkdir -p "$BASE/state" "$BASE/spool" "$BASE/log" "$BASE/run"
    ensure_packages
    ensure_munge
    have=$(recorded_mode)
    set_nodes "$have"
    if cluster_running && [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        if [ "$have" = "$want" ]; then
            say "already running: $(running_summary)"
            wait_idle
            return 0
        fi
        if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
            die "a $have-node cluster of ours is running with jobs in the queue; wait for them or" \
                "run '$0 stop', then start --nodes $want"
        fi
        say "a $have-node cluster of ours is running: stopping it to start $want node(s)"
    fi
    # a half-started or other-shaped cluster of ours: stop what is left, then start afresh
    cmd_stop quiet
    set_nodes "$want"
    for other in $(pgrep -x slurmctld; pgrep -x slurmd); do
        alive "$other" && die "a slurmctld/slurmd that this script did not start is running" \
            "(pid $other); stop it first"
    done
    if [ "$have" != "$want" ] && [ -d "$BASE/state" ]; then
        say "switching from $have to $want node(s): clearing the saved state (jobs, node records)"
        rm -rf "$BASE/state"
        mkdir -p "$BASE/state"
    fi
    echo "$want" > "$MODE_FILE"
    write_conf
    start_daemon slurmctld
    cancel_leftovers
    if [ "$NNODES" = 1 ]; then
        start_daemon slurmd
    else
        prepare_nodes
        for name in "${NODES[@]}"; do start_node_slurmd "$name"; done
    fi
    for name in "${NODES[@]}"; do
        scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
    done
    wait_idle
    say "ready: ${NNODES} node(s) ${NODES[*]}; pids in $PIDS, logs in $BASE/log"
}

cluster_running() {  # every daemon of the recorded shape alive
    local name
    for name in $(daemon_names); do
        alive "$(recorded_pid "$name")" "$(comm_of "$name")" || return 1
    done
}

running_summary() {
    local name out=""
    for name in $(daemon_names); do out+="$name $(recorded_pid "$name"), "; done
    echo "${out%, }"
}

stop_pid() {  # stop_pid NAME PID COMM: TERM, up to 10 s, then KILL
    local name=$1 pid=$2 comm=$3
    if alive "$pid" "$comm"; then
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
        if alive "$pid"; then say "$name ignored TERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
    else
        [ "${QUIET:-}" = quiet ] || say "$name (pid $pid) was not running"
    fi
}

# cmd_stop [quiet]: the recorded daemons of either shape; then, in two-node mode, every
# process still in a node's namespace (job steps its slurmd started), so that the
# namespaces and the mounts made in them go away.
cmd_stop() {
    local QUIET=${1:-} name pid node left
    if [ ! -f "$PIDS" ]; then
        [ "$QUIET" = quiet ] || say "nothing recorded in $PIDS; nothing to stop"
        return 0
    fi
    for name in $(awk '$1 ~ /^slurmd/ { print $1 }' "$PIDS") slurmctld munged; do
        pid=$(recorded_pid "$name")
        [ -n "$pid" ] || continue
        [ "$name" = munged ] && [ "$QUIET" = quiet ] && continue  # a restart keeps munged
        stop_pid "$name" "$pid" "$(comm_of "$name")"
    done
    for node in $(awk '$1 ~ /^ns-/ { sub(/^ns-/, "", $1); print $1 }' "$PIDS"); do
        left=$(ns_pids "$node" | tr '\n' ' ')
        if [ -n "${left// /}" ]; then
            say "ending the processes left in $node's namespace: $left"
            # shellcheck disable=SC2086
            kill -TERM $left 2>/dev/null || true
            for _ in $(seq 50); do [ -z "$(ns_pids "$node")" ] && break; sleep 0.2; done
            left=$(ns_pids "$node" | tr '\n' ' ')
            # shellcheck disable=SC2086
            [ -z "${left// /}" ] || kill -KILL $left 2>/dev/null || true
        fi
        for _ in $(seq 25); do [ -z "$(ns_pids "$node")" ] && break; sleep 0.2; done
        [ -z "$(ns_pids "$node")" ] || die "processes remain in $node's namespace: $(ns_pids "$node" | tr '\n' ' ')"
        say "namespace of $node gone (its hosts file and node-local mounts with it)"
        grep -v "^ns-$node " "$PIDS" > "$PIDS.tmp" || true
        mv "$PIDS.tmp" "$PIDS"
    done
    if [ "$QUIET" = quiet ]; then  # keep munged's record for the restart
        awk '$1 == "munged"' "$PIDS" > "$PIDS.tmp" || true
        mv "$PIDS.tmp" "$PIDS"
        return 0
    fi
    rm -f "$PIDS"
    say "stopped"
}

cmd_status() {
    local name pid any=0 node
    set_nodes "$(recorded_mode)"
    for name in munged slurmctld $(awk '$1 ~ /^slurmd/ { print $1 }' "$PIDS" 2>/dev/null); do
        pid=$(recorded_pid "$name")
        [ -n "$pid" ] || continue
        any=1
        if alive "$pid" "$(comm_of "$name")"; then echo "$name pid $pid running"; else echo "$name pid $pid DEAD"; fi
    done
    for node in $(awk '$1 ~ /^ns-/ { sub(/^ns-/, "", $1); print $1 }' "$PIDS" 2>/dev/null); do
        echo "$node: namespace $(recorded_pid "ns-$node"), $(ns_pids "$node" | wc -l) process(es)"
    done
    [ "$any" = 1 ] || echo "no daemons recorded in $PIDS"
    if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then
        sinfo -N -o '%N %T %c %m %P'
    else
        echo "sinfo: controller not reachable"
        return 1
    fi
}

usage() { echo "usage: $0 start [--nodes 1|2] | stop | status" >&2; exit 2; }

case "${1:-}" in
    start)
        nodes=1
        case "${2:-}" in
            "") ;;
            --nodes) nodes=${3:-}; [ $# = 3 ] || usage ;;
            --nodes=*) nodes=${2#--nodes=}; [ $# = 2 ] || usage ;;
            *) usage ;;
        esac
        [ "$nodes" = 1 ] || [ "$nodes" = 2 ] || die "--nodes must be 1 or 2 (got '$nodes')"
        cmd_start "$nodes" ;;
    stop) [ $# = 1 ] || usage; cmd_stop ;;
    status) [ $# = 1 ] || usage; cmd_status ;;
    *) usage ;;
esac
