# shellcheck shell=bash
# Shared body of jobs/train.sbatch and jobs/sweep.sbatch. Sourced, not run.
#
# Call `hs_run_training` after setting CONFIG, RUN_DIR and HS_EXTRA_ARGS (array of extra
# CLI arguments). It launches
#     $LAUNCHER ... $PYTHON -m mpi4py -m hpc_sparse train --config $CONFIG \
#         --run-dir $RUN_DIR --resume auto [--set k=v ...]
# in the background, forwards SIGUSR1/SIGTERM that reach this batch shell to the
# launcher once every rank is ready for them (before that it ends the launcher and
# reports 75; see hs_forward), and turns the trainer's exit status into the job's:
#
#   75 (EXIT_REQUEUE: "stopped by a signal after writing a checkpoint")
#        -> `scontrol requeue $SLURM_JOB_ID` (array task: <array id>_<index>), exit 0.
#           The requeued job starts again with the same job id, so the same RUN_DIR,
#           and resumes (--resume auto).
#           Not requeued when this shell itself got SIGTERM (scancel, or preemption,
#           where slurm requeues by itself), when REQUEUE=0 (jobs/chain.sh: the next
#           chunk resumes instead), or outside SLURM; then 75 (or 0 for REQUEUE=0) is
#           the exit status.
#   any other status is passed through.
#
# Knobs (environment, with defaults):
#   LAUNCHER=mpiexec   mpiexec (PyPI MPICH's hydra; under SLURM it starts its proxy with
#                      srun by itself) or srun (runs `srun --mpi=$SRUN_MPI`).
#   SRUN_MPI=pmi2      srun's PMI plugin: pmi2 works with PyPI's MPICH; pmix does not
#                      load on Debian's slurm-wlm (no libpmix); none gives N singletons.
#   PYTHON=python3     interpreter that has hpc_sparse and mpi4py installed.
#   LAUNCHER_ARGS=     extra words for the launcher (e.g. "-genv FOO 1").
#   REQUEUE=1          0: on status 75 exit 0 without requeueing (chunked chains).
#   HPC_SPARSE_THREADS, OMP_NUM_THREADS, NUMBA_NUM_THREADS, ...: default to
#                      SLURM_CPUS_PER_TASK (1 if unset); values already set are kept.

HS_EXIT_REQUEUE=75

hs_log() { echo "[hpc-sparse ${SLURM_JOB_ID:-nojob} $(date '+%F %T')] $*"; }

# hs_words_to_args STRING -> appends to HS_EXTRA_ARGS. Words are split on whitespace
# (no quoting). A bare `section.key=value` word becomes `--set section.key=value`; words
# starting with `-` (and the word after `--set`) are passed on as they are.
hs_words_to_args() {
    local words word after_set=0
    read -r -a words <<< "$1"
    for word in "${words[@]}"; do
        if [ "$after_set" = 1 ]; then HS_EXTRA_ARGS+=("$word"); after_set=0; continue; fi
        case "$word" in
            --set) HS_EXTRA_ARGS+=("$word"); after_set=1 ;;
            -*) HS_EXTRA_ARGS+=("$word") ;;
            *=*) HS_EXTRA_ARGS+=(--set "$word") ;;
            *) HS_EXTRA_ARGS+=("$word") ;;
        esac
    done
}

hs_setup_threads() {
    local n=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$n}
    export NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-$n}
    export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$n}
    export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$n}
    export HPC_SPARSE_THREADS=${HPC_SPARSE_THREADS:-$n}
}

# Trap handler: remember the first signal and act on it. The traps are set first thing
# in hs_run_training, before the launcher's pid is known:
#   - before the launch: the trainer is not started (nothing new to save), status 75;
#   - between the launch and `HS_CHILD=$!`: remembered (HS_PENDING), acted on at once after;
#   - once every rank is ready (HS_READY_FILE exists: the trainer writes it after all ranks
#     installed their stop handlers): passed on to the launcher (mpiexec's hydra and srun
#     both forward SIGUSR1/SIGTERM to every rank), which checkpoints and exits 75;
#   - before that (interpreter start, MPI_Init, handlers not yet installed), a forwarded
#     signal would kill a rank and the job would not be requeued: instead the launcher is
#     ended (SIGTERM) and the status is 75. Nothing was trained since the newest checkpoint.
hs_forward() {
    HS_TRAPPED=1
    HS_SIGNAL=${HS_SIGNAL:-$1}
    if [ -n "$HS_EARLY_STOP" ]; then
        hs_log "batch shell got SIG$1; already ending the launcher"
    elif [ -z "${HS_CHILD:-}" ]; then
        HS_PENDING=$1
        hs_log "batch shell got SIG$1 before the launcher started"
    elif [ -e "$HS_READY_FILE" ]; then
        hs_log "batch shell got SIG$1; forwarding to launcher pid $HS_CHILD"
        kill -s "$1" "$HS_CHILD" 2>/dev/null
    else
        HS_EARLY_STOP=$1
        hs_log "batch shell got SIG$1 before every rank was ready (no $HS_READY_FILE yet):" \
               "ending launcher pid $HS_CHILD; nothing was trained since the newest checkpoint"
        kill -s TERM "$HS_CHILD" 2>/dev/null
    fi
    return 0
}

