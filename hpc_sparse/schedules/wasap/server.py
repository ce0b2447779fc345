"""Rank 0 in WASAP-SGD's asynchronous phase: the master model, its topology versions, the
server-epoch clock, and the checkpoint/stop decision.

Between requests rank 0 trains its own block on the master model (one fused step at a
time), polling for requests with ``Testany``; when its own batches are done it takes over
the last batches of the slowest worker (those the worker cannot have started:
:func:`~hpc_sparse.data.stealable`), and only sleeps (short back-off) when there is
nothing to do. A worker's gradient is applied with the one SGD rule (:meth:`SGD.apply_`),
carried over to the current topology if it was computed on an older one.

Every ``updates_per_epoch`` accepted updates are one *server epoch*: the engine's topology
update (importance pruning, RigL refresh, evolution), an evaluation of the master model on
the whole test set and the engine's record of the epoch.

**Meetings.** When the engine wants the ranks to meet (:meth:`Engine.meeting_wanted
<hpc_sparse.engine.Engine.meeting_wanted>`: a checkpoint due, or a stop asked of rank 0 or
reported by a worker with FLAG_STOP), rank 0 stops training and *holds* every worker: it
applies each worker's next gradient and answers it with HOLD (a worker waiting for FINAL gets
HOLD at once). Once all are held the ranks meet (:func:`.snapshot.snapshot`): the engine
writes the checkpoint and stops them (exit 75), or they go on from where each one stood.
"""

from __future__ import annotations

import time
from dataclasses import asdict, astuple, dataclass
from typing import Any

import numpy as np

from hpc_sparse.data import AsyncBatches, stealable
from hpc_sparse.engine import AsyncFigures, Engine
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.schedules.wasap.codec import model_shapes, pack_floats, pack_indices
from hpc_sparse.schedules.wasap.snapshot import WasapConstants, snapshot
from hpc_sparse.topology.pattern import remap_positions


