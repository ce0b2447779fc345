"""A run directory has one owner: the job that holds its lock (README, "Checkpoints and resume").

Before anything else touches the run dir, rank 0 creates it and takes its lock
(:mod:`hpc_sparse.runtime.run_lock`), and every rank learns the verdict through one
broadcast: a refusal raises the same one-line UserError on every rank (exit 2). Only then,
under the lock, does rank 0 remove ``.tmp-step-*`` folders (no save of another job can be
running, so they are leftovers of an interrupted save). The engine releases the lock at
every exit: on rank 0 when the run returns or raises, and on a rank that aborts the job
(it knows the token), just before the abort.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hpc_sparse.checkpoint import temporary_folders
from hpc_sparse.errors import UserError
from hpc_sparse.log import RunLog
from hpc_sparse.runtime.run_lock import LOCK_NAME, LockRefused, RunLock, acquire


def take_run_dir(comm: Any, run_dir: Path, log: RunLog, break_lock: bool = False) -> RunLock:
    """Create ``run_dir`` and take its lock (rank 0), agreed by every rank. Collective.

    Returns the lock on every rank (``release()`` is a no-op where the file is not its own).
    Raises UserError (every rank) if the run dir is held by another job or cannot be made.
    """
    verdict: tuple[str, str, str | None] | None = None
    if comm.Get_rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock, note = acquire(run_dir, break_lock=break_lock, command=" ".join(sys.argv)[:1000])
            verdict = ("ok", lock.token, note)
        except LockRefused as exc:
            verdict = ("refused", str(exc), None)
        except OSError as exc:
            verdict = ("refused", f"cannot create or lock run dir {run_dir} ({exc}); fix: check that the folder "
                                  "is writable and the file system has space, or pass another --run-dir", None)
    kind, text, note = comm.bcast(verdict, root=0)
    if kind != "ok":
        raise UserError(text, every_rank=True)
    lock = RunLock(run_dir / LOCK_NAME, text)
    if note:
        log.info(note)
    if comm.Get_rank() == 0:
        try:
            for tmp in temporary_folders(run_dir):
                shutil.rmtree(tmp)
                log.info(f"removed {tmp.name}, left by an interrupted save (this job holds the run dir's lock)")
        except OSError as exc:  # harmless: discovery ignores them
            log.info(f"could not remove a temporary checkpoint folder ({exc}); it is ignored")
    return lock
