#!/usr/bin/env bash
# Install everything the test suite needs, then run it: the serial suite (MPI test modules
# with one process, CLI end to end, real SLURM), then the MPI modules under mpiexec -n 2 and -n 3.
# Usage: bash tools/test_all.sh            (as root on Debian for the apt packages; ~10-15 min)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
    command -v slurmctld >/dev/null || need+=(slurm-wlm)
    command -v munged >/dev/null || need+=(munge)
    if [ ${#need[@]} -gt 0 ]; then
        echo "== apt-get install ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

PY=python3
# An interpreter that refuses pip installs (PEP 668, e.g. Debian's own python3 outside a
# venv): install into a venv of the checkout instead (Debian: apt-get install python3-venv).
if python3 -c 'import os, sys, sysconfig; sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(
        os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    echo "== python3 is externally managed (PEP 668): using the venv .venv"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    PY=$PWD/.venv/bin/python
fi

# docs: tests/test_docs.py builds the documentation site with `mkdocs build --strict` (offline)
echo "== pip install -e .[test,docs]"
"$PY" -m pip install -q --disable-pip-version-check -e '.[test,docs]'

# PyPI's mpich installs mpiexec beside the interpreter; `python -m pip` does not refresh
# pyenv's shims, so do not rely on PATH alone.
MPIEXEC=$("$PY" -c 'import sys, pathlib; p = pathlib.Path(sys.executable).with_name("mpiexec"); print(p if p.exists() else "mpiexec")')

export HPC_SPARSE_THREADS=1
echo "== serial suite (one process)"
"$PY" -m pytest -q -p no:cacheprovider tests
for n in 2 3; do
    echo "== MPI suite under mpiexec -n $n"
    "$MPIEXEC" -n "$n" "$PY" -m mpi4py -m pytest -q -p no:cacheprovider tests/mpi
done