@dataclass
class EpochSums:
    """Running sums of the current server epoch (in a checkpoint: ``epoch_sums``, this order)."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    known: float = 0.0  # samples whose hits were reported (rank 0's own steps; workers report none)
    stale: float = 0.0
    dropped: float = 0.0
    updates: float = 0.0


@dataclass
class PhaseTotals:
    """Counts over the whole asynchronous phase (in a checkpoint: ``totals``)."""

    worker: int = 0  # workers' gradients applied (or dropped)
    own: int = 0  # rank 0's own batches
    taken: int = 0  # batches rank 0 took over from slower workers
    stale: int = 0
    dropped: int = 0


class Server:
    """Rank 0 in phase 1. ``saved``: the ``async`` part of a checkpoint's schedule state."""

    def __init__(self, engine: Engine, consts: WasapConstants, saved: dict[str, Any] | None) -> None:
        self.e, self.consts, self.cfg, self.model = engine, consts, engine.cfg, engine.model
        self.endpoint = wp.ServerEndpoint(engine.comm, len(self.model.layers))
        self.workers = list(self.endpoint.workers)
        self.version = 0
        self.patterns: dict[int, list[tuple[tuple[int, int], np.ndarray, np.ndarray]]] = {}
        self.maps: dict[tuple[int, int], np.ndarray] = {}
        # topology versions of each worker's two newest pulls: a pipelined worker's gradient
        # lives on one of them (the model it held before its last reply was installed, or after)
        self.worker_versions = {w: (0, 0) for w in self.workers}
        cfg = self.cfg
        self.batches = {w: AsyncBatches(consts.n_train, engine.size, w, cfg.train.batch_size, cfg.seed,
                                        consts.steps_per_epoch, consts.async_epochs) for w in range(engine.size)}
        s = saved or {}
        self.limit = {w: int(s.get("limit", {}).get(str(w), len(self.batches[w]))) for w in self.workers}
        self.replied = {w: int(s.get("replied", {}).get(str(w), -1)) for w in self.workers}
        self.own_next = int(s.get("own", 0))  # index of rank 0's next own batch
        self.epoch = int(s.get("server_epoch", 0))
        self.updates = int(s.get("updates", 0))
        self.totals = PhaseTotals(**(s.get("totals") or {}))
        self.awaiting_final: list[int] = []  # workers that said DONE
        self.held: set[int] = set()
        self.holding = False
        self.worker_stop = False
        self._reset_epoch(s.get("epoch_sums"))

    def _reset_epoch(self, sums: list[float] | None = None) -> None:
        self.t_epoch = time.perf_counter()
        self.sums = EpochSums(*(sums or ()))
        self.e_bytes = self.endpoint.bytes_sent + self.endpoint.bytes_received
        self.e_wait = self.endpoint.poller.wait_seconds

    def state(self) -> dict[str, Any]:
        """The ``async`` part of a checkpoint's schedule state (JSON)."""
        return {"own": self.own_next, "server_epoch": self.epoch, "updates": self.updates,
                "replied": {str(w): r for w, r in self.replied.items()},
                "limit": {str(w): n for w, n in self.limit.items()},
                "epoch_sums": list(astuple(self.sums)), "totals": asdict(self.totals)}

    # ------------------------------------------------------------------ updates
    def own_step(self, step: int, idx: np.ndarray, owner: int = 0) -> None:
        """One training step on the master model, of the batch ``idx`` of ``owner``'s
        sequence (its dropout masks are the owner's)."""
        r = self.e.train_batch(idx, step // self.consts.steps_per_epoch, step, self.consts.sgd, owner)
        assert r is not None  # AsyncBatches holds non-empty batches only
        if owner == 0:
            self.totals.own += 1
        else:
            self.totals.taken += 1
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
        self.own_step(step, idx, owner=w)
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
            self.sums.dropped += 1
            self.totals.dropped += 1
        else:
            sgd = self.consts.sgd
            for layer, (gw, gb) in zip(self.model.layers, grads):
                sgd.apply_(layer.weight.data, layer.w_velocity, gw)
                sgd.apply_(layer.bias, layer.b_velocity, gb)
        self.e.last_batch = self.batches[w][h.item][2]  # RigL's refresh: the last batch applied
        self.totals.worker += 1
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
            self.sums.stale += 1
            self.totals.stale += 1
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
            out.append((np.ascontiguousarray(gw), np.ascontiguousarray(gb)))
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
        s = self.sums
        s.loss += loss_sum
        s.count += count
        if correct >= 0:
            s.correct += correct
            s.known += count
        self.updates += 1
        s.updates += 1
        p = self.e.progress
        p.step, p.step_in_epoch = self.updates, int(s.updates)
        if self.updates % self.consts.updates_per_epoch == 0:
            self._end_epoch()

    # ------------------------------------------------------------------ replies
    def reply(self, w: int, kind: int) -> None:
        if kind == wp.HOLD:
            h = wp.Header(wp.HOLD, step=self.updates, version=self.version, item=self.limit.get(w, 0))
            self.endpoint.reply(w, h, None, None)
            return
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

    # ------------------------------------------------------------ server epochs
    def _end_epoch(self) -> None:
        e, model = self.e, self.model
        t_train = time.perf_counter() - self.t_epoch
        pattern = [(l.shape, l.weight.indptr, l.weight.indices) for l in model.layers]
        update = e.update_topology(model, self.epoch, who="server")
        if update.changed:
            self.patterns[self.version] = pattern
            self.version += 1
            self.maps.clear()
            self._forget_versions()
        s = self.sums
        traffic = self.endpoint.bytes_sent + self.endpoint.bytes_received - self.e_bytes
        figures = AsyncFigures(int(s.updates), int(s.stale), int(s.dropped),
                               (self.endpoint.poller.wait_seconds - self.e_wait) / max(t_train, 1e-9),
                               traffic / max(s.updates, 1))
        # train_accuracy only if every update reported its hits (one rank: all own steps)
        e.close_epoch(self.epoch, (s.loss, s.correct if s.known == s.count else None, s.count),
                      e.evaluate(model, pc.self_comm()), self.t_epoch, t_train, t_train, update, shared=False,
                      phase="async", asynchronous=figures)
        self.epoch += 1
        self._reset_epoch()

    # ------------------------------------------------------------------ meetings
    def hold(self) -> None:
        """Begin a meeting: no more training here; workers waiting for FINAL are held at once,
        the others with the reply to their next gradient."""
        self.holding = True
        for w in self.awaiting_final:
            self.reply(w, wp.HOLD)
            self.endpoint.expect(w)  # it says DONE again after the meeting
            self.held.add(w)
        self.awaiting_final.clear()

    def meet(self) -> int | None:
        """Every worker is held: the snapshot (:func:`.snapshot.snapshot`); the engine's
        verdict (None: go on)."""
        self.endpoint.complete_replies()
        status, _ = snapshot(self.e, self.consts, self.version, self.state())
        if status is not None:
            self.endpoint.cancel()
            return status
        self.holding, self.held, self.worker_stop = False, set(), False
        self.worker_versions = {w: (self.version, self.version) for w in self.workers}  # they hold it all now
        self._forget_versions()
        return None

    # ------------------------------------------------------------------ the loop
    def serve(self) -> bool:
        """Handle every message that has arrived; True if there was one."""
        served = False
        while (msg := self.endpoint.poll()) is not None:
            served = True
            self.worker_stop |= bool(msg.header.flags & wp.FLAG_STOP)
            if msg.header.kind == wp.GRAD:
                self.worker_step(msg)
                if self.holding:
                    self.reply(msg.source, wp.HOLD)
                    self.held.add(msg.source)
                else:
                    self.reply(msg.source, wp.MODEL)
            elif self.holding:  # DONE while holding: hold it too, it says DONE again later
                self.reply(msg.source, wp.HOLD)
                self.endpoint.expect(msg.source)
                self.held.add(msg.source)
            else:
                self.awaiting_final.append(msg.source)
        return served

    def run_phase(self) -> int:
        """Serve workers and train on rank 0's own block; then take over the tail of slow
        workers' blocks; when every worker is done, send each the FINAL model. Returns 0, or
        the engine's status after a meeting that ended the run (a stop)."""
        poller = self.endpoint.poller
        sleep = poller.min_sleep
        own = self.batches[0]
        while True:
            served = self.serve()
            if self.holding:
                if self.held == set(self.workers):
                    status = self.meet()
                    if status is not None:
                        return status
                    continue
                sleep = poller.min_sleep if served else poller.idle(sleep)
                continue
            if self.e.meeting_wanted(self.worker_stop):
                self.hold()
                continue
            if self.own_next < len(own):
                _, step, idx = own[self.own_next]
                self.own_next += 1
                self.own_step(step, idx)
                continue
            if self.take_over():
                continue
            if self.endpoint.listening == 0:
                break
            sleep = poller.min_sleep if served else poller.idle(sleep)
        if self.epoch != self.consts.async_epochs:
            raise wp.ProtocolError(f"the asynchronous phase ended after {self.updates} updates, {self.epoch} server "
                                   f"epochs instead of {self.consts.async_epochs}; this is a bug")
        for w in sorted(self.awaiting_final):
            self.reply(w, wp.FINAL)
        self.endpoint.close()  # completes every reply (FINAL included) and checks that all said DONE
        return 0
