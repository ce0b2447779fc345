"""``Trainer``: the engine with the schedule ``parallel.mode`` names, for use from Python.

>>> Trainer(cfg, comm, Path("runs/x")).run()          # doctest: +SKIP
0

Under ``mpiexec`` an exception on one rank ends every rank (the engine aborts the job), so
no rank is left waiting; errors raised on every rank alike (``UserError(every_rank=True)``)
propagate to the caller. The CLI (``hpc-sparse train``) does the same through
:func:`hpc_sparse.schedules.schedule_for`.
"""

from __future__ import annotations

from hpc_sparse.engine import Engine, configure_threads, evaluate
from hpc_sparse.schedules import schedule_for

__all__ = ["Trainer", "configure_threads", "evaluate"]


class Trainer(Engine):
    """An :class:`~hpc_sparse.engine.Engine` whose :meth:`run` uses the configured mode."""

    def run(self, resume: str | None = None, *, fresh_if_none_valid: bool = False, break_lock: bool = False) -> int:
        """Train to the end (0) or until a stop signal (checkpoint, ``EXIT_REQUEUE``).
        ``resume``: "auto" or a checkpoint path; the options: see :meth:`Engine.run_schedule`."""
        return self.run_schedule(schedule_for(self.cfg.parallel.mode), resume,
                                 fresh_if_none_valid=fresh_if_none_valid, break_lock=break_lock)
