"""WASAP-SGD (PAPER.md §4): an asynchronous parameter-server phase, local training, a final merge.

``parallel.mode = "wasap"``; :meth:`hpc_sparse.train.Trainer.run` dispatches here.

Phases (``E = train.epochs``, ``E1 = async_epochs(E, parallel.async_fraction)``):

1. **Asynchronous (epochs 0..E1-1).** Rank 0 holds the master model. Every rank, rank 0
   included, trains on its block (``block_bounds``) of each epoch's global permutation.
   A worker (rank >= 1) computes the gradient of one batch on its copy of the model, sends it
   (GRAD) and installs the model the server sends back (MODEL: weights and biases; indices
   only if the topology changed since that worker's last pull). Workers are pipelined: they
   compute the next gradient while the server handles the last one. Rank 0 applies every
   gradient at once with momentum SGD at a constant lr (no staleness weighting; entries that
   are not in the server's current topology are dropped, missing ones get 0) and, **unlike the
   paper's idle server**, between requests trains on its own block directly on the master
   model (one fused step at a time), polling for requests with ``Testany``; when its own
   batches are done it takes over the last batches of the slowest worker (those the worker
   cannot have started: :func:`stealable`), and only sleeps (short back-off) when there is
   nothing left to do. Every ``sum_r ceil(n_r / batch)`` accepted updates
   (the batches of one epoch over all ranks, ~``N // batch``) are one *server epoch*: the server
   importance-prunes (if scheduled), evolves (SET/RigL, if scheduled) and evaluates, and a
   metrics line is written. When a worker has sent its last batch it says DONE; once all have,
   the server sends every worker the same FINAL model (with momentum), so all ranks start
   phase 2 from one identical model.
2. **Local (epochs E1..E-1).** Every rank trains alone with the inherited momentum and
   evolves its own topology after every epoch (rank-specific RNG stream); no gradient traffic.
   Per epoch one small non-blocking reduction gives the metrics line (test figures: each
   rank's local model on its block of the test set, summed: the local models' mean accuracy,
   at the cost of one test-set pass as in sync mode).
3. **Merge.** Every rank sends W and b to rank 0, which averages over the union of the
   sparsity patterns (absent entries count as 0), averages the biases, re-prunes each layer
   back to its phase-1 nnz with the SET magnitude rule (``zeta' = (nnz(W_avg) - target) /
   nnz(W_avg)``, removal only), drops the momentum and broadcasts the result; every rank
   ends with the identical model (checked). Importance pruning scheduled in phase 2 is
   applied to the merged model (see :func:`run_wasap`).

With one rank there are no workers: phase 1 is the server training alone, phase 2 is the
same local training, and there is nothing to merge. This is plain local training and gives
the same model, bit for bit, as ``parallel.mode = "sync"`` on one rank.

Checkpoints and resume (limited): wasap mode writes a checkpoint only at the end of the run
(``checkpoint.at_end``); ``checkpoint.every_steps``/``every_seconds`` and SLURM stop signals
are not handled (a signal ends the job without a checkpoint). ``--resume`` of a run that is
complete just rewrites its summary; resuming a checkpoint from the middle of a run raises a
:class:`~hpc_sparse.errors.UserError`.
"""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from hpc_sparse.data import Dataset, batch_indices, block_bounds, epoch_permutation, steps_per_epoch
from hpc_sparse.errors import UserError
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.sparse import SGD, SparseMLP, dropout_key
from hpc_sparse.topology import evolve_model, prune_neurons
from hpc_sparse.topology.evolution import set_keep_mask
from hpc_sparse.topology.schedule import drop_fraction, evolve_after_epoch, prune_neurons_after_epoch

if TYPE_CHECKING:
    from hpc_sparse.train import Trainer

_RANK_STREAM = 1 << 32  # phase-2 evolution ids: rank r uses evolutions + r * 2**32 (rank 0: as sync mode)


# ---------------------------------------------------------------------------- pure functions
def async_epochs(epochs: int, fraction: float) -> int:
    """Epochs of the asynchronous phase: ``floor(fraction * epochs)`` computed exactly on the
    decimal value of ``fraction`` (0.7 * 10 -> 7, 0.7 * 3 -> 2), within ``[0, epochs]``."""
    return max(0, min(int(epochs), math.floor(Fraction(repr(float(fraction))) * int(epochs))))


