"""Launch the real CLI with a fault injected from outside (used by tests/test_mpi_launch.py and
tests/test_resume.py), so that no test hook lives in the package.

Usage: [mpiexec -n P] python tests/mpi/fault_main.py MODE <hpc-sparse args...>
MODE: raise | kill            rank 1 raises / is SIGKILLed at its 5th training step
      kill-in-checkpoint      rank 0 is SIGKILLed while committing the 2nd checkpoint
                              (shards written, manifest not yet)
      term-at-exit            every rank asks itself to stop (SIGUSR1) at its 5th step, and
                              gets a second signal (SIGTERM) right before its requeue exit
      eio-on-load             reading any checkpoint shard fails with EIO (as a failing disk or
                              a stale NFS handle would), on every rank
"""

import errno
import os
import signal
import sys
import time
from pathlib import Path

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
elif mode == "term-at-exit":
    original_step = SparseMLP.train_step

    def stopping_step(self, *args, **kwargs):
        calls["step"] += 1
        if calls["step"] == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original_step(self, *args, **kwargs)

    SparseMLP.train_step = stopping_step
    # the function the CLI leaves with after a stop (named exit_requeue before issue 11)
    from hpc_sparse.parallel import comm as pcomm

    if hasattr(pcomm, "exit_with_status"):
        where, name = pcomm, "exit_with_status"
    else:
        import hpc_sparse.parallel.signals as where  # noqa: F811 - the old layout
        name = "exit_requeue"
    original_exit = getattr(where, name)

    def term_first(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. scancel while the rank finalizes
        time.sleep(0.3)
        return original_exit(*args, **kwargs)

    setattr(where, name, term_first)
elif mode == "eio-on-load":
    original_hash = ckfmt.sha256_file

    def failing_hash(path):
        if Path(path).name.startswith("shard-"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return original_hash(path)

    ckfmt.sha256_file = failing_hash
else:
    raise SystemExit(f"unknown mode {mode}")

sys.exit(cli.main(sys.argv[2:]))
