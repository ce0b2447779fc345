"""Resuming a run: one agreed checkpoint, checked, and the run's lineage kept straight.

Used by :class:`hpc_sparse.engine.core.Engine` (this module does not know the engine):

1. Rank 0 chooses the checkpoint and every rank verifies and reads it collectively, each
   shard hashed once per job (:func:`hpc_sparse.checkpoint.choose_and_load`); the
   manifest's ``meta`` must hold what a resume reads (:func:`check_meta`), else the
   checkpoint is invalid. A checkpoint that could not be *read* (an error of the
   environment) stops the run, and so does ``--resume auto`` when committed checkpoints
   exist but none is valid, unless ``--fresh-if-none-valid`` asks to start from step 0.
2. The config must keep the seed (other differences are logged); the schedule must be the
   one that wrote it; the schedule checks the rest (``check_resume``: e.g. sync rescales
   the position for another rank count or batch size, WASAP-SGD refuses those mid-run).
   These checks and the model's construction (a replica, or this rank's own model:
   :mod:`~hpc_sparse.engine.rank_models`) are agreed: a refusal on any rank is raised on
   every rank.
3. After loading, the ranks prove they hold the same progress and (replica) model, and rank
   0 checks the model against the ``model_sha256`` recorded at save time; any mismatch
   stops every rank with an error.
4. Lineage: checkpoints newer than the resumed one belong to a line the run has left; rank 0
   sets them aside (renamed ``step-N.abandoned-<time>``, or ``.invalid-<time>`` if they
   failed verification), never deleting them, so that ``--resume auto`` follows this line.
5. The log says whether the CPU is the checkpoint's (bit-identical continuation) or not
   (the state loads exactly; later steps may differ by rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from hpc_sparse.checkpoint import Loaded, choose_and_load, set_aside_newer
from hpc_sparse.checkpoint.format import invalid
from hpc_sparse.config import Config, config_from_dict
from hpc_sparse.engine import rank_models
from hpc_sparse.engine.failure import agreed
from hpc_sparse.engine.progress import Progress
from hpc_sparse.errors import UserError
from hpc_sparse.log import RunLog
from hpc_sparse.model_builder import model_from_state
from hpc_sparse.parallel import comm as pc
from hpc_sparse.runtime.host import compare_hosts
from hpc_sparse.sparse import SparseMLP


@dataclass
class Resumed:
    """What a resume loaded: the checkpoint, its meta, who wrote it, this rank's model,
    progress, history and per-rank state."""

    path: Path
    meta: dict[str, Any]
    n_ranks: int
    model: SparseMLP
    progress: Progress
    history: list[dict[str, Any]]
    rank_state: dict[str, np.ndarray] | None
    invalid: set[Path] = field(default_factory=set)

    @property
    def step(self) -> int:
        return int(self.meta["progress"]["step"])

    @property
    def schedule_state(self) -> dict[str, Any]:
        return dict(self.meta.get("schedule_state") or {})

    @property
    def batch_size(self) -> int:
        return int(self.meta["config"]["train"]["batch_size"])


def check_meta(path: Path, manifest: dict[str, Any]) -> None:
    """Raise CheckpointError (the checkpoint is invalid) unless the manifest's ``meta`` holds
    what a resume reads, with the right types: the config, the progress counters, the
    history, the schedule's name and state, the per-rank model hashes."""
    meta = manifest["meta"]
    progress = meta.get("progress")
    problems = []
    if not isinstance(meta.get("config"), dict):
        problems.append("config")
    if not isinstance(progress, dict) or not {"step", "epoch", "step_in_epoch"} <= set(progress) <= {
            f.name for f in fields(Progress)} or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in progress.values()):
        problems.append("progress")
    if not isinstance(meta.get("history"), list) or not all(isinstance(h, dict) for h in meta["history"]):
        problems.append("history")
    if not isinstance(meta.get("schedule", "sync"), str) or not isinstance(meta.get("schedule_state") or {}, dict):
        problems.append("schedule")
    shas = meta.get("rank_model_sha256")
    if shas is not None and (not isinstance(shas, list) or not all(isinstance(x, str) for x in shas)):
        problems.append("rank_model_sha256")
    if problems:
        raise invalid(path, f"its meta has no usable {', '.join(problems)} (not written by a training run?)")