def updates_per_server_epoch(n_train: int, size: int, batch_size: int) -> int:
    """Non-empty batches of one epoch summed over all ranks: ``sum_r ceil(n_r / batch_size)``."""
    return sum(-(-(hi - lo) // batch_size) for lo, hi in (block_bounds(n_train, size, r) for r in range(size)))


def union_average(mats: Sequence[tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of CSR matrices over the union of their patterns (absent entries count as 0).

    Parameters
    ----------
    mats : sequence of (shape, indptr, indices, data)
        P matrices of one shape, sorted indices; data float32.

    Returns
    -------
    indptr (n_in + 1,) int64, indices (nnz,) int64, data (nnz,) float32
        Row-major sorted; ``nnz`` is the size of the union (exact-zero means are kept).
        Sums run in float64 in the order of ``mats``, so the result is deterministic.
    """
    shape = mats[0][0]
    if any(tuple(m[0]) != tuple(shape) for m in mats):
        raise ValueError(f"cannot average matrices of shapes {[tuple(m[0]) for m in mats]}")
    n_in, n_out = shape
    keys, vals = [], []
    for _, indptr, indices, data in mats:
        rows = np.repeat(np.arange(n_in, dtype=np.int64), np.diff(indptr))
        keys.append(rows * n_out + indices.astype(np.int64))
        vals.append(data.astype(np.float64))
    uniq, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    sums = np.bincount(inverse, weights=np.concatenate(vals), minlength=uniq.size)
    rows, cols = np.divmod(uniq, n_out)
    out_indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_in), out=out_indptr[1:])
    return out_indptr, cols, (sums / len(mats)).astype(np.float32)


def reprune_to_nnz(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, target: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove the weakest entries back to about ``target`` with the SET magnitude rule at
    ``zeta' = (nnz - target) / nnz`` (per sign, the ``floor(zeta' * n_sign)`` closest to 0;
    exact zeros always go). Removal only. Returns new (indptr, indices, data)."""
    n = data.size
    zeta = (n - target) / n if n > target else 0.0
    keep = set_keep_mask(data, zeta)
    n_in = indptr.size - 1
    rows = np.repeat(np.arange(n_in), np.diff(indptr))
    out_indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=n_in), out=out_indptr[1:])
    return out_indptr, indices[keep], data[keep]


def remap_positions(n_out: int, old_indptr: np.ndarray, old_indices: np.ndarray, new_indptr: np.ndarray,
                    new_indices: np.ndarray) -> np.ndarray:
    """For every entry of an old CSR pattern, its position in a new pattern of the same shape,
    or -1 where the new pattern lacks it: (old nnz,) int64. Both patterns row-major sorted.
    O(nnz log nnz); used to carry a gradient computed on an older topology over to the current one."""
    def keys(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
        rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
        return rows * n_out + indices.astype(np.int64)

    old, new = keys(old_indptr, old_indices), keys(new_indptr, new_indices)
    if new.size == 0:
        return np.full(old.size, -1, np.int64)
    pos = np.minimum(np.searchsorted(new, old), new.size - 1)
    return np.where(new[pos] == old, pos, -1).astype(np.int64)


# ------------------------------------------------------------- model <-> flat message arrays
def model_shapes(model: SparseMLP) -> list[tuple[int, int, int]]:
    """(nnz, n_in, n_out) of every layer, as carried in message headers."""
    return [(l.nnz, l.shape[0], l.shape[1]) for l in model.layers]


def pack_floats(model: SparseMLP, momentum: bool) -> np.ndarray:
    """float32: per layer ``W.data``, ``b``; then (momentum) per layer ``W momentum``, ``b momentum``."""
    parts = [a for l in model.layers for a in (l.weight.data, l.bias)]
    if momentum:
        parts += [a for l in model.layers for a in (l.w_velocity, l.b_velocity)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def pack_indices(model: SparseMLP) -> np.ndarray:
    """int64: per layer ``indptr``, ``indices``."""
    return np.concatenate([a.astype(np.int64) for l in model.layers for a in (l.weight.indptr, l.weight.indices)])


def unpack_layers(header: wp.Header, floats: np.ndarray, ints: np.ndarray | None) -> list[dict[str, Any]]:
    """Split a MODEL/FINAL/MERGE payload into per-layer arrays (views into the payload):
    ``data``, ``bias``, and if present ``velocity``, ``b_velocity``, ``indptr``, ``indices``."""
    out: list[dict[str, Any]] = [{"shape": (n_in, n_out)} for _, n_in, n_out in header.shapes]
    pos = 0
    keys = [("data", "bias")]
    if header.kind in (wp.MODEL, wp.FINAL) and header.flags & wp.FLAG_MOMENTUM:
        keys.append(("velocity", "b_velocity"))
    for kw, kb in keys:
        for rec, (nnz, _, n_out) in zip(out, header.shapes):
            rec[kw] = floats[pos:pos + nnz]
            rec[kb] = floats[pos + nnz:pos + nnz + n_out]
            pos += nnz + n_out
    if ints is not None:
        ipos = 0
        for rec, (nnz, n_in, _) in zip(out, header.shapes):
            rec["indptr"] = ints[ipos:ipos + n_in + 1]
            rec["indices"] = ints[ipos + n_in + 1:ipos + n_in + 1 + nnz]
            ipos += n_in + 1 + nnz
    if pos != floats.size:
        raise wp.ProtocolError(f"payload has {floats.size} floats, its header describes {pos}; this is a bug")
    return out


def install(model: SparseMLP, header: wp.Header, floats: np.ndarray, ints: np.ndarray | None) -> None:
    """Replace ``model``'s weights and biases (and momentum, if sent) by a received model. With
    indices the topology is rebuilt; without, values are copied into the current topology."""
    widths = model.widths
    for layer, rec in zip(model.layers, unpack_layers(header, floats, ints)):
        vel = rec.get("velocity")
        if "indptr" in rec:
            layer.bias = rec["bias"].copy()
            layer.b_velocity = rec["b_velocity"].copy() if vel is not None else np.zeros_like(layer.bias)
            w = sp.csr_matrix((rec["data"], rec["indices"], rec["indptr"]), shape=rec["shape"])
            layer.set_weight(w, vel)
        else:
            if layer.shape != rec["shape"] or layer.nnz != rec["data"].size:
                raise wp.ProtocolError(f"values for shape {rec['shape']} with nnz {rec['data'].size} sent without "
                                       f"indices to a layer of shape {layer.shape}, nnz {layer.nnz}; this is a bug")
            np.copyto(layer.weight.data, rec["data"])
            np.copyto(layer.bias, rec["bias"])
            if vel is not None:
                np.copyto(layer.w_velocity, vel)
                np.copyto(layer.b_velocity, rec["b_velocity"])
    if model.widths != widths:
        model.topology_changed()


def _sgd_(w: np.ndarray, v: np.ndarray, g: np.ndarray, sgd: SGD) -> None:
    """In place: the same rule as the fused training kernels (``g += decay*w``;
    ``v <- mu*v - lr*g``; ``w <- w + v``, or ``w + mu*v - lr*g`` with Nesterov)."""
    lr, mu = np.float32(sgd.lr), np.float32(sgd.momentum)
    if sgd.weight_decay:
        g = g + np.float32(sgd.weight_decay) * w
    v *= mu
    v -= lr * g
    if sgd.nesterov:
        w += mu * v - lr * g
    else:
        w += v


def _own_batches(n_train: int, size: int, rank: int, batch: int, seed: int, epochs: range, spe: int
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, step, indices) of this rank's non-empty batches in ``epochs``; step is the
    global batch-round counter ``epoch * spe + s`` (the sync trainer's step)."""
    for epoch in epochs:
        perm = epoch_permutation(n_train, seed, epoch)
        for s in range(spe):
            idx = batch_indices(perm, size, rank, batch, s)
            if idx.size:
                yield epoch, epoch * spe + s, idx


class AsyncBatches:
    """One rank's batches of the asynchronous phase as a sequence: item ``i`` is batch
    ``s = i % per_epoch`` of epoch ``e = i // per_epoch`` of the rank's block, where
    ``per_epoch = ceil(block / batch_size)`` (its non-empty batches). ``self[i]`` is
    ``(epoch, step, indices)`` with the sync trainer's step ``e * spe + s``. Any rank can
    compute any rank's items, so the server can take over the tail of a worker's sequence."""

    def __init__(self, n_train: int, size: int, rank: int, batch_size: int, seed: int, spe: int, epochs: int) -> None:
        lo, hi = block_bounds(n_train, size, rank)
        self.n_train, self.size, self.rank, self.batch_size, self.seed, self.spe = n_train, size, rank, batch_size, \
            seed, spe
        self.per_epoch = -(-(hi - lo) // batch_size)
        self.n = epochs * self.per_epoch
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(f"batch {i} outside [0, {self.n})")
        epoch, s = divmod(i, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, epoch_permutation(self.n_train, self.seed, epoch)
        return epoch, epoch * self.spe + s, batch_indices(self._perm, self.size, self.rank, self.batch_size, s)


def stealable(limit: int, replied: int) -> int:
    """How many batches at the end of a worker's sequence the server may take over.

    The worker has taken every batch up to ``replied + 2`` (with one gradient pipelined, it
    computes batch k+1 before it reads the reply to k and k+2 only after). A new limit
    travels in the next reply (to batch ``replied + 1``), read before the worker starts
    batch ``replied + 3``: so batches ``>= replied + 3`` (and ``< limit``) are free."""
    return max(0, limit - (replied + 3))


# ---------------------------------------------------------------------------------- server
class _Server:
    """Rank 0 in phase 1: the master model, its topology versions and the server-epoch clock."""

    def __init__(self, tr: "Trainer", data: Dataset, sgd: SGD, spe: int, upe: int, async_ep: int) -> None:
        self.tr, self.data, self.sgd = tr, data, sgd
        self.cfg, self.model = tr.cfg, tr.model
        self.spe, self.upe, self.async_epochs = spe, upe, async_ep
        self.endpoint = wp.ServerEndpoint(tr.comm, len(self.model.layers))
        self.version = 0
        self.patterns: dict[int, list[tuple[tuple[int, int], np.ndarray, np.ndarray]]] = {}
        self.maps: dict[tuple[int, int], np.ndarray] = {}
        # topology versions of each worker's two newest pulls: a pipelined worker's gradient
        # lives on one of them (the model it held before its last reply was installed, or after)
        self.worker_versions = {w: (0, 0) for w in self.endpoint.workers}
        # work stealing: each worker's batch sequence, its limit, and its last answered batch
        n_train, cfg = data.x_train.shape[0], tr.cfg
        self.batches = {w: AsyncBatches(n_train, tr.size, w, cfg.train.batch_size, cfg.seed, spe, async_ep)
                        for w in range(tr.size)}
        self.limit = {w: len(self.batches[w]) for w in self.endpoint.workers}
        self.replied = {w: -1 for w in self.endpoint.workers}
        self.updates = 0
        self.epoch = 0
        self.totals = {"worker": 0, "own": 0, "taken": 0, "stale": 0, "dropped": 0}
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.t_epoch = time.perf_counter()
        self.e_loss = self.e_correct = self.e_count = self.e_known = 0.0
        self.e_stale = self.e_dropped = self.e_updates = 0
        self.e_bytes = self.endpoint.bytes_sent + self.endpoint.bytes_received
        self.e_wait = self.endpoint.poller.wait_seconds

    # -- updates
    def own_step(self, step: int, idx: np.ndarray, rank: int = 0) -> None:
        """One fused training step on the master model (rank: whose batch it is, for dropout)."""
        r = self.model.train_step(self.data.x_train[idx], self.data.y_train[idx], self.sgd,
                                  dropout_key(self.cfg.seed, step, rank, 0))
        self.totals["own" if rank == 0 else "taken"] += 1
        self._count(r.loss_sum, r.correct, r.count)

    def take_over(self) -> bool:
        """Train the last free batch of the worker with the most free batches left (rank 0
        has none of its own left); the worker learns its new limit with its next reply."""
        free = {w: stealable(self.limit[w], self.replied[w]) for w in self.limit}
        w = max(free, key=lambda r: (free[r], -r), default=None)
        if w is None or free[w] == 0:
            return False
        self.limit[w] -= 1
        _, step, idx = self.batches[w][self.limit[w]]
        self.own_step(step, idx, rank=w)
        return True

    def worker_step(self, msg: wp.Message) -> None:
        h, w = msg.header, msg.source
        if h.item != self.replied[w] + 1 or h.item >= self.limit[w]:
            raise wp.ProtocolError(f"rank {w} sent batch {h.item}; expected {self.replied[w] + 1} below its limit "
                                   f"{self.limit[w]}; this is a bug")
        self.replied[w] = h.item
        if h.version not in self.worker_versions[w]:
            raise wp.ProtocolError(f"rank {w} sent a gradient on topology {h.version} but was last sent "
                                   f"{self.worker_versions[w]}; this is a bug")
        grads = self._aligned(h, msg.floats)
        if grads is None:
            self.e_dropped += 1
            self.totals["dropped"] += 1
        else:
            for layer, (gw, gb) in zip(self.model.layers, grads):
                _sgd_(layer.weight.data, layer.w_velocity, gw, self.sgd)
                _sgd_(layer.bias, layer.b_velocity, gb, self.sgd)
        self.totals["worker"] += 1
        self._count(h.loss_sum, h.correct, h.count)

    def _aligned(self, h: wp.Header, floats: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Per layer (dW aligned with the current W.data, db), or None if the gradient's layer
        widths no longer exist (importance pruning since the worker's pull)."""
        cur = model_shapes(self.model)
        stale = h.version != self.version
        if stale:
            old = self.patterns.get(h.version)
            if old is None:
                raise wp.ProtocolError(f"no record of topology version {h.version}; this is a bug")
            if any(o[0] != c[1:] for o, c in zip(old, cur)):
                return None
            self.e_stale += 1
            self.totals["stale"] += 1
        elif [tuple(s) for s in h.shapes] != cur:
            raise wp.ProtocolError(f"gradient shapes {h.shapes} do not match the model {cur}; this is a bug")
        out, pos = [], 0
        for l, (nnz, _, n_out) in enumerate(h.shapes):
            gw, gb = floats[pos:pos + nnz], floats[pos + nnz:pos + nnz + n_out]
            pos += nnz + n_out
            if stale:
                where = self._map(h.version, l)
                full = np.zeros(self.model.layers[l].nnz, np.float32)
                hit = where >= 0
                full[where[hit]] = gw[hit]
                gw = full
            out.append((gw, gb))
        return out

    def _map(self, version: int, l: int) -> np.ndarray:
        """For each entry of layer ``l`` in topology ``version``: its position in the current
        W.data, or -1 if the current topology does not have it."""
        key = (version, l)
        if key not in self.maps:
            shape, indptr, indices = self.patterns[version][l]
            w = self.model.layers[l].weight
            self.maps[key] = remap_positions(shape[1], indptr, indices, w.indptr, w.indices)
        return self.maps[key]

    def _count(self, loss_sum: float, correct: int, count: int) -> None:
        self.e_loss += loss_sum
        self.e_count += count
        if correct >= 0:
            self.e_correct += correct
            self.e_known += count
        self.updates += 1
        self.e_updates += 1
        if self.updates % self.upe == 0:
            self._end_epoch()

    # -- replies
    def reply(self, w: int, kind: int) -> None:
        indices = kind == wp.FINAL or self.worker_versions[w][1] != self.version
        momentum = kind == wp.FINAL
        flags = (wp.FLAG_INDICES if indices else 0) | (wp.FLAG_MOMENTUM if momentum else 0)
        h = wp.Header(kind, step=self.updates, version=self.version, flags=flags, item=self.limit.get(w, 0),
                      shapes=model_shapes(self.model))
        self.endpoint.reply(w, h, pack_floats(self.model, momentum), pack_indices(self.model) if indices else None)
        self.worker_versions[w] = (self.worker_versions[w][1], self.version)
        self._forget_versions()

    def _forget_versions(self) -> None:
        live = {v for pair in self.worker_versions.values() for v in pair}
        for v in [v for v in self.patterns if v not in live]:
            del self.patterns[v]
            self.maps = {k: m for k, m in self.maps.items() if k[0] != v}

    # -- server epochs
    def _end_epoch(self) -> None:
        cfg, model, p = self.cfg, self.model, self.tr.progress
        e = self.epoch
        t_train = time.perf_counter() - self.t_epoch
        t0 = time.perf_counter()
        pattern = [(l.shape, l.weight.indptr, l.weight.indices) for l in model.layers]
        changed = False
        widths_before = list(model.widths)
        if prune_neurons_after_epoch(e, cfg.train.epochs, cfg.importance.enabled, cfg.importance.start_epoch,
                                     cfg.importance.every):
            pruned = prune_neurons(model, cfg.importance.percentile, cfg.importance.min_neurons)
            self.tr.log.info(f"importance pruning after server epoch {e + 1}: removed {pruned} neurons; "
                             f"widths {widths_before} -> {list(model.widths)}")
            changed = True
        if evolve_after_epoch(e, cfg.train.epochs, cfg.topology.evolve_every):
            zeta = drop_fraction(cfg.topology.growth, e, cfg.train.epochs, cfg.topology.zeta,
                                 cfg.topology.rigl_end_fraction)
            evolve_model(model, zeta=zeta, growth=cfg.topology.growth, seed=cfg.seed, evolution=p.evolutions,
                         init=cfg.model.init, block_rows=cfg.topology.rigl_block_rows)
            p.evolutions += 1
            changed = True
        if changed:
            self.patterns[self.version] = pattern
            self.version += 1
            self.maps.clear()
            self._forget_versions()
        t_evolve = time.perf_counter() - t0
        r = model.evaluate(self.data.x_test, self.data.y_test, cfg.train.eval_batch_size)
        seconds = time.perf_counter() - self.t_epoch
        traffic = self.endpoint.bytes_sent + self.endpoint.bytes_received - self.e_bytes
        rec: dict[str, Any] = {
            "epoch": e + 1, "step": (e + 1) * self.spe, "phase": "async",
            "train_loss": self.e_loss / max(self.e_count, 1),
            "test_loss": r.loss_sum / max(r.count, 1), "test_accuracy": r.correct / max(r.count, 1),
            "nnz": model.nnz, "neurons": model.hidden_neurons, "widths": list(model.widths),
            "epoch_seconds": seconds, "train_seconds": t_train, "evolve_seconds": t_evolve,
            "samples_per_second": self.e_count / max(t_train, 1e-9), "ranks": self.tr.size,
            "updates": self.e_updates, "stale_updates": self.e_stale, "dropped_updates": self.e_dropped,
            "server_wait_share": (self.endpoint.poller.wait_seconds - self.e_wait) / max(t_train, 1e-9),
            "bytes_per_update": traffic / max(self.e_updates, 1),
        }
        if self.e_known == self.e_count:  # every update reported its hits (one rank: all own steps)
            rec["train_accuracy"] = self.e_correct / max(self.e_count, 1)
        self.tr.history.append(rec)
        self.tr.log.write_metrics(self.tr.history)
        self.tr.log.info(f"epoch {e + 1}/{cfg.train.epochs} (async): train_loss {rec['train_loss']:.4f} "
                         f"test_loss {rec['test_loss']:.4f} test_acc {rec['test_accuracy']:.4f} nnz {rec['nnz']:,} "
                         f"{seconds:.2f}s ({rec['samples_per_second']:.0f} samples/s, {self.e_updates} updates, "
                         f"{self.e_stale} stale, {self.e_dropped} dropped)")
        if not math.isfinite(rec["train_loss"]):
            raise UserError(f"training diverged in server epoch {e + 1} (loss is NaN or inf); fix: lower train.lr "
                            f"(now {cfg.train.lr})")
        self.epoch += 1
        self._reset_epoch()

    # -- the loop
    def run(self) -> None:
        """Serve workers and train on rank 0's own block; then take over the tail of slow
        workers' blocks; when every worker is done, send each the FINAL model."""
        own = iter(self.batches[0])
        done: list[int] = []
        own_left = True
        sleep = self.endpoint.poller.min_sleep
        while True:
            served = False
            while (msg := self.endpoint.poll()) is not None:
                served = True
                if msg.header.kind == wp.GRAD:
                    self.worker_step(msg)
                    self.reply(msg.source, wp.MODEL)
                else:
                    done.append(msg.source)
            if own_left:
                nxt = next(own, None)
                if nxt is None:
                    own_left = False
                else:
                    self.own_step(nxt[1], nxt[2])
                    continue
            if self.take_over():
                continue
            if self.endpoint.listening == 0:
                break
            sleep = self.endpoint.poller.min_sleep if served else self.endpoint.poller.idle(sleep)
        if self.epoch != self.async_epochs:
            raise wp.ProtocolError(f"the asynchronous phase ended after {self.updates} updates, {self.epoch} server "
                                   f"epochs instead of {self.async_epochs}; this is a bug")
        for w in sorted(done):
            self.reply(w, wp.FINAL)
        self.endpoint.close()  # completes every reply (FINAL included) and checks that all said DONE


def _worker_phase1(tr: "Trainer", data: Dataset, spe: int, async_ep: int, n_train: int) -> dict[str, float]:
    """A worker's asynchronous epochs: gradient out, model in, per batch; then DONE -> FINAL.

    Pipelined: while the server handles gradient k, the worker computes gradient k+1 on the
    model it holds, then installs the reply to k. This hides the server's latency (it is
    busy with its own training step when a request comes in) at the price of one more step
    of staleness for the worker's gradients.
    """
    cfg, model = tr.cfg, tr.model
    ep = wp.WorkerEndpoint(tr.comm, len(model.layers))
    version = 0
    t_compute = 0.0

    def compute(item: int, batch: tuple[int, int, np.ndarray]) -> tuple[wp.Header, np.ndarray]:
        nonlocal t_compute
        _, step, idx = batch
        t0 = time.perf_counter()
        loss, gws, gbs = model.gradients(data.x_train[idx], data.y_train[idx], dropout_key(cfg.seed, step, tr.rank, 0))
        payload = np.concatenate([a for gw, gb in zip(gws, gbs) for a in (gw, gb)])
        t_compute += time.perf_counter() - t0
        return wp.Header(wp.GRAD, step=step, version=version, item=item, loss_sum=loss * idx.size, correct=-1,
                         count=int(idx.size), shapes=model_shapes(model)), payload

    batches = AsyncBatches(n_train, tr.size, tr.rank, cfg.train.batch_size, cfg.seed, spe, async_ep)
    limit = len(batches)  # lowered by the server's replies when it takes over our last batches
    item = 0
    job = compute(item, batches[item]) if item < limit else None
    while job is not None:
        ep.start_push(*job)
        item += 1
        job = compute(item, batches[item]) if item < limit else None  # overlaps with the server's work
        msg = ep.finish_push()
        limit = min(limit, msg.header.item)
        if job is not None and item >= limit:
            raise wp.ProtocolError(f"rank {tr.rank} computed batch {item} but the server took it (limit {limit}); "
                                   "this is a bug")
        install(model, msg.header, msg.floats, msg.ints)
        version = msg.header.version
    msg = ep.done(async_ep * spe)
    if msg.header.kind != wp.FINAL:
        raise wp.ProtocolError(f"rank {tr.rank} expected the FINAL model, got {msg.header.kind_name}; this is a bug")
    install(model, msg.header, msg.floats, msg.ints)
    return {"compute": t_compute, "wait": ep.poller.wait_seconds, "bytes": ep.bytes_sent + ep.bytes_received}


# ---------------------------------------------------------------------------------- merge
def _merge(tr: "Trainer", targets: list[int], deferred_prunes: int) -> float:
    """Union-average every rank's model on rank 0, re-prune to ``targets``, apply deferred
    importance pruning, broadcast; every rank installs the result. Returns rank 0's mean
    fraction of entries removed by the re-pruning (0 elsewhere)."""
    cfg, model = tr.cfg, tr.model
    h = wp.Header(wp.MERGE, version=0, shapes=model_shapes(model))
    msgs = wp.gather_to_root(tr.comm, h, pack_floats(model, False), pack_indices(model))
    removed = 0.0
    if tr.rank == 0:
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
            before = list(model.widths)
            pruned = prune_neurons(model, cfg.importance.percentile, cfg.importance.min_neurons)
            tr.log.info(f"importance pruning (scheduled in the local phase) on the merged model: removed {pruned} "
                        f"neurons; widths {before} -> {list(model.widths)}")
        h = wp.Header(wp.MERGE, version=0, shapes=model_shapes(model))
        out = wp.bcast_from_root(tr.comm, len(model.layers), h, pack_floats(model, False), pack_indices(model))
    else:
        out = wp.bcast_from_root(tr.comm, len(model.layers), None, None, None)
    install(model, out.header, out.floats, out.ints)
    for layer in model.layers:  # momentum is dropped
        layer.w_velocity[...] = 0
        layer.b_velocity[...] = 0
    return removed


# ---------------------------------------------------------------------------------- driver
def _check_supported(tr: "Trainer") -> None:
    cfg = tr.cfg
    if cfg.train.max_steps:
        raise UserError(f"train.max_steps={cfg.train.max_steps} is not supported with parallel.mode='wasap' "
                        "(its phases are counted in epochs); fix: set train.max_steps=0 and use train.epochs")
    notes = []
    if cfg.checkpoint.every_steps or cfg.checkpoint.every_seconds:
        notes.append("checkpoint.every_steps/every_seconds are ignored (wasap checkpoints only at the end)")
    if cfg.parallel.lr_scaling != "none":
        notes.append("parallel.lr_scaling is ignored (the server applies every update at train.lr, as the paper)")
    for n in notes:
        tr.log.info(f"wasap: {n}")


def run_wasap(tr: "Trainer", resume: str | None = None) -> int:
    """Train ``tr.cfg`` with WASAP-SGD on ``tr.comm``; returns the exit status (0).

    Importance pruning: on the server at server epochs in phase 1 (it removes neurons, as in
    sync mode; gradients in flight on the old widths are dropped). In phase 2 ranks would
    remove different neurons and the merge would be undefined, so with more than one rank
    the prunings scheduled in phase 2 are applied, in order, to the merged model instead.
    With one rank they happen at their epochs, as in sync mode.
    """
    data = tr._start(resume)
    if _resumed(tr, data):
        return 0
    _check_supported(tr)
    cfg = tr.cfg
    n_train = data.x_train.shape[0]
    spe = steps_per_epoch(n_train, tr.size, cfg.train.batch_size)
    upe = updates_per_server_epoch(n_train, tr.size, cfg.train.batch_size)
    e1 = async_epochs(cfg.train.epochs, cfg.parallel.async_fraction)
    sgd = SGD(cfg.train.lr, cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay)
    if tr.size == 1:
        tr.log.info("wasap with one rank: there are no workers and nothing to merge; this is plain local training "
                    "(the same model as parallel.mode='sync' on one rank)")
    tr.log.info(f"wasap: {e1} asynchronous epoch(s) (rank 0 is the parameter server and trains on its own block; "
                f"{tr.size - 1} worker(s)), then {cfg.train.epochs - e1} local epoch(s) and a final merge; "
                f"{upe} updates per server epoch")
    if e1 > 0:
        _async_phase(tr, data, sgd, spe, upe, e1)
    _local_phase(tr, data, sgd, spe, e1)
    _share_history(tr, spe)
    tr._finish(data)
    return 0


def _resumed(tr: "Trainer", data: Dataset) -> bool:
    """After ``tr._start``: True if a complete run was resumed (summary rewritten); raise if
    the checkpoint is from the middle of a run; False for a fresh start."""
    p, epochs = tr.progress, tr.cfg.train.epochs
    if not (p.step or tr.history):
        return False
    if p.epoch >= epochs and p.step_in_epoch == 0:
        tr.log.info(f"wasap: the checkpoint is the end of a complete run ({p.epoch} epochs); nothing to train")
        tr._finish(data)
        return True
    raise UserError(f"parallel.mode='wasap' cannot resume from the middle of a run (the checkpoint is at epoch "
                    f"{p.epoch} of {epochs}, step {p.step}); wasap checkpoints only at the end of a run; fix: start "
                    "again in a new --run-dir, or resume with parallel.mode='sync'")


def _async_phase(tr: "Trainer", data: Dataset, sgd: SGD, spe: int, upe: int, e1: int) -> None:
    """Phase 1 on every rank: rank 0 serves and trains, the others are workers. Ends with
    every rank holding the server's final model (checked)."""
    t0 = time.perf_counter()
    n_train = data.x_train.shape[0]
    if tr.rank == 0:
        server = _Server(tr, data, sgd, spe, upe, e1)
        server.run()
        stats = np.zeros(3)
        t = server.totals
        tr.log.info(f"asynchronous phase done in {time.perf_counter() - t0:.1f}s: {server.updates} updates "
                    f"({t['own']} by rank 0 on its own block and {t['taken']} taken over from slower workers, "
                    f"{t['worker']} from workers; {t['stale']} on an older topology, "
                    f"{t['dropped']} dropped); rank 0 waited {server.endpoint.poller.wait_seconds:.1f}s")
    else:
        w = _worker_phase1(tr, data, spe, e1, n_train)
        stats = np.array([w["compute"], w["wait"], w["bytes"]], np.float64)
    wp.allreduce_sum(tr.comm, stats)
    if tr.size > 1:
        tr.log.info(f"workers: {stats[0]:.1f}s computing gradients, {stats[1]:.1f}s waiting for replies "
                    f"(summed over workers), {stats[2] / 1e6:.1f} MB moved")
    pc.check_agreement(tr.comm, *_all_arrays(tr.model), what="model at the end of the asynchronous phase")


def _local_phase(tr: "Trainer", data: Dataset, sgd: SGD, spe: int, e1: int) -> None:
    """Phase 2 (epochs e1..E-1) and the merge after the last one; one metrics line per epoch."""
    cfg, p, model = tr.cfg, tr.progress, tr.model
    E = cfg.train.epochs
    targets = [l.nnz for l in model.layers]  # the phase-1 nnz the merge prunes back to
    evolutions0, local_evolutions, deferred = p.evolutions, 0, 0
    for epoch in range(e1, E):
        t0 = time.perf_counter()
        sums = np.zeros(3)
        for _, step, idx in _own_batches(data.x_train.shape[0], tr.size, tr.rank, cfg.train.batch_size, cfg.seed,
                                         range(epoch, epoch + 1), spe):
            r = model.train_step(data.x_train[idx], data.y_train[idx], sgd, dropout_key(cfg.seed, step, tr.rank, 0))
            sums += (r.loss_sum, r.correct, r.count)
        t_train = time.perf_counter() - t0
        last = epoch == E - 1
        t_evolve, merge_removed, local = 0.0, None, (0.0, 0.0, 0.0)
        t1 = time.perf_counter()
        if not last and prune_neurons_after_epoch(epoch, E, cfg.importance.enabled, cfg.importance.start_epoch,
                                                  cfg.importance.every):
            if tr.size == 1:
                before = list(model.widths)
                pruned = prune_neurons(model, cfg.importance.percentile, cfg.importance.min_neurons)
                tr.log.info(f"importance pruning after epoch {epoch + 1}: removed {pruned} neurons; "
                            f"widths {before} -> {list(model.widths)}")
            else:
                deferred += 1
        if evolve_after_epoch(epoch, E, cfg.topology.evolve_every):
            zeta = drop_fraction(cfg.topology.growth, epoch, E, cfg.topology.zeta, cfg.topology.rigl_end_fraction)
            evolve_model(model, zeta=zeta, growth=cfg.topology.growth, seed=cfg.seed,
                         evolution=evolutions0 + local_evolutions + tr.rank * _RANK_STREAM, init=cfg.model.init,
                         block_rows=cfg.topology.rigl_block_rows)
            local_evolutions += 1
        t_evolve = time.perf_counter() - t1
        # each rank evaluates its block of the test set: before the merge that measures the
        # local models (each on a different block), after it the one merged model
        lo, hi = block_bounds(data.x_test.shape[0], tr.size, tr.rank)
        if last and tr.size > 1:
            ev = model.evaluate(data.x_test[lo:hi], data.y_test[lo:hi], cfg.train.eval_batch_size)
            local = (ev.loss_sum, ev.correct, ev.count)
            t1 = time.perf_counter()
            merge_removed = _merge(tr, targets, deferred)
            t_evolve = time.perf_counter() - t1
        ev = model.evaluate(data.x_test[lo:hi], data.y_test[lo:hi], cfg.train.eval_batch_size)
        red = wp.allreduce_sum(tr.comm, np.array([*sums, ev.loss_sum, ev.correct, ev.count, t_train, *local]))
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "step": (epoch + 1) * spe, "phase": "local",
            "train_loss": red[0] / max(red[2], 1), "train_accuracy": red[1] / max(red[2], 1),
            "test_loss": red[3] / max(red[5], 1), "test_accuracy": red[4] / max(red[5], 1),
            "nnz": model.nnz, "neurons": model.hidden_neurons, "widths": list(model.widths),
            "train_seconds": t_train, "evolve_seconds": t_evolve,
            "samples_per_second": red[2] / max(red[6] / tr.size, 1e-9), "ranks": tr.size,
        }
        if merge_removed is not None:
            rec.update(phase="merge", merge_seconds=t_evolve, merge_repruned_fraction=merge_removed,
                       local_test_loss=red[7] / max(red[9], 1), local_test_accuracy=red[8] / max(red[9], 1))
        rec["epoch_seconds"] = time.perf_counter() - t0
        tr.history.append(rec)
        tr.log.write_metrics(tr.history)
        extra = (f", merged; the local models had test_acc {rec['local_test_accuracy']:.4f}"
                 if merge_removed is not None else "")
        tr.log.info(f"epoch {epoch + 1}/{E} ({rec['phase']}): train_loss {rec['train_loss']:.4f} test_loss "
                    f"{rec['test_loss']:.4f} test_acc {rec['test_accuracy']:.4f} nnz {rec['nnz']:,} "
                    f"{rec['epoch_seconds']:.2f}s ({rec['samples_per_second']:.0f} samples/s{extra})")
        if not math.isfinite(rec["train_loss"]):
            raise UserError(f"training diverged in epoch {epoch + 1} (loss is NaN or inf); fix: lower train.lr")
    p.evolutions += local_evolutions


def _share_history(tr: "Trainer", spe: int) -> None:
    """Prove that every rank holds the same final model, give every rank rank 0's history and
    evolution count (phase-1 lines exist only there), and set the progress to the run's end."""
    p, comm = tr.progress, tr.comm
    pc.check_agreement(comm, *_all_arrays(tr.model), what="final model")
    shared = json.dumps({"history": tr.history, "evolutions": p.evolutions}).encode() if tr.rank == 0 else None
    got = json.loads(wp.bcast_bytes(comm, shared).decode())
    tr.history[:] = got["history"]
    p.evolutions = int(got["evolutions"])
    p.step, p.epoch, p.step_in_epoch = tr.cfg.train.epochs * spe, tr.cfg.train.epochs, 0


def _all_arrays(model: SparseMLP) -> tuple[list[np.ndarray], list[str]]:
    arrays, names = model.topology_arrays()
    for l, layer in enumerate(model.layers):
        arrays += [layer.weight.data, layer.bias]
        names += [f"layers/{l}/W.data", f"layers/{l}/b"]
    return arrays, names
