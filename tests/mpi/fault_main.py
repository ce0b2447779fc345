"""Launch the real CLI with a fault injected on rank 1 (used by tests/test_mpi_launch.py).

Usage: mpiexec -n 2 python tests/mpi/fault_main.py raise|kill <train args...>
Not a test module itself: the fault is wired in from outside so no test hook lives in the package.
"""

import os
import signal
import sys

from mpi4py import MPI

from hpc_sparse import cli
from hpc_sparse.sparse.mlp import SparseMLP

mode = sys.argv[1]
original = SparseMLP.train_step
calls = {"n": 0}


def faulty(self, *args, **kwargs):
    calls["n"] += 1
    if MPI.COMM_WORLD.Get_rank() == 1 and calls["n"] == 5:
        if mode == "raise":
            raise RuntimeError("injected failure on rank 1")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)


SparseMLP.train_step = faulty
sys.exit(cli.main(sys.argv[2:]))