hs_run_training() {
    HS_SIGNAL="" HS_TRAPPED=0 HS_CHILD="" HS_PENDING="" HS_EARLY_STOP="" HS_READY_FILE=""
    trap 'hs_forward USR1' USR1
    trap 'hs_forward TERM' TERM
    : "${CONFIG:?CONFIG must be set}" "${RUN_DIR:?RUN_DIR must be set}"
    local launcher=${LAUNCHER:-mpiexec} python=${PYTHON:-python3}
    local ntasks=${SLURM_NTASKS:-${NTASKS:-1}}
    local -a launch extra_launch=()
    read -r -a extra_launch <<< "${LAUNCHER_ARGS:-}"
    case "$launcher" in
        mpiexec|*/mpiexec|mpirun|*/mpirun|mpiexec.hydra|*/mpiexec.hydra)
            launch=("$launcher" -n "$ntasks") ;;
        srun|*/srun)
            launch=("$launcher" --mpi="${SRUN_MPI:-pmi2}" --ntasks="$ntasks" --kill-on-bad-exit=1)
            [ -n "${SLURM_CPUS_PER_TASK:-}" ] && launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK") ;;
        *) hs_log "ERROR: LAUNCHER must be mpiexec or srun (got '$launcher')"; return 2 ;;
    esac
    hs_setup_threads
    # Written by the trainer's rank 0 once every rank can take a stop signal; one per start.
    mkdir -p "$RUN_DIR" || { hs_log "ERROR: cannot create RUN_DIR=$RUN_DIR"; return 2; }
    HS_READY_FILE="$(cd "$RUN_DIR" && pwd)/.ready-${SLURM_JOB_ID:-pid$$}-${SLURM_RESTART_COUNT:-0}"
    export HPC_SPARSE_READY_FILE=$HS_READY_FILE
    rm -f "$HS_READY_FILE"
    local -a cmd=("${launch[@]}" "${extra_launch[@]}" "$python" -m mpi4py -m hpc_sparse train
                  --config "$CONFIG" --run-dir "$RUN_DIR" --resume auto "${HS_EXTRA_ARGS[@]}")

    hs_log "start: restart count ${SLURM_RESTART_COUNT:-0}, node ${SLURMD_NODENAME:-$(hostname -s)}," \
           "${ntasks} tasks x ${SLURM_CPUS_PER_TASK:-1} cpus, threads ${HPC_SPARSE_THREADS}, cwd $(pwd)"
    hs_log "run dir: $RUN_DIR"
    hs_log "command: ${cmd[*]}"

    local status last=""
    if [ -n "$HS_SIGNAL" ]; then
        # stopped before anything started: the newest checkpoint is the state, as after a 75
        hs_log "stop requested (SIG$HS_SIGNAL) before the trainer started: not starting it; nothing new to save"
        status=$HS_EXIT_REQUEUE
    else
        "${cmd[@]}" &
        HS_CHILD=$!
        if [ -n "$HS_PENDING" ]; then  # came during the launch itself: act on it now
            local pending=$HS_PENDING
            HS_PENDING=""
            hs_forward "$pending"
        fi
        # `wait` returns early (status > 128) when a trapped signal arrives: wait again until
        # the launcher itself has ended, and keep its real status.
        while :; do
            HS_TRAPPED=0
            wait "$HS_CHILD"
            status=$?
            if [ "$status" = 127 ] && [ -n "$last" ]; then status=$last; break; fi  # already reaped
            [ "$HS_TRAPPED" = 1 ] || break
            last=$status
        done
        hs_log "trainer exited with status $status${HS_SIGNAL:+ (batch shell had SIG$HS_SIGNAL)}"
        rm -f "$HS_READY_FILE"
        if [ -n "$HS_EARLY_STOP" ] && [ "$status" != 0 ]; then
            hs_log "stopped before every rank was ready: status $HS_EXIT_REQUEUE; the newest checkpoint stands"
            status=$HS_EXIT_REQUEUE
        fi
    fi
    # The traps stay set until the script exits: a second signal while `scontrol requeue`
    # runs is logged, it does not kill the batch shell and lose the requeue.

    if [ "$status" != "$HS_EXIT_REQUEUE" ]; then
        return "$status"
    fi
    local saved="checkpoint written"
    [ -z "$HS_EARLY_STOP" ] && [ -n "$HS_CHILD" ] || saved="stopped before training (nothing new to save)"
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        hs_log "$saved; not under SLURM, run again to resume"
        return "$status"
    fi
    if [ "${REQUEUE:-1}" = 0 ]; then
        hs_log "$saved; REQUEUE=0, the next chunk resumes from it"
        return 0
    fi
    if [ "$HS_SIGNAL" = TERM ]; then
        hs_log "$saved; stopped by SIGTERM (cancel or preemption): not requeueing"
        return "$status"
    fi
    # An array task must be named <array id>_<index>: its own SLURM_JOB_ID equals the
    # array id for one of the tasks, and `scontrol requeue <array id>` requeues them all.
    local target=$SLURM_JOB_ID
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        target=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    fi
    hs_log "$saved; requeueing job $target (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) follows)"
    if ! scontrol requeue "$target"; then
        hs_log "ERROR: scontrol requeue $target failed; resubmit with RUN_DIR=$RUN_DIR to resume"
        return "$status"
    fi
    return 0
}
