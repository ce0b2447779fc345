"""A stop request from SLURM (or a user), recorded by a signal handler that only sets a flag.

The handler does no MPI and no I/O: it may run between any two bytecodes, also while
this rank is inside an MPI call. The trainer polls :attr:`StopFlag.requested` at step
boundaries, agrees across ranks with ``Allreduce(MAX)``, writes a checkpoint and exits
with :data:`EXIT_REQUEUE`; ``jobs/_run_training.sh`` then runs ``scontrol requeue``.

Example
-------
>>> with StopFlag().install() as stop:        # doctest: +SKIP
...     for step in steps:
...         train_one_step()
...         if any_rank(stop.requested):
...             save_checkpoint(); exit_requeue()
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["EXIT_REQUEUE", "StopFlag", "exit_requeue"]

EXIT_REQUEUE = 75
"""Exit status: stopped by a signal after writing a checkpoint; the job script should requeue.

(75 is ``EX_TEMPFAIL`` of ``sysexits.h``: "try again later".)"""

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


def exit_requeue(status: int = EXIT_REQUEUE) -> None:
    """End this rank with ``status`` (default 75) so that every launcher reports it.

    Call it on every rank, after the checkpoint is committed. Do not ``sys.exit(75)``
    under ``python -m mpi4py``: mpi4py turns a non-zero ``SystemExit`` into
    ``MPI_Abort(75)``, which MPICH's ``mpiexec`` reports as 75 but ``srun --mpi=pmi2``
    reports as 137 (tasks killed), so the job script would not requeue. Instead this
    flushes stdio, calls ``MPI.Finalize()`` (if mpi4py's MPI was initialized here; it is
    not imported otherwise) and leaves with ``os._exit(status)``: both launchers then
    exit with ``status``. Never returns.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not block the exit
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                mpi.Finalize()
        except Exception:  # noqa: BLE001 - exit with the status whatever MPI says
            pass
    os._exit(status)
