#!/usr/bin/env bash
# Submit N dependent chunks of jobs/train.sbatch that share one run dir:
#
#   jobs/chain.sh N [sbatch args...]
#   RUN_DIR=runs/long CONFIG=configs/fmnist.toml jobs/chain.sh 5 --time=4:00:00
#
# Chunk k+1 waits for chunk k to end in any state (--dependency=afterany) and resumes
# the newest checkpoint (--resume auto). A chunk that is signalled before its time limit
# checkpoints and exits 0 instead of requeueing itself (REQUEUE=0), so the next chunk
# continues; chunks after the run completed (RUN_DIR/summary.json exists) do nothing
# (SKIP_IF_DONE=1). Prints one job id per line. CONFIG, SETS, LAUNCHER, PYTHON pass
# through the environment as for train.sbatch.
set -euo pipefail

usage() { echo "usage: $0 N [sbatch args...]   (N >= 1 chunks)" >&2; exit 2; }
[ $# -ge 1 ] || usage
n=$1; shift
[[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || usage

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export RUN_DIR=${RUN_DIR:-runs/chain-$(date +%Y%m%d-%H%M%S)}
export REQUEUE=0 SKIP_IF_DONE=1 HPC_SPARSE_ROOT=${HPC_SPARSE_ROOT:-$(dirname "$here")}

echo "chain of $n chunks, run dir $RUN_DIR" >&2
prev=""
for _ in $(seq "$n"); do
    dep=()
    [ -n "$prev" ] && dep=(--dependency="afterany:$prev")
    prev=$(sbatch --parsable "${dep[@]}" --export=ALL "$@" "$here/train.sbatch")
    prev=${prev%%;*}  # --parsable prints "id" or "id;cluster"
    echo "$prev"
done
