"""The one exception type users see: a problem in their input, with the fix in the message;
and the exit status it gives."""

EXIT_USER_ERROR = 2
"""Exit status of a UserError (bad config, data or checkpoint); 75 and 1 are the others
(``hpc_sparse.runtime.signals.EXIT_REQUEUE``, anything else)."""


class UserError(Exception):
    """Bad input (config, data, checkpoint). The message names the problem and the fix.

    The CLI prints it as a single line and exits with status 2; no traceback.

    ``every_rank=True`` marks an error raised on every rank at the same point, which only an
    agreement of the ranks may claim (:func:`hpc_sparse.engine.failure.agreed`, or a raise
    right after a collective that told every rank the same): no rank is left waiting, so
    the training engine lets it propagate instead of aborting the MPI job, and a Python
    caller can catch it. Any other exception on one rank of several ends the whole job.
    """

    def __init__(self, message: str, *, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank
