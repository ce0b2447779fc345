"""The one step loop: each rank trains its batches of the epoch, the replicas meet, epochs end.

Every schedule in which each rank trains its block of each epoch's global permutation (sync
averaging; WASAP-SGD's local phase) runs on :func:`train_epochs`. The schedule hands it a
:class:`Plan`, which says only who trains which batch and when the replicas meet:

* this rank's batch of each step and its dropout counter (:meth:`Plan.batch`), the SGD rule,
  how many steps an epoch has and how the step counter advances;
* the meeting points within an epoch (:meth:`Plan.meets`) and what the replicas do there
  (:meth:`Plan.meet`: sync mode averages; WASAP-SGD's local models do nothing);
* its part of an epoch's end (:meth:`Plan.end_epoch`: the topology update it asks the engine
  for, with its RNG stream and candidate exchange; WASAP-SGD's merge after the last epoch);
* what its checkpoints hold (:meth:`Plan.checkpoint`: one replica, or a model per rank).

The loop does everything else, the same way for every schedule: the training step and the
epoch's sums (:meth:`Engine.train_batch`), the agreement at each meeting point and at each
epoch end (:meth:`Engine.agree`: stop, save, divergence), what follows from it
(:meth:`Engine.act`: a checkpoint, a stop with exit 75, or, once the run is complete, neither),
evaluation, the metrics record and the progress. A meeting point is also made at
``train.max_steps``, where the run is complete.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hpc_sparse.data import epoch_permutation
from hpc_sparse.engine.metrics import MergeFigures, Traffic
from hpc_sparse.engine.progress import Progress
from hpc_sparse.engine.topology_update import TopologyUpdate
from hpc_sparse.sparse import SGD

if TYPE_CHECKING:
    from hpc_sparse.engine.core import Engine


@dataclass(frozen=True)
class Checkpoint:
    """What a schedule's checkpoint holds besides the engine's own meta (config, progress,
    history, host)."""

    per_rank: bool
    """True: every rank's own model, in its own shard; False: the replica every rank holds."""
    schedule_state: dict[str, Any]
    """JSON the schedule needs to continue (e.g. WASAP-SGD's phase and positions)."""


@dataclass(frozen=True)
class EpochEnd:
    """What a schedule's part of an epoch's end did (:meth:`Plan.end_epoch`)."""

    update: TopologyUpdate
    comm_seconds: float | None = None
    """Seconds spent averaging replicas in the epoch (None: the schedule does not average)."""
    bytes_per_sync: int = 0
    merge: MergeFigures | None = None


class Plan(Protocol):
    """Who trains which batch and when the replicas meet (see the module docstring)."""

    phase: str | None
    """The metrics records' ``phase`` (None: the records have none)."""
    sgd: SGD
    steps_per_epoch: int
    step_weight: int
    """How much ``progress.step`` grows per step of the loop (1; WASAP-SGD's local phase: P)."""
    polled: bool
    """Agreements are polled (ranks may arrive far apart) rather than blocking."""

    def batch(self, perm: np.ndarray, epoch: int, step_in_epoch: int) -> tuple[np.ndarray, int]:
        """This rank's sample indices of the step (int64, may be empty) and its dropout counter."""
        ...

    def meets(self, progress: Progress) -> bool:
        """After the step just taken (mid-epoch): do the replicas meet?"""
        ...

    def meet(self) -> None:
        """What the replicas do when they meet (also at every epoch end), before they agree."""
        ...

    def end_epoch(self, epoch: int) -> EpochEnd:
        """The schedule's part of the end of 0-based ``epoch``, after the replicas met and agreed."""
        ...

    def checkpoint(self) -> Checkpoint:
        """What a checkpoint taken now holds."""
        ...


def train_epochs(engine: Engine, plan: Plan) -> int:
    """Train from ``engine.progress`` until the run is complete (returns 0) or the ranks agree
    to stop (a checkpoint is written; returns ``EXIT_REQUEUE``). Collective."""
    p, cfg = engine.progress, engine.cfg
    while not engine.complete():
        epoch, t0 = p.epoch, time.perf_counter()
        perm = epoch_permutation(engine.n_train, cfg.seed, epoch)
        engine.log.start_epoch(epoch, cfg.train.epochs, plan.steps_per_epoch, p.step_in_epoch)
        while p.step_in_epoch < plan.steps_per_epoch:
            idx, dropout_step = plan.batch(perm, epoch, p.step_in_epoch)
            result = engine.train_batch(idx, epoch, dropout_step, plan.sgd)
            if result is not None:
                engine.sums += (result.loss_sum, result.correct, result.count)
            p.step += plan.step_weight
            p.step_in_epoch += 1
            if p.step_in_epoch < plan.steps_per_epoch and (plan.meets(p) or engine.complete()):
                plan.meet()
                status = engine.act(engine.agree(nonfinite=not math.isfinite(engine.sums[0]), polled=plan.polled),
                                    plan.checkpoint())
                if status is not None:
                    return status
                if engine.complete():  # train.max_steps, mid-epoch
                    engine.log.end_epoch()
                    return 0
        engine.log.end_epoch()
        status = _end_epoch(engine, plan, t0)
        if status is not None:
            return status
    return 0


def _end_epoch(engine: Engine, plan: Plan, t0: float) -> int | None:
    """The replicas meet and agree (flags, the epoch's training sums, train seconds), the
    schedule ends the epoch (topology, merge), evaluation, the record and the progress
    (:meth:`Engine.close_epoch`); then a checkpoint or a stop if agreed."""
    p, model = engine.progress, engine.model
    plan.meet()
    train_seconds = time.perf_counter() - t0
    agreed = engine.agree(nonfinite=not math.isfinite(engine.sums[0]), figures=(*engine.sums, train_seconds),
                          polled=plan.polled)
    engine.raise_if_diverged(agreed)
    epoch = p.epoch
    end = plan.end_epoch(epoch)
    test = engine.evaluate(model, polled=plan.polled)
    sums = agreed.figures
    train = (p.epoch_loss_sum + sums[0], p.epoch_correct + sums[1], p.epoch_count + sums[2])
    traffic = None if end.comm_seconds is None else Traffic(end.comm_seconds / max(train_seconds, 1e-9),
                                                            end.bytes_per_sync)
    engine.close_epoch(epoch, train, test, t0, train_seconds, sums[3] / engine.size, end.update, shared=True,
                       phase="merge" if end.merge is not None else plan.phase, traffic=traffic, merge=end.merge)
    return engine.act(agreed, plan.checkpoint())
