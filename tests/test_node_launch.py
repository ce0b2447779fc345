"""The node communicator under a real mpiexec: ranks that see different environments, and the
dataset cache built once for all ranks of a node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_sparse.runtime.launcher import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = find_mpiexec()
pytestmark = [pytest.mark.mpi]
QUICK = ["--config", "configs/synthetic-quick.toml", "--set", "data.n_train=600", "--set", "data.n_test=200",
         "--set", "model.layers=[500,40,4]", "--set", "train.epochs=2", "--set", "importance.enabled=false"]


def bare_env(**extra: str) -> dict[str, str]:
    """This environment without the variables that choose the thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("HPC_SPARSE_THREADS", "SLURM_CPUS_PER_TASK")}
    return {**env, **extra}


def test_ranks_with_different_environments_start_together(tmp_path):
    """Rank 0 has HPC_SPARSE_THREADS, rank 1 has not (a heterogeneous job, ``--export``). The
    node communicator is a collective: both must call it, or rank 1 waits in it forever while
    rank 0 is in the next collective (the run hung until the timeout before the fix)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    train = [sys.executable, "-m", "mpi4py", "-m", "hpc_sparse", "train", *QUICK, "--set",
             f"data.cache_dir={cache}", "--run-dir", str(run_dir)]
    proc = subprocess.run([MPIEXEC, "-n", "1", "-env", "HPC_SPARSE_THREADS", "1", *train, ":", "-n", "1", *train],
                          capture_output=True, text=True, timeout=120, env=bare_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["ranks"] == 2
    # the dataset was built once, by rank 0, and both ranks mapped it (the log says where)
    [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert f"data cache: {entry} (data.cache_dir), built by rank 0 for all 2 ranks" in proc.stderr
