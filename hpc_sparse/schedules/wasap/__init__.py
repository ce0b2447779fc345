"""WASAP-SGD as a schedule on the engine: ``parallel.mode = "wasap"`` (the asynchronous
parameter-server training of "Truly Sparse Neural Networks at Scale", Curci, Mocanu and
Pechenizkiy, 2021; what runs here and how it differs: docs/wasap.md).

Phases (``E = train.epochs``, ``E1 = async_epochs(E, parallel.async_fraction)``):

1. **Asynchronous (epochs 0..E1-1)**, :mod:`.server` (rank 0: the master model, which it
   also trains) and :mod:`.worker` (ranks >= 1: gradients out, model in).
2. **Local (epochs E1..E-1)** and the **merge**, :mod:`.local`: a plan for the engine's step
   loop.

With one rank there are no workers: phase 1 is the server training alone, phase 2 is the
same local training, and there is nothing to merge. This is plain local training and gives
the same model, bit for bit, as ``parallel.mode = "sync"`` on one rank.

**Checkpoints, stop signals, resume.** The engine decides, at the meetings of either phase,
as in sync mode (``checkpoint.every_steps``, ``every_seconds``, a stop request: checkpoint,
exit 75; none once the run is complete); see :mod:`.snapshot` for what each phase's
checkpoint holds. ``--resume`` continues in the
phase the checkpoint was written in, on the same number of ranks with the same batch size,
``train.epochs`` and ``parallel.async_fraction`` (anything else is refused with an error).
On one rank the continuation is bit-identical to an uninterrupted run; on more it cannot
be (the order in which updates arrive depends on timing), but it continues and ends in the
same accuracy band. A WASAP step counts one batch of one rank (an accepted update in the
asynchronous phase; P per batch round in the local phase), so checkpoint folders and
``checkpoint.every_steps`` count batches over all ranks.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Any

import numpy as np

from hpc_sparse.engine import Engine, Resumed
from hpc_sparse.engine.resume import replica_arrays
from hpc_sparse.errors import UserError
from hpc_sparse.parallel import comm as pc
from hpc_sparse.schedules.wasap.local import LocalPlan
from hpc_sparse.schedules.wasap.server import Server
from hpc_sparse.schedules.wasap.snapshot import WasapConstants, share_position
from hpc_sparse.schedules.wasap.worker import Worker

__all__ = ["WasapSchedule", "async_epochs"]


def async_epochs(epochs: int, fraction: float) -> int:
    """Epochs of the asynchronous phase: ``floor(fraction * epochs)`` computed exactly on the
    decimal value of ``fraction`` (0.7 * 10 -> 7, 0.7 * 3 -> 2), within ``[0, epochs]``."""
    return max(0, min(int(epochs), math.floor(Fraction(repr(float(fraction))) * int(epochs))))


class WasapSchedule:
    """The paper's asynchronous parameter-server phase, local training and a final merge."""

    name = "wasap"

    def check_config(self, engine: Engine) -> None:
        cfg = engine.cfg
        if cfg.train.max_steps:
            raise UserError(f"train.max_steps={cfg.train.max_steps} is not supported with parallel.mode='wasap' "
                            "(its phases are counted in epochs); fix: set train.max_steps=0 and use train.epochs")
        if cfg.parallel.lr_scaling != "none":
            engine.log.info("wasap: parallel.lr_scaling is ignored (the server applies every update at train.lr, "
                            "as the paper)")

    def check_resume(self, engine: Engine, resumed: Resumed) -> None:
        """Continue in the same phase, on what the checkpoint needs; refuse anything else."""
        cfg, st = engine.cfg, resumed.schedule_state
        phase = st.get("phase", "done")
        where = f"checkpoint {resumed.path} (WASAP-SGD, {phase} phase)"
        if phase == "done":
            if cfg.train.epochs > engine.progress.epoch:
                raise UserError(f"{where} ends a complete, merged run of {engine.progress.epoch} epochs; it cannot "
                                f"train on to train.epochs={cfg.train.epochs}; fix: start a new --run-dir")
            return
        wanted = {"ranks": engine.size, "batch size": cfg.train.batch_size, "train.epochs": cfg.train.epochs,
                  "asynchronous epochs": async_epochs(cfg.train.epochs, cfg.parallel.async_fraction)}
        saved = {"ranks": resumed.n_ranks, "batch size": resumed.batch_size, "train.epochs": st.get("epochs"),
                 "asynchronous epochs": st.get("async_epochs")}
        diff = [f"{k} {saved[k]} -> {wanted[k]}" for k in wanted if saved[k] != wanted[k]]
        if diff:
            raise UserError(f"{where} continues only with what wrote it, but: {'; '.join(diff)}; fix: resume with "
                            f"{resumed.n_ranks} rank(s), train.batch_size={resumed.batch_size}, "
                            f"train.epochs={st.get('epochs')} and the same parallel.async_fraction")

    def run(self, engine: Engine) -> int:
        cfg, resumed = engine.cfg, engine.resumed
        consts = WasapConstants.of(engine, async_epochs(cfg.train.epochs, cfg.parallel.async_fraction))
        st = resumed.schedule_state if resumed is not None else {"phase": "async"}
        phase = st.get("phase", "done")
        if phase == "done":
            engine.log.info("wasap: the checkpoint is the end of a complete run; nothing to train")
            return 0
        if resumed is None:
            if engine.size == 1:
                engine.log.info("wasap with one rank: there are no workers and nothing to merge; this is plain "
                                "local training (the same model as parallel.mode='sync' on one rank)")
            engine.log.info(f"wasap: {consts.async_epochs} asynchronous epoch(s) (rank 0 is the parameter server and "
                            f"trains on its own block; {engine.size - 1} worker(s)), then "
                            f"{cfg.train.epochs - consts.async_epochs} local epoch(s) and a final merge; "
                            f"{consts.updates_per_epoch} updates per server epoch")
        else:
            engine.log.info(f"wasap: continuing in the {phase} phase")
        local = st.get("local")
        if phase == "async" and consts.async_epochs > 0:
            status = _asynchronous_phase(engine, consts, st.get("async") or {})
            if status:
                return status
            local = None
        return engine.train_epochs(LocalPlan(engine, consts, local))

    def done_state(self, engine: Engine) -> dict[str, Any]:
        cfg = engine.cfg
        return WasapConstants.of(engine, async_epochs(cfg.train.epochs, cfg.parallel.async_fraction)).schedule_state(
            engine, "done")


