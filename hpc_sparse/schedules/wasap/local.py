"""WASAP-SGD's local phase (epochs ``E1..E-1``) and the final merge.

Every rank trains alone with the momentum it inherited and evolves its own topology after
every epoch (rank-specific RNG stream ``evolutions + rank * 2**32``; rank 0's is sync
mode's); no gradient traffic. Every ``parallel.sync_every`` batch rounds the ranks agree on
a stop request and on a due checkpoint with one small non-blocking reduction, and save
then (each rank its own model, in its own shard); per epoch one reduction gives the
metrics line (test figures: each rank's local model on its block of the test set, summed:
the local models' mean accuracy, at the cost of one test-set pass as in sync mode).

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

from hpc_sparse.data import batch_indices, block_bounds, epoch_permutation
from hpc_sparse.engine import Engine
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.schedules.wasap.codec import install, model_shapes, pack_floats, pack_indices, unpack_layers
from hpc_sparse.schedules.wasap.snapshot import WasapRun, save_local
from hpc_sparse.sparse import dropout_key
from hpc_sparse.topology import prune_neurons
from hpc_sparse.topology.importance import describe_pruning
from hpc_sparse.topology.pattern import reprune_to_nnz, union_average
from hpc_sparse.topology.schedule import prune_neurons_after_epoch

RANK_STREAM = 1 << 32
"""Local-phase evolution ids: rank r uses ``evolutions + r * 2**32`` (rank 0: as sync mode)."""


class LocalPhase:
    """Phase 2 on this rank. ``saved``: the ``local`` part of a checkpoint's schedule state,
    ``sums``: this rank's saved epoch sums (both None when the phase starts afresh)."""

    def __init__(self, engine: Engine, run: WasapRun, saved: dict[str, Any] | None, sums: np.ndarray | None) -> None:
        self.e, self.run = engine, run
        s = saved or {}
        self.epoch = int(s.get("epoch", run.async_epochs))
        self.round = int(s.get("round", 0))
        self.deferred = int(s.get("deferred", 0))
        self.targets = list(s.get("targets") or [l.nnz for l in engine.model.layers])  # the merge's nnz
        self.sums = np.zeros(3) if sums is None else np.asarray(sums, np.float64).copy()

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "round": self.round, "deferred": self.deferred, "targets": self.targets}

    def agree(self, epoch_end: tuple[float, ...] = ()) -> tuple[np.ndarray, bool, bool]:
        """One non-blocking SUM over the ranks of ``epoch_end`` figures plus (stop requested,
        rank 0's save clock due). Returns (figures, stop, save due)."""
        e = self.e
        flags = [float(e.stop.requested), float(e.rank == 0 and e.save_time_due())]
        red = wp.allreduce_sum(e.comm, np.array([*epoch_end, *flags], np.float64), what="the other ranks' flags")
        stop, due = bool(red[-2]), bool(red[-1]) or e.save_steps_due()
        return red[:-2], stop, due

    def save(self) -> None:
        save_local(self.e, self.run, self.state(), self.sums)

    def run_phase(self) -> int:
        """Epochs ``self.epoch..E-1`` from round ``self.round``; the merge after the last one.
        Returns 0, or EXIT_REQUEUE after a stop with a checkpoint."""
        e, cfg, p, run = self.e, self.e.cfg, self.e.progress, self.run
        data, model, E = e.data, e.model, cfg.train.epochs
        while self.epoch < E:
            epoch = self.epoch
            t0 = time.perf_counter()
            perm = epoch_permutation(run.n_train, cfg.seed, epoch)
            last_idx = None
            while self.round < run.spe:
                s = self.round
                idx = batch_indices(perm, e.size, e.rank, cfg.train.batch_size, s)
                if idx.size:
                    r = model.train_step(*data.train_batch(idx, cfg.seed, epoch), run.sgd,
                                         dropout_key(cfg.seed, epoch * run.spe + s, e.rank, 0))
                    self.sums += (r.loss_sum, r.correct, r.count)
                    last_idx = idx
                self.round += 1
                p.step += e.size
                p.step_in_epoch = self.round
                if self.round % cfg.parallel.sync_every == 0 and self.round < run.spe:
                    _, stop, due = self.agree()
                    if stop:
                        return e.requeue(self.save)
                    if due:
                        self.save()
            last = None if last_idx is None else (data.x_train[last_idx], data.y_train[last_idx])
            stop = self.end_epoch(epoch, t0, last)
            if stop and self.epoch < E:
                return e.requeue(self.save)
        return 0

    def end_epoch(self, epoch: int, t0: float, last_batch: Any) -> bool:
        """Topology update (or the merge after the last epoch), evaluation, metrics; save if
        due. Returns True if a stop was requested."""
        e, cfg, p, model = self.e, self.e.cfg, self.e.progress, self.e.model
        E = cfg.train.epochs
        t_train = time.perf_counter() - t0
        final = epoch == E - 1
        if not final and e.size > 1 and prune_neurons_after_epoch(
                epoch, E, cfg.importance.enabled, cfg.importance.start_epoch, cfg.importance.every):
            self.deferred += 1
        update = e.update_topology(model, epoch, p.evolutions + e.rank * RANK_STREAM, last_batch,
                                   prune=e.size == 1)
        if update.evolved:
            p.evolutions += 1
        t_evolve, merge_removed, local = update.evolve_seconds, None, (0.0, 0.0, 0.0)
        # each rank evaluates its block of the test set: before the merge that measures the
        # local models (each on a different block), after it the one merged model
        lo, hi = block_bounds(e.data.x_test.shape[0], e.size, e.rank)
        if final and e.size > 1:
            ev = model.evaluate(e.data.x_test[lo:hi], e.data.y_test[lo:hi], cfg.train.eval_batch_size)
            local = (ev.loss_sum, ev.correct, ev.count)
            t1 = time.perf_counter()
            merge_removed = merge(e, self.targets, self.deferred)
            t_evolve = time.perf_counter() - t1
        ev = model.evaluate(e.data.x_test[lo:hi], e.data.y_test[lo:hi], cfg.train.eval_batch_size)
        red, stop, due = self.agree((*self.sums, ev.loss_sum, ev.correct, ev.count, t_train, *local))
        self.epoch, self.round, self.sums = epoch + 1, 0, np.zeros(3)
        p.epoch, p.step_in_epoch = self.epoch, 0
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "step": p.step, "phase": "local",
            "train_loss": red[0] / max(red[2], 1), "train_accuracy": red[1] / max(red[2], 1),
            "test_loss": red[3] / max(red[5], 1), "test_accuracy": red[4] / max(red[5], 1),
            "nnz": model.nnz, "neurons": model.hidden_neurons, "widths": list(model.widths),
            "train_seconds": t_train, "evolve_seconds": t_evolve,
            "samples_per_second": red[2] / max(red[6] / e.size, 1e-9), "ranks": e.size,
        }
        details = ""
        if merge_removed is not None:
            rec.update(phase="merge", merge_seconds=t_evolve, merge_repruned_fraction=merge_removed,
                       local_test_loss=red[7] / max(red[9], 1), local_test_accuracy=red[8] / max(red[9], 1))
            details = f", merged; the local models had test_acc {rec['local_test_accuracy']:.4f}"
        rec["epoch_seconds"] = time.perf_counter() - t0
        e.record_epoch(rec, phase=rec["phase"], details=details, every_rank=True)
        if not final and due and not stop:
            self.save()
        return stop


def merge(e: Engine, targets: list[int], deferred_prunes: int) -> float:
    """Union-average every rank's model on rank 0, re-prune to ``targets``, apply deferred
    importance pruning, broadcast; every rank installs the result. Returns rank 0's mean
    fraction of entries removed by the re-pruning (0 elsewhere)."""
    cfg, model = e.cfg, e.model
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
            before = (list(model.widths), model.nnz)
            pruned = prune_neurons(model, cfg.importance.percentile, cfg.importance.min_neurons,
                                   mode=cfg.importance.mode)
            e.log.info("importance pruning (scheduled in the local phase) on the merged model: "
                       + describe_pruning(model, cfg.importance.mode, pruned, before))
        h = wp.Header(wp.MERGE, version=0, shapes=model_shapes(model))
        out = wp.bcast_from_root(e.comm, len(model.layers), h, pack_floats(model, False), pack_indices(model))
    else:
        out = wp.bcast_from_root(e.comm, len(model.layers), None, None, None)
    install(model, out.header, out.floats, out.ints)
    for layer in model.layers:  # momentum is dropped
        layer.w_velocity[...] = 0
        layer.b_velocity[...] = 0
    return removed
