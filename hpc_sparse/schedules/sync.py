"""Synchronous data-parallel training (``parallel.mode = "sync"``), a schedule on the engine.

Each rank trains on its own batch of the epoch's global permutation; every
``parallel.sync_every`` steps (and at every epoch end) the replicas meet and average weights
and momentum with one Allreduce. Topology changes happen only at epoch ends, right after
that meeting, identically on every rank (the engine's topology update; RigL candidates are
exchanged by Allgatherv, and the ranks prove they agree on the new topology). Everything else
(the step loop, the agreement on stop, save and divergence at every meeting, checkpoints,
metrics) is the engine's (:mod:`hpc_sparse.engine.loop`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpc_sparse.data import batch_indices, position_in_epoch, steps_per_epoch
from hpc_sparse.engine import Checkpoint, Engine, EpochEnd, Progress, Resumed
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel.averaging import ReplicaAverager
from hpc_sparse.sparse import SGD


class SyncSchedule:
    """Collective replica averaging; the same model on every rank after every meeting."""

    name = "sync"

    def check_config(self, engine: Engine) -> None:
        """Every option is supported."""

    def check_resume(self, engine: Engine, resumed: Resumed) -> None:
        """Another rank count or batch size: continue at the same fraction of the epoch,
        computed with the saved batch size (see :func:`~hpc_sparse.data.position_in_epoch`)."""
        p, cfg = engine.progress, engine.cfg
        old = (resumed.n_ranks, resumed.batch_size)
        new = (engine.size, cfg.train.batch_size)
        if old == new:
            return
        before = p.step_in_epoch
        p.step_in_epoch = position_in_epoch(before, engine.n_train, *old, *new)
        engine.log.info(f"checkpoint was written by {old[0]} rank(s), resuming on {new[0]} (batch size {old[1]} -> "
                        f"{new[1]}): state re-sharded, data re-partitioned; step {before} of the epoch "
                        f"becomes step {p.step_in_epoch} (never past the saved position: samples after it are "
                        "not skipped, a few before it may be trained again)")

    def run(self, engine: Engine) -> int:
        return engine.train_epochs(SyncPlan(engine))

    def done_state(self, engine: Engine) -> dict[str, Any]:
        return {}


class SyncPlan:
    """The engine's :class:`~hpc_sparse.engine.Plan` for sync mode: rank r trains block r of
    each global batch; the replicas meet every ``parallel.sync_every`` steps (counted over
    the run) and average."""

    phase = None
    step_weight = 1
    polled = False

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        cfg = engine.cfg
        self.steps_per_epoch = steps_per_epoch(engine.n_train, engine.size, cfg.train.batch_size)
        lr = cfg.train.lr * (engine.size if cfg.parallel.lr_scaling == "linear" else 1)
        self.sgd = SGD(lr, cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay)
        self.averager = ReplicaAverager(engine.comm)
        self._comm_seconds = 0.0  # the averager's total at the start of the epoch

    def batch(self, perm: np.ndarray, epoch: int, step_in_epoch: int) -> tuple[np.ndarray, int]:
        e = self.e
        return batch_indices(perm, e.size, e.rank, e.cfg.train.batch_size, step_in_epoch), e.progress.step

    def meets(self, progress: Progress) -> bool:
        return progress.step % self.e.cfg.parallel.sync_every == 0

    def meet(self) -> None:
        self.averager.average_(self.e.model.parameter_arrays())

    def end_epoch(self, epoch: int) -> EpochEnd:
        e = self.e
        gather = lambda lin, val: (pc.allgatherv(e.comm, lin), pc.allgatherv(e.comm, val), e.size)  # noqa: E731
        update = e.update_topology(e.model, epoch, gather=gather)
        if update.changed:
            pc.check_agreement(e.comm, *e.model.topology_arrays())
        comm_seconds = self.averager.comm_seconds - self._comm_seconds
        self._comm_seconds = self.averager.comm_seconds
        return EpochEnd(update, comm_seconds=comm_seconds, bytes_per_sync=self.averager.bytes_per_sync)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(per_rank=False, schedule_state={})
