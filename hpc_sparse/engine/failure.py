"""Failure handling of a training run: an exception on one rank ends every rank, at once.

A rank that raises while its peers wait in a collective (sync) or for a message (WASAP-SGD)
would leave them waiting forever (or for the WASAP timeout). So the engine, not only the
CLI, turns such an exception into ``MPI_Abort`` of the whole job, also when the trainer is
used from Python under ``mpiexec`` without ``python -m mpi4py``.

Not aborted (re-raised for the caller): everything in a one-rank run; a
:class:`~hpc_sparse.errors.UserError` marked ``every_rank`` (raised on all ranks at the same
point, so nobody waits); ``KeyboardInterrupt`` and ``SystemExit``.

Only an agreement marks an error ``every_rank``: :func:`agreed` around a step without
collectives whose user errors may come on some ranks only (the config, the data's shape,
the checks of a loaded checkpoint, a schedule's checks), or a collective function that
raises right after the collective told every rank the same (the checkpoint save and load,
the run dir's lock, the engine's agreement at a meeting point). Any other error on one rank
of several ends the job.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from hpc_sparse.errors import EXIT_USER_ERROR, UserError

T = TypeVar("T")

EXIT_FAILURE = 1


def must_abort(exc: BaseException, size: int) -> bool:
    """True if ``exc`` on one rank of ``size`` must end the whole job."""
    if size <= 1 or isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return False
    return not getattr(exc, "every_rank", False)


def end_job_on_error(comm: Any, exc: BaseException) -> None:
    """If ``exc`` must end the job (:func:`must_abort`), print it with this rank's number
    (a traceback for anything but a UserError) and abort every rank; never returns then.
    Otherwise return, and the caller re-raises."""
    if not must_abort(exc, comm.Get_size()):
        return
    from hpc_sparse.parallel import comm as pc

    if not isinstance(exc, UserError):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    pc.abort_on_error(comm, exc, EXIT_USER_ERROR if isinstance(exc, UserError) else EXIT_FAILURE)


def agreed(comm: Any, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, with its user errors agreed: if it raises a :class:`UserError`
    on any rank, every rank raises one (``every_rank=True``) with the message of the lowest
    failing rank. The job then leaves with status 2 on every launcher (``srun`` reports an
    ``MPI_Abort`` as 137) and rank 0 prints the one line.

    Collective (one ``allgather`` of the short error text). For steps whose errors come from
    input that every rank reads on its own, e.g. the config; other exceptions propagate (and
    end the job through :func:`end_job_on_error`).
    """
    error, result = None, None
    try:
        result = fn()
    except UserError as exc:
        error = str(exc)
    failed = [e for e in comm.allgather(error) if e is not None]
    if failed:
        raise UserError(failed[0], every_rank=True)
    return result  # type: ignore[return-value]
