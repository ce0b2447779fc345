"""A stop request from SLURM (or a user), recorded by a signal handler that only sets a flag.

The handler does no MPI and no I/O: it may run between any two bytecodes, also while
this rank is inside an MPI call. The training engine polls :attr:`StopFlag.requested` at
its safe points, the ranks agree on it, write a checkpoint and exit with
:data:`EXIT_REQUEUE`; ``jobs/_run_training.sh`` then runs ``scontrol requeue``.

No MPI here: the rank's exit with that status (``MPI.Finalize`` first) is
:func:`hpc_sparse.parallel.comm.exit_with_status`.

A stop signal that reaches a rank before its handler is installed (interpreter start,
``MPI_Init``) would kill it. So the job script passes a stop on to the ranks only once
every rank is ready: :func:`announce_ready` (after the handlers are installed on every
rank) creates the file ``HPC_SPARSE_READY_FILE`` names; before it exists the script ends
the launcher instead (nothing was trained yet) and requeues.

Example
-------
>>> with StopFlag().install() as stop:        # doctest: +SKIP
...     for step in steps:
...         train_one_step()
...         if any_rank(stop.requested):
...             save_checkpoint(); exit_with_status(EXIT_REQUEUE)
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["EXIT_REQUEUE", "READY_FILE_ENV", "StopFlag", "announce_ready"]

EXIT_REQUEUE = 75
"""Exit status: stopped by a signal after writing a checkpoint; the job script should requeue.

(75 is ``EX_TEMPFAIL`` of ``sysexits.h``: "try again later".)"""

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

READY_FILE_ENV = "HPC_SPARSE_READY_FILE"
"""Environment variable naming the file :func:`announce_ready` creates (set by the job script)."""


class StopFlag:
    """Flag set by SIGUSR1/SIGTERM (or any chosen signals); handlers restorable.

    Attributes
    ----------
    requested : bool
        True once one of the installed signals arrived.
    signal_name : str or None
        Name of the first signal that arrived, e.g. ``"SIGUSR1"``.
    """

    def __init__(self) -> None:
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}

    # --- the handler: set the flag, nothing else -------------------------------------
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._signum is None:
            self._signum = signum

    # --- public API -------------------------------------------------------------------
    def install(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> StopFlag:
        """Install the flag-setting handler for ``signals``; remember the old handlers.

        Must be called from the main thread (a Python rule for ``signal.signal``).
        Installing again adds signals; the first previous handler of each is kept.
        Returns ``self`` so that ``with StopFlag().install() as stop:`` works.
        """
        for sig in signals:
            sig = signal.Signals(sig)
            previous = signal.signal(sig, self._handler)
            self._previous.setdefault(int(sig), previous)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`. Idempotent."""
        while self._previous:
            signum, previous = self._previous.popitem()
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def clear(self) -> None:
        """Forget a received signal (e.g. after handling it in a test)."""
        self._signum = None

    @property
    def installed(self) -> bool:
        """True while this flag's handlers are installed (between install and restore)."""
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        """True once one of the installed signals arrived."""
        return self._signum is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received (``"SIGUSR1"``), or ``None``."""
        if self._signum is None:
            return None
        try:
            return signal.Signals(self._signum).name
        except ValueError:  # pragma: no cover - not a known signal number
            return f"signal {self._signum}"

    def __enter__(self) -> StopFlag:
        if not self._previous:
            self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"StopFlag(requested={self.requested}, signal={self.signal_name})"


def announce_ready(comm: Any, environ: dict[str, str] | None = None) -> Path | None:
    """Tell the job script that every rank of ``comm`` takes stop signals from now on.

    Collective: call it on every rank once its :class:`StopFlag` is installed. After a
    barrier, rank 0 creates the file named by ``HPC_SPARSE_READY_FILE`` (read from rank 0's
    ``environ``, default ``os.environ``; nothing is written if it is unset), holding its
    host, pid and the time. Returns the path written, else ``None``.
    """
    comm.Barrier()  # every rank has its handlers once rank 0 passes this
    if comm.Get_rank() != 0:
        return None
    name = (os.environ if environ is None else environ).get(READY_FILE_ENV, "")
    if not name:
        return None
    path = Path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                       f"{comm.Get_size()} ranks ready\n")
        os.replace(tmp, path)
    except OSError as exc:  # the run itself reports an unwritable run dir, with its fix
        print(f"hpc-sparse: warning: cannot write {READY_FILE_ENV}={path} ({exc}); the job script will "
              "treat a stop signal as arriving before start-up", file=sys.stderr, flush=True)
        return None
    return path
