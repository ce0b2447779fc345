"""The Python entry points: train a run (:class:`Trainer`), load a trained one (:func:`load_run`),
evaluate a model (:func:`evaluate`).

>>> Trainer(cfg, comm, Path("runs/x")).run()          # doctest: +SKIP
0
>>> run = load_run("runs/x")                          # doctest: +SKIP
>>> run.model.predict_logits(x)                       # doctest: +SKIP

Under ``mpiexec`` an exception on one rank ends every rank (the engine aborts the job), so
no rank is left waiting; errors raised on every rank alike (``UserError(every_rank=True)``)
propagate to the caller. The CLI (``hpc-sparse train``) does the same through
:func:`hpc_sparse.schedules.schedule_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_sparse.config import Config
from hpc_sparse.engine import Engine, evaluate, load_data
from hpc_sparse.schedules import schedule_for
from hpc_sparse.sparse import SparseMLP

__all__ = ["TrainedRun", "Trainer", "evaluate", "load_data", "load_run"]


class Trainer(Engine):
    """One training job: the engine running the schedule that ``cfg.parallel.mode`` names.

    Parameters
    ----------
    cfg : Config
        The validated run configuration (:func:`~hpc_sparse.config.load_config` or
        :func:`~hpc_sparse.config.config_from_dict`).
    comm : mpi4py communicator
        ``MPI.COMM_WORLD`` under ``mpiexec``/``srun``; with one process, ``MPI.COMM_WORLD``
        or ``MPI.COMM_SELF``. Every rank constructs its Trainer with the same ``cfg``.
    run_dir : Path
        Output folder (created): ``config.json``, ``metrics.jsonl``, ``summary.json``,
        ``checkpoints/``.
    quiet : bool
        No progress output.
    stop : StopFlag, optional
        The flag that SIGUSR1/SIGTERM set (:class:`~hpc_sparse.runtime.signals.StopFlag`);
        default: a new one, installed while :meth:`run` runs.
    """

    def run(self, resume: str | None = None, *, fresh_if_none_valid: bool = False, break_lock: bool = False) -> int:
        """Train to the end (returns 0) or until a stop signal (checkpoint written, returns
        ``EXIT_REQUEUE`` = 75).

        Parameters
        ----------
        resume : None, "auto" or a checkpoint folder
            None starts afresh; "auto" continues from the newest valid checkpoint in
            ``run_dir`` (or starts afresh if there is none; if committed checkpoints exist but
            none is valid, it refuses unless ``fresh_if_none_valid``); a path continues from
            that checkpoint.
        fresh_if_none_valid : bool
            With "auto": start afresh even if every committed checkpoint is invalid.
        break_lock : bool
            Take over the run dir's lock even if its holder cannot be shown to be gone.
        """
        return self.run_schedule(schedule_for(self.cfg.parallel.mode), resume,
                                 fresh_if_none_valid=fresh_if_none_valid, break_lock=break_lock)


@dataclass
class TrainedRun:
    """A trained model loaded from a run's checkpoint (:func:`load_run`)."""

    cfg: Config
    """The run's configuration, as stored in the checkpoint."""
    model: SparseMLP
    """The model: ``model.predict_logits(x)`` with x (B, n_features) float32, preprocessed
    as the run's data was (:func:`load_data` ``(cfg)`` gives that data)."""
    manifest: dict[str, Any]
    """The checkpoint's manifest (``step``, ``meta``, shards and their checksums)."""
    path: Path
    """The checkpoint folder it came from."""


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, comm: Any = None) -> TrainedRun:
    """Load a run's trained model, verified (hashes, format, ``model_sha256``).

    Parameters
    ----------
    run_dir : str or Path
        The run folder of a training run.
    checkpoint : str or Path, optional
        A checkpoint folder; default: the newest valid checkpoint in ``run_dir``.
    comm : mpi4py communicator, optional
        Load collectively over ``comm`` (rank 0 chooses the checkpoint, every rank gets the
        same model); default: this process alone.

    Returns
    -------
    TrainedRun
        The config, the model, the manifest and the checkpoint's path. A checkpoint of
        WASAP-SGD's local phase holds one model per rank; rank 0's is returned (with a note
        on stderr).

    Raises
    ------
    UserError
        No run folder, or no valid checkpoint in it.
    CheckpointError
        The checkpoint named is corrupt or does not match its manifest.
    """
    from hpc_sparse.parallel.comm import self_comm
    from hpc_sparse.run_commands import load_run as load_agreed

    cfg, model, manifest, path = load_agreed(comm if comm is not None else self_comm(), Path(run_dir),
                                             str(checkpoint) if checkpoint else None)
    return TrainedRun(cfg, model, manifest, path)
