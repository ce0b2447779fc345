"""Launch mpiexec for real: the MPI test modules at 2 and 3 ranks, failures that must not hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_sparse.runtime.launcher import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = find_mpiexec()
pytestmark = [pytest.mark.mpi]
ENV = {**os.environ, "HPC_SPARSE_THREADS": "1"}


def mpiexec(n: int, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([MPIEXEC, "-n", str(n), *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_quickly(tmp_path, mode):
    proc, seconds = mpiexec(2, sys.executable, "tests/mpi/fault_main.py", mode, "train",
                            "--config", "configs/synthetic-quick.toml", "--set", "data.n_train=2000",
                            "--set", "train.epochs=50", "--run-dir", str(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert seconds < 60, f"took {seconds:.0f}s"
    if mode == "raise":
        assert "rank 1/2" in proc.stderr and "injected failure on rank 1" in proc.stderr


@pytest.mark.parametrize("ranks", [2, 3])
def test_user_error_on_all_ranks_exits_with_message(tmp_path, ranks):
    """A data-shape error is raised by every rank at once: one line, not one per rank and an
    abort of the job (issue 18, defect 14)."""
    proc, seconds = mpiexec(ranks, sys.executable, "-m", "mpi4py", "-m", "hpc_sparse", "train", "--config",
                            "configs/synthetic-quick.toml", "--set", "model.layers=[7,4]",
                            "--run-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and seconds < 60
    assert proc.stderr.count("model.layers starts with 7 inputs") == 1, proc.stderr
    assert "rank 1/" not in proc.stderr


def test_a_config_error_exits_2_with_one_line_and_no_abort(tmp_path):
    """Issue 18, defect 9: a bad config is agreed by all ranks and leaves like status 75
    (MPI_Finalize, exit 2), not through MPI_Abort, which srun would report as 137."""
    proc, seconds = mpiexec(2, sys.executable, "-m", "mpi4py", "-m", "hpc_sparse", "train", "--config",
                            "configs/synthetic-quick.toml", "--set", "train.lr=-1", "--run-dir", str(tmp_path / "r"),
                            timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["hpc-sparse: error: config key 'train.lr' is -1.0 but must be > 0.0; fix: set a value in range"]
    assert not (tmp_path / "r").exists()


def test_quickstart_two_ranks_trains(tmp_path):
    proc, _ = mpiexec(2, sys.executable, "-m", "mpi4py", "-m", "hpc_sparse", "train", "--config",
                      "configs/synthetic-quick.toml", "--run-dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 rank(s)" in proc.stderr and (tmp_path / "summary.json").is_file()


FROM_PYTHON = """
import sys
from pathlib import Path
from mpi4py import MPI
from hpc_sparse.config import load_config
from hpc_sparse.sparse.mlp import SparseMLP
from hpc_sparse.train import Trainer

calls = [0]
def failing(original):
    def method(self, *a, **k):
        calls[0] += 1
        if MPI.COMM_WORLD.Get_rank() == 1 and calls[0] == 3:
            raise RuntimeError("injected failure on rank 1")
        return original(self, *a, **k)
    return method

SparseMLP.train_step = failing(SparseMLP.train_step)
SparseMLP.gradients = failing(SparseMLP.gradients)  # a WASAP worker computes gradients
cfg = load_config("configs/synthetic-quick.toml", ["data.n_train=2000", "train.epochs=50",
                                                   f'parallel.mode="{sys.argv[1]}"'])
Trainer(cfg, MPI.COMM_WORLD, Path(sys.argv[2]), quiet=True).run()
"""


@pytest.mark.parametrize("mode", ["sync", "wasap"])
def test_a_failing_rank_ends_the_job_quickly_when_used_from_python(tmp_path, mode):
    """The engine, not only the CLI, ends every rank when one raises: a plain ``python`` script
    (no ``-m mpi4py``, no CLI) under mpiexec must not leave the other rank waiting (sync: in
    an Allreduce; WASAP: for a message, whose timeout is set far beyond the bound here)."""
    script = tmp_path / "from_python.py"
    script.write_text(FROM_PYTHON)
    t0 = time.monotonic()
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), mode, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**ENV, "HPC_SPARSE_WASAP_TIMEOUT": "600"})
    seconds = time.monotonic() - t0
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr and "rank 1/2" in proc.stderr
    assert seconds < 60, f"took {seconds:.0f}s"
