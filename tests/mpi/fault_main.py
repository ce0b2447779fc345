"""Launch the real CLI with a fault injected from outside (used by tests/test_mpi_launch.py and
tests/test_resume.py), so that no test hook lives in the package.

Usage: [mpiexec -n P] python tests/mpi/fault_main.py MODE <hpc-sparse args...>
MODE: raise | kill            rank 1 raises / is SIGKILLed at its 5th training step
      kill-in-checkpoint      rank 0 is SIGKILLed while committing the 2nd checkpoint
                              (shards written, manifest not yet)
"""

import os
import signal
import sys

from mpi4py import MPI

from hpc_sparse import cli
from hpc_sparse.checkpoint import format as ckfmt
from hpc_sparse.sparse.mlp import SparseMLP

mode = sys.argv[1]
rank = MPI.COMM_WORLD.Get_rank()
calls = {"step": 0, "manifest": 0}

if mode in ("raise", "kill"):
    original_step = SparseMLP.train_step

    def faulty_step(self, *args, **kwargs):
        calls["step"] += 1
        if rank == 1 and calls["step"] == 5:
            if mode == "raise":
                raise RuntimeError("injected failure on rank 1")
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(self, *args, **kwargs)

    SparseMLP.train_step = faulty_step
elif mode == "kill-in-checkpoint":
    original_manifest = ckfmt.write_manifest

    def faulty_manifest(*args, **kwargs):
        calls["manifest"] += 1
        if calls["manifest"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_manifest(*args, **kwargs)

    ckfmt.write_manifest = faulty_manifest
else:
    raise SystemExit(f"unknown mode {mode}")

sys.exit(cli.main(sys.argv[2:]))