def load_resumed(comm: Any, cfg: Config, run_dir: Path, resume: str, log: RunLog, schedule: str,
                 fresh_if_none_valid: bool = False) -> Resumed | None:
    """Load the checkpoint ``resume`` ("auto" or a path) names, for the schedule named
    ``schedule``; None if ``auto`` found no committed one, or none valid and
    ``fresh_if_none_valid`` (the run starts afresh; checkpoints that failed verification are
    then set aside). Collective; errors are raised on every rank."""
    loaded = choose_and_load(comm, run_dir, resume, check=check_meta)
    for bad, reason in loaded.skipped:
        log.info(f"skipping invalid checkpoint {bad}: {reason}")
    if loaded.path is None:
        if loaded.skipped and not fresh_if_none_valid:
            names = ", ".join(p.name for p, _ in loaded.skipped)
            raise UserError(f"none of the {len(loaded.skipped)} committed checkpoint(s) in {run_dir} is valid "
                            f"({names}; the reasons are logged above) and a fresh start would leave their training "
                            "behind; fix: inspect them with `hpc-sparse info --run-dir`, resume one with --resume PATH, "
                            "or pass --fresh-if-none-valid to start from step 0 (they are then set aside, not deleted)",
                            every_rank=True)
        log.info(f"no valid checkpoint in {run_dir}; starting from scratch")
        keep_lineage(comm, run_dir, -1, {p for p, _ in loaded.skipped}, log)
        return None
    resumed = agreed(comm, lambda: _resumed(cfg, comm, loaded, log, schedule))
    _check_loaded(comm, resumed)
    return resumed


def _resumed(cfg: Config, comm: Any, loaded: Loaded, log: RunLog, schedule: str) -> Resumed:
    """This rank's side of a loaded checkpoint, checked against the config and the schedule;
    a UserError if it cannot be resumed (the caller agrees on it)."""
    path, manifest = loaded.path, loaded.manifest
    assert path is not None
    meta = manifest["meta"]
    if not loaded.state and int(manifest["n_ranks"]) != comm.Get_size():
        # per-rank models (WASAP-SGD's local phase): decided from the manifest, which every rank holds
        raise UserError(f"checkpoint {path} holds one model per rank, written by {manifest['n_ranks']} rank(s), and "
                        f"this run has {comm.Get_size()}; fix: resume it with {manifest['n_ranks']} rank(s)")
    _check_config(cfg, meta["config"], str(path), log)
    saved_schedule = meta.get("schedule", "sync")
    if saved_schedule != schedule and not Progress(**meta["progress"]).complete(cfg.train.epochs):
        raise UserError(f"checkpoint {path} was written by parallel.mode={saved_schedule!r}, this run uses "
                        f"{schedule!r}; fix: resume it with --set parallel.mode=\"{saved_schedule}\", or start "
                        "a new --run-dir")
    model = checkpoint_model(cfg, loaded.state, loaded.rank_state, str(path))
    return Resumed(path, meta, int(manifest["n_ranks"]), model, Progress(**meta["progress"]),
                   list(meta["history"]), loaded.rank_state, {p for p, _ in loaded.skipped})


def finish_resume(comm: Any, run_dir: Path, resumed: Resumed, progress: Progress, host: dict[str, str],
                  log: RunLog) -> None:
    """After the schedule accepted the resume: keep the lineage, and log where the run
    continues and what the CPU means for bit-identity."""
    keep_lineage(comm, run_dir, resumed.step, resumed.invalid, log)
    model = resumed.model
    log.info(f"resumed from {resumed.path} at step {progress.step} (epoch {progress.epoch + 1}, step "
             f"{progress.step_in_epoch} in epoch); widths {list(model.widths)}, nnz {model.nnz:,}")
    log.info(compare_hosts(resumed.meta.get("host"), host)[1])


