"""What WASAP-SGD's phases share: the run's constants, and the checkpoint of each phase.

* **Asynchronous phase** (a *snapshot*): once the server has held every worker (each one's
  last gradient applied and answered with HOLD), rank 0 broadcasts the decision (stop or
  go on), the progress and its model with momentum; every rank installs that model and
  they save it together, a replica like sync mode's. The schedule state records where
  every rank stands in its batch sequence (``replied``, ``limit``, rank 0's ``own``), the
  server epoch's running sums and the counters, which is all a resume needs.
* **Local phase**: every rank saves its own model (and its epoch sums) in its own shard
  (the checkpoint's per-rank state); the schedule state records the epoch and round.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hpc_sparse.engine import MODEL_PREFIX, Engine, Progress
from hpc_sparse.model_builder import model_rank_arrays
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.schedules.wasap.codec import full_model_header, install
from hpc_sparse.sparse import SGD

LOCAL_SUMS = "local/sums"
"""Per-rank state key of a rank's (loss sum, hits, samples) of the current local epoch."""


@dataclass
class WasapRun:
    """Constants of one WASAP-SGD run (the same on every rank)."""

    n_train: int
    spe: int  # steps per epoch of the data partition (the dropout counter's unit)
    upe: int  # accepted updates per server epoch
    async_epochs: int
    sgd: SGD

    def schedule_state(self, engine: Engine, phase: str, **parts: Any) -> dict[str, Any]:
        """The JSON a checkpoint of ``phase`` ("async", "local", "done") stores."""
        return {"phase": phase, "epochs": engine.cfg.train.epochs, "async_epochs": self.async_epochs,
                "ranks": engine.size, **parts}


def server_snapshot(engine: Engine, run: WasapRun, stop: bool, version: int, async_state: dict[str, Any]) -> bool:
    """Rank 0's side of an asynchronous-phase checkpoint (every worker held): broadcast the
    decision, the progress and the model, save collectively. Returns ``stop``."""
    info = {"stop": bool(stop), "progress": asdict(engine.progress)}
    pc.bcast_bytes(engine.comm, json.dumps(info).encode())
    if engine.size > 1:
        h, floats, ints = full_model_header(engine.model, version=version)
        wp.bcast_from_root(engine.comm, len(engine.model.layers), h, floats, ints)
    _save_async(engine, run, async_state)
    return bool(stop)


def worker_snapshot(engine: Engine, run: WasapRun) -> tuple[bool, int]:
    """A worker's side of :func:`server_snapshot`: take the progress and the server's model,
    save with everyone. Returns (stop, the topology version of the model it now holds)."""
    info = json.loads(pc.bcast_bytes(engine.comm, None).decode())
    set_progress(engine.progress, info["progress"])
    msg = wp.bcast_from_root(engine.comm, len(engine.model.layers), None, None, None)
    install(engine.model, msg.header, msg.floats, msg.ints)
    _save_async(engine, run, {})
    return bool(info["stop"]), msg.header.version


def _save_async(engine: Engine, run: WasapRun, async_state: dict[str, Any]) -> None:
    """Collective save of the server's model (now on every rank); rank 0's meta is written."""
    engine.save(Progress(**asdict(engine.progress)), state=engine.model.state_dict(),
                schedule_state=run.schedule_state(engine, "async", **{"async": async_state}))


def save_local(engine: Engine, run: WasapRun, local_state: dict[str, Any], sums: np.ndarray) -> None:
    """Collective save of the local phase: each rank's own model and epoch sums in its shard."""
    rank_state = {MODEL_PREFIX + k: v for k, v in model_rank_arrays(engine.model).items()}
    rank_state[LOCAL_SUMS] = np.asarray(sums, np.float64)
    engine.save(Progress(**asdict(engine.progress)), state=None, rank_state=rank_state,
                schedule_state=run.schedule_state(engine, "local", local=local_state))


def set_progress(p: Progress, values: dict[str, Any]) -> None:
    """Overwrite ``p`` in place (the schedule's loops hold a reference to it)."""
    for k, v in values.items():
        setattr(p, k, v)


def share_progress(engine: Engine) -> None:
    """Every rank takes rank 0's progress (collective)."""
    text = json.dumps(asdict(engine.progress)).encode() if engine.rank == 0 else None
    set_progress(engine.progress, json.loads(pc.bcast_bytes(engine.comm, text).decode()))
