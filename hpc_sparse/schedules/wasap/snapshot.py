"""What WASAP-SGD's phases share: the run's constants, and the asynchronous phase's meeting.

* **The snapshot** (asynchronous phase): once the server has held every worker (each one's
  last gradient applied and answered with HOLD), rank 0 broadcasts the progress, the history,
  its schedule state and its model with momentum; every rank installs that model, so the ranks
  hold one replica, and they agree (:meth:`~hpc_sparse.engine.Engine.agree`): the engine then
  writes the replica's checkpoint, or stops (exit 75), or neither
  (:meth:`~hpc_sparse.engine.Engine.act`). The schedule state records where every rank
  stands in its batch sequence (``replied``, ``limit``, rank 0's ``own``), the server
  epoch's running sums and the counters, which is all a resume needs.
* **Local phase**: every rank's own model goes into its own shard (the engine's per-rank
  checkpoint); the schedule state records the merge's targets and the deferred prunings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from hpc_sparse.data import steps_per_epoch, updates_per_server_epoch
from hpc_sparse.engine import Checkpoint, Engine
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.schedules.wasap.codec import final_message, install
from hpc_sparse.sparse import SGD


@dataclass(frozen=True)
class WasapConstants:
    """The constants of one WASAP-SGD run (the same on every rank)."""

    n_train: int
    steps_per_epoch: int
    """Steps per epoch of the data partition (the dropout counter's unit)."""
    updates_per_epoch: int
    """Accepted updates per server epoch (every non-empty batch of every rank, once)."""
    async_epochs: int
    sgd: SGD
    """The one update rule: ``train.lr`` unscaled, momentum, Nesterov, weight decay."""

    @classmethod
    def of(cls, engine: Engine, async_epochs: int) -> WasapConstants:
        cfg, n, size = engine.cfg, engine.n_train, engine.size
        b = cfg.train.batch_size
        return cls(n, steps_per_epoch(n, size, b), updates_per_server_epoch(n, size, b), async_epochs,
                   SGD(cfg.train.lr, cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay))

    def schedule_state(self, engine: Engine, phase: str, **parts: Any) -> dict[str, Any]:
        """The JSON a checkpoint of ``phase`` ("async", "local", "done") stores."""
        return {"phase": phase, "epochs": engine.cfg.train.epochs, "async_epochs": self.async_epochs,
                "ranks": engine.size, **parts}


def snapshot(engine: Engine, consts: WasapConstants, version: int = 0, async_state: dict[str, Any] | None = None
             ) -> tuple[int | None, int]:
    """The asynchronous phase's meeting, on every rank once every worker is held (rank 0
    passes its topology ``version`` and schedule state; the workers' are ignored). Returns the
    engine's verdict (None: go on; else the status to end the run with) and the topology
    version of the model every rank now holds. Collective."""
    e = engine
    text = json.dumps({"progress": asdict(e.progress), "history": e.history, "async": async_state,
                       "version": version}).encode() if e.rank == 0 else None
    shared = json.loads(pc.bcast_bytes(e.comm, text).decode())
    set_position(e, shared)
    if e.size > 1:
        out = wp.bcast_from_root(e.comm, len(e.model.layers), *(final_message(e.model, shared["version"])
                                                                 if e.rank == 0 else (None, None, None)))
        if e.rank != 0:
            install(e.model, out.header, out.floats, out.ints)
    state = consts.schedule_state(e, "async", **{"async": shared["async"]})
    return e.act(e.agree(polled=True), Checkpoint(per_rank=False, schedule_state=state)), shared["version"]


def share_position(engine: Engine) -> None:
    """Every rank takes rank 0's progress and history (the asynchronous phase's records exist
    only there). Collective."""
    e = engine
    text = json.dumps({"progress": asdict(e.progress), "history": e.history}).encode() if e.rank == 0 else None
    set_position(e, json.loads(pc.bcast_bytes(e.comm, text).decode()))


def set_position(engine: Engine, shared: dict[str, Any]) -> None:
    """Overwrite the progress and the history in place (the step loop holds references)."""
    for k, v in shared["progress"].items():
        setattr(engine.progress, k, v)
    engine.history[:] = shared["history"]