def checkpoint_model(cfg: Config, state: dict[str, Any], rank_state: dict[str, Any] | None,
                     source: str) -> SparseMLP:
    """The model a loaded checkpoint holds: its replica (``state``), or, in a checkpoint of
    per-rank models, the one in ``rank_state`` (:mod:`~hpc_sparse.engine.rank_models`).
    A UserError if the arrays do not form a model of ``cfg``."""
    try:
        arrays = state or rank_models.unpack(rank_state)
        if not arrays:
            raise UserError(f"checkpoint {source} holds no model for this rank; fix: resume an older checkpoint")
        return model_from_state(cfg, arrays, source)
    except (KeyError, ValueError, TypeError, IndexError) as exc:  # verified arrays that do not form a model
        raise UserError(f"checkpoint {source} does not hold a complete model ({type(exc).__name__}: {exc}); "
                        "fix: resume an older checkpoint") from exc


def replica_arrays(model: SparseMLP) -> tuple[list[np.ndarray], list[str]]:
    """Every index and parameter array of ``model`` with its name: what replicas must agree on."""
    arrays, names = model.topology_arrays()
    params = model.parameter_arrays()
    return arrays + params, names + [f"parameter array {i}" for i in range(len(params))]


def _check_config(cfg: Config, saved: dict[str, Any], source: str, log: RunLog) -> None:
    try:
        old = config_from_dict(saved).to_dict()
    except UserError as exc:  # the same on every rank
        raise UserError(f"checkpoint {source} holds a config this version refuses ({exc})") from exc
    new = cfg.to_dict()
    if old["seed"] != new["seed"]:
        raise UserError(f"checkpoint {source} was trained with seed={old['seed']} but the config says "
                        f"seed={new['seed']}; fix: use the run's seed or a new --run-dir")
    diffs = [f"{sec}.{k}: {old[sec][k]!r} -> {new[sec][k]!r}" for sec in new if isinstance(new[sec], dict)
             for k in new[sec] if old[sec][k] != new[sec][k]]
    if diffs:
        log.info("config differs from the checkpoint's: " + "; ".join(diffs))


def _check_loaded(comm: Any, resumed: Resumed) -> None:
    """Every rank holds the same progress and schedule state, and the same replica model (by
    CRC32 of every array), and rank 0's model is the one saved (SHA-256 recorded in the
    manifest); for per-rank models each rank checks its own recorded SHA-256. Collective;
    raises the same UserError on every rank on any mismatch."""
    model, meta, rank = resumed.model, resumed.meta, comm.Get_rank()
    text = json.dumps({"progress": meta["progress"], "schedule_state": meta.get("schedule_state"),
                       "history": len(meta["history"])}, sort_keys=True).encode()
    arrays, names = [np.frombuffer(text, np.uint8)], ["progress"]
    if "rank_model_sha256" in meta:
        shas = meta["rank_model_sha256"]
        bad = rank >= len(shas) or model.sha256() != shas[rank]
    else:
        model_arrays, model_names = replica_arrays(model)
        arrays += model_arrays
        names += model_names
        bad = rank == 0 and meta.get("model_sha256") not in (None, model.sha256())
    flags = pc.agree_max(comm, np.array([int(bad)], np.int64))
    try:
        pc.check_agreement(comm, arrays, names, what="state loaded")
    except pc.TopologyMismatch as exc:
        raise UserError(f"the ranks loaded different states from {resumed.path} ({exc}); fix: check the file "
                        "system all ranks read, then resume again", every_rank=True) from exc
    if flags[0]:
        raise UserError(f"the model loaded from {resumed.path} differs from the one saved (its model_sha256 "
                        "does not match the manifest's); fix: check the file system, or resume an older "
                        "checkpoint", every_rank=True)


def keep_lineage(comm: Any, run_dir: Path, step: int, invalid: set[Path], log: RunLog) -> None:
    """Rank 0 sets aside every checkpoint newer than ``step``; all ranks wait for it."""
    moved = set_aside_newer(run_dir, step, invalid) if comm.Get_rank() == 0 else []
    for old, new in moved:
        log.info(f"checkpoint {old.name} is newer than the step this run continues from: set aside as "
                 f"{new.name} (not deleted; --resume auto follows this run from now on)")
    comm.Barrier()
