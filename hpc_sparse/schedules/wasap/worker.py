"""A worker (rank >= 1) in WASAP-SGD's asynchronous phase: gradient out, model in, per batch;
then DONE -> FINAL. A HOLD reply means: the ranks meet (:func:`.snapshot.snapshot`), where
the engine decides on a checkpoint and a stop.

Pipelined: while the server handles gradient k, the worker computes gradient k+1 on the
model it holds, then installs the reply to k. This hides the server's latency (it is busy
with its own training step when a request comes in) at the price of one more step of
staleness for the worker's gradients. When the reply to k is HOLD, the gradient of k+1 is
dropped (it was never sent) and the worker continues from k+1 after the snapshot.
"""

from __future__ import annotations

import time

import numpy as np

from hpc_sparse.data import AsyncBatches
from hpc_sparse.engine import Engine
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.schedules.wasap.codec import install, model_shapes
from hpc_sparse.schedules.wasap.snapshot import WasapConstants, snapshot
from hpc_sparse.sparse import dropout_key


class Worker:
    """One worker's side of phase 1, from batch ``start`` (a resume) below ``limit``."""

    def __init__(self, engine: Engine, consts: WasapConstants, start: int, limit: int | None) -> None:
        self.e, self.consts = engine, consts
        cfg = engine.cfg
        self.endpoint = wp.WorkerEndpoint(engine.comm, len(engine.model.layers))
        self.batches = AsyncBatches(consts.n_train, engine.size, engine.rank, cfg.train.batch_size, cfg.seed,
                                    consts.steps_per_epoch, consts.async_epochs)
        self.item = start
        self.limit = len(self.batches) if limit is None else limit
        self.version = 0
        self.t_compute = 0.0

    def _flags(self) -> int:
        """FLAG_STOP once this rank was asked to stop: the server then calls the ranks to meet."""
        return wp.FLAG_STOP if self.e.stop.requested else 0

    def compute(self, item: int) -> tuple[wp.Header, np.ndarray]:
        """The GRAD message of batch ``item`` on the model this worker holds."""
        e, model = self.e, self.e.model
        epoch, step, idx = self.batches[item]
        t0 = time.perf_counter()
        loss, gws, gbs = model.gradients(*e.data.train_batch(idx, e.cfg.seed, epoch),
                                         dropout_key(e.cfg.seed, step, e.rank, 0))
        payload = np.concatenate([a for gw, gb in zip(gws, gbs) for a in (gw, gb)])
        self.t_compute += time.perf_counter() - t0
        return wp.Header(wp.GRAD, step=step, version=self.version, flags=self._flags(), item=item,
                         loss_sum=loss * idx.size, correct=-1, count=int(idx.size),
                         shapes=model_shapes(model)), payload

    def _pass(self) -> wp.Message:
        """Push gradients from ``self.item`` until the server answers HOLD or, after DONE,
        FINAL; returns that reply. ``self.item`` is then the next batch to compute."""
        ep = self.endpoint
        job = self.compute(self.item) if self.item < self.limit else None
        while job is not None:
            ep.start_push(*job)
            self.item += 1
            job = self.compute(self.item) if self.item < self.limit else None  # overlaps with the server
            msg = ep.finish_push()
            self.limit = min(self.limit, msg.header.item)
            if msg.header.kind == wp.HOLD:
                return msg  # the gradient of self.item (if computed) was never sent: redo it later
            if job is not None and self.item >= self.limit:
                raise wp.ProtocolError(f"rank {self.e.rank} computed batch {self.item} but the server took it "
                                       f"(limit {self.limit}); this is a bug")
            install(self.e.model, msg.header, msg.floats, msg.ints)
            self.version = msg.header.version
        return ep.done(self.consts.async_epochs * self.consts.steps_per_epoch, self._flags())

    def run_phase(self) -> int:
        """The worker's asynchronous phase; 0 once it holds the FINAL model, or the engine's
        status after a meeting that ended the run (a stop)."""
        while True:
            msg = self._pass()
            if msg.header.kind == wp.FINAL:
                install(self.e.model, msg.header, msg.floats, msg.ints)
                return 0
            if msg.header.kind != wp.HOLD:
                raise wp.ProtocolError(f"rank {self.e.rank} expected FINAL or HOLD, got {msg.header.kind_name}; "
                                       "this is a bug")
            status, self.version = snapshot(self.e, self.consts)
            if status is not None:
                return status

    def stats(self) -> np.ndarray:
        """(compute seconds, wait seconds, bytes moved) of this worker."""
        ep = self.endpoint
        return np.array([self.t_compute, ep.poller.wait_seconds, ep.bytes_sent + ep.bytes_received], np.float64)
