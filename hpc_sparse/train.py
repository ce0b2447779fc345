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

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_sparse.config import Config
from hpc_sparse.engine import Engine, configure_threads, evaluate, load_data
from hpc_sparse.errors import UserError
from hpc_sparse.schedules import schedule_for
from hpc_sparse.sparse import SparseMLP

__all__ = ["TrainedRun", "Trainer", "configure_threads", "evaluate", "load_data", "load_run"]


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

    def run(self, resume: str | None = None) -> int:
        """Train to the end (returns 0) or until a stop signal (checkpoint written, returns
        ``EXIT_REQUEUE`` = 75).

        Parameters
        ----------
        resume : None, "auto" or a checkpoint folder
            None starts afresh; "auto" continues from the newest valid checkpoint in
            ``run_dir`` (or starts afresh if there is none); a path continues from that
            checkpoint.
        """
        return self.run_schedule(schedule_for(self.cfg.parallel.mode), resume)


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


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> TrainedRun:
    """Load a run's trained model in this process (no communicator needed).

    Parameters
    ----------
    run_dir : str or Path
        The run folder of a training run.
    checkpoint : str or Path, optional
        A checkpoint folder; default: the newest valid checkpoint in ``run_dir``.

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
    from hpc_sparse.checkpoint import find_latest_valid, load_checkpoint
    from hpc_sparse.config import config_from_dict
    from hpc_sparse.engine import MODEL_PREFIX
    from hpc_sparse.model_builder import model_from_rank_arrays, model_from_state

    run_dir = Path(run_dir)
    if checkpoint:
        path = Path(checkpoint)
    else:
        if not run_dir.is_dir():
            raise UserError(f"run dir '{run_dir}' does not exist; fix: pass the --run-dir of a training run")
        path, _ = find_latest_valid(run_dir)
        if path is None:
            raise UserError(f"no valid checkpoint in '{run_dir}'; fix: train with checkpoint.at_end=true "
                            "(the default) or pass --checkpoint")
    state, manifest, rank_state = load_checkpoint(path, rank=0)
    cfg = config_from_dict(manifest["meta"]["config"])
    if not state and rank_state:  # a checkpoint of per-rank models (WASAP-SGD's local phase)
        print(f"note: {path} holds one model per rank (WASAP-SGD's local phase); this is rank 0's", file=sys.stderr)
        mine = {k[len(MODEL_PREFIX):]: v for k, v in rank_state.items() if k.startswith(MODEL_PREFIX)}
        return TrainedRun(cfg, model_from_rank_arrays(cfg, mine, str(path)), manifest, path)
    return TrainedRun(cfg, model_from_state(cfg, state, str(path)), manifest, path)
