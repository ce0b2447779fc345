"""WASAP-SGD's local phase (epochs ``E1..E-1``) and the final merge: a plan for the engine's
step loop (:mod:`hpc_sparse.engine.loop`).

Every rank trains alone with the momentum it inherited and evolves its own topology after
every epoch (rank-specific RNG stream ``evolutions + rank * 2**32``; rank 0's is sync
mode's); no gradient traffic. Every ``parallel.sync_every`` batch rounds the ranks meet and
agree with a polled reduction (they train apart, so an early rank must not spin); what the
agreement leads to (a checkpoint of every rank's own model in its own shard, a stop) is the
engine's. The epoch's test figures are each rank's local model on its block of the test set,
summed: the local models' mean accuracy, at the cost of one test-set pass as in sync mode.

**Merge** (after the last epoch): every rank sends W and b to rank 0, which averages over
the union of the sparsity patterns (absent entries count as 0), averages the biases,
re-prunes each layer back to its phase-1 nnz with the SET magnitude rule, applies the
importance prunings scheduled in this phase, drops the momentum and broadcasts the result.
With P > 1 those prunings are deferred to the merged model: with ``importance.mode =
"remove"`` the ranks' widths would differ, and with "empty" the union average would refill
a rank's emptied columns from the other ranks' models.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpc_sparse.data import batch_indices
from hpc_sparse.engine import Checkpoint, Engine, EpochEnd, MergeFigures, Progress
from hpc_sparse.engine.topology_update import pruning_due
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.schedules.wasap.codec import install, model_shapes, pack_floats, pack_indices, unpack_layers
from hpc_sparse.schedules.wasap.snapshot import WasapConstants
from hpc_sparse.topology.pattern import reprune_to_nnz, union_average

RANK_STREAM = 1 << 32
"""Local-phase evolution ids: rank r uses ``evolutions + r * 2**32`` (rank 0: as sync mode)."""


class LocalPlan:
    """The engine's :class:`~hpc_sparse.engine.Plan` for the local phase. ``saved``: the
    ``local`` part of a checkpoint's schedule state (None when the phase starts afresh)."""

    phase = "local"
    polled = True

    def __init__(self, engine: Engine, consts: WasapConstants, saved: dict[str, Any] | None) -> None:
        self.e, self.consts = engine, consts
        self.sgd, self.steps_per_epoch, self.step_weight = consts.sgd, consts.steps_per_epoch, engine.size
        s = saved or {}
        self.deferred = int(s.get("deferred", 0))  # importance prunings deferred to the merge
        self.targets = list(s.get("targets") or [l.nnz for l in engine.model.layers])  # the merge's nnz per layer

    def batch(self, perm: np.ndarray, epoch: int, step_in_epoch: int) -> tuple[np.ndarray, int]:
        e = self.e
        idx = batch_indices(perm, e.size, e.rank, e.cfg.train.batch_size, step_in_epoch)
        return idx, epoch * self.steps_per_epoch + step_in_epoch

    def meets(self, progress: Progress) -> bool:
        return progress.step_in_epoch % self.e.cfg.parallel.sync_every == 0

    def meet(self) -> None:
        """The local models stay apart."""

    def end_epoch(self, epoch: int) -> EpochEnd:
        """This rank's topology update (importance pruning only with one rank: with more it is
        deferred to the merge); after the last epoch, with P > 1, the merge."""
        e = self.e
        final = epoch == e.cfg.train.epochs - 1
        if e.size > 1 and not final and pruning_due(e.cfg, epoch):
            self.deferred += 1
        update = e.update_topology(e.model, epoch, stream=e.rank * RANK_STREAM, prune=e.size == 1)
        if not final or e.size == 1:
            return EpochEnd(update)
        local_test = e.evaluate(e.model, polled=True)  # the local models, each on its block
        t0 = time.perf_counter()
        removed = merge(e, self.targets, self.deferred)
        return EpochEnd(update, merge=MergeFigures(time.perf_counter() - t0, removed, *local_test))

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(per_rank=True, schedule_state=self.consts.schedule_state(
            self.e, "local", local={"deferred": self.deferred, "targets": self.targets}))


def merge(e: Engine, targets: list[int], deferred_prunes: int) -> float:
    """Union-average every rank's model on rank 0, re-prune to ``targets``, apply deferred
    importance pruning, broadcast; every rank installs the result. Returns rank 0's mean
    fraction of entries removed by the re-pruning (0 elsewhere)."""
    model = e.model
    h = wp.Header(wp.MERGE, version=0, shapes=model_shapes(model))
    msgs = wp.gather_to_root(e.comm, h, pack_floats(model, False), pack_indices(model))
    removed = 0.0
    if e.rank == 0:
        assert msgs is not None
        per_rank = [unpack_layers(m.header, m.floats, m.ints) for m in msgs]
        for l, layer in enumerate(model.layers):
            recs = [pr[l] for pr in per_rank]
            indptr, indices, data = union_average([(r["shape"], r["indptr"], r["indices"], r["data"]) for r in recs])
            union = data.size
            indptr, indices, data = reprune_to_nnz(indptr, indices, data, targets[l])
            removed += (union - data.size) / max(union, 1) / len(model.layers)
            layer.bias = np.mean(np.stack([r["bias"].astype(np.float64) for r in recs]), axis=0).astype(np.float32)
            layer.b_velocity = np.zeros_like(layer.bias)
            layer.set_weight(sp.csr_matrix((data, indices, indptr), shape=recs[0]["shape"]), None)
        model.topology_changed()
        for _ in range(deferred_prunes):
            e.prune(model, "(scheduled in the local phase) on the merged model")
        h = wp.Header(wp.MERGE, version=0, shapes=model_shapes(model))
        out = wp.bcast_from_root(e.comm, len(model.layers), h, pack_floats(model, False), pack_indices(model))
    else:
        out = wp.bcast_from_root(e.comm, len(model.layers), None, None, None)
    install(model, out.header, out.floats, out.ints)
    for layer in model.layers:  # momentum is dropped
        layer.w_velocity[...] = 0
        layer.b_velocity[...] = 0
    return removed