def _asynchronous_phase(engine: Engine, consts: WasapConstants, saved: dict[str, Any]) -> int:
    """Phase 1 on every rank: rank 0 serves and trains, the others are workers. Ends with
    every rank holding the server's final model (checked), its progress and its history.
    Returns 0, or the status of a meeting that ended the run."""
    t0 = time.perf_counter()
    if engine.rank == 0:
        server = Server(engine, consts, saved)
        status = server.run_phase()
        stats = np.zeros(3)
        if status == 0:
            t = server.totals
            engine.log.info(f"asynchronous phase done in {time.perf_counter() - t0:.1f}s: {server.updates} "
                            f"updates ({t.own} by rank 0 on its own block and {t.taken} taken over from "
                            f"slower workers, {t.worker} from workers; {t.stale} on an older topology, "
                            f"{t.dropped} dropped); rank 0 waited {server.endpoint.poller.wait_seconds:.1f}s")
    else:
        replied = (saved.get("replied") or {}).get(str(engine.rank), -1)
        limit = (saved.get("limit") or {}).get(str(engine.rank))
        worker = Worker(engine, consts, int(replied) + 1, None if limit is None else int(limit))
        status = worker.run_phase()
        stats = worker.stats()
    if status:
        return status
    pc.allreduce_sum_polled(engine.comm, stats, "the workers' statistics")
    share_position(engine)
    if engine.size > 1:
        engine.log.info(f"workers: {stats[0]:.1f}s computing gradients, {stats[1]:.1f}s waiting for replies "
                        f"(summed over workers), {stats[2] / 1e6:.1f} MB moved")
    pc.check_agreement(engine.comm, *replica_arrays(engine.model), what="model at the end of the asynchronous phase")
    return 0
