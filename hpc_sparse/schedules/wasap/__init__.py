"""WASAP-SGD (PAPER.md §4) as a schedule on the engine: ``parallel.mode = "wasap"``.

Phases (``E = train.epochs``, ``E1 = async_epochs(E, parallel.async_fraction)``):

1. **Asynchronous (epochs 0..E1-1)**, :mod:`.server` (rank 0: the master model, which it
   also trains) and :mod:`.worker` (ranks >= 1: gradients out, model in).
2. **Local (epochs E1..E-1)** and the **merge**, :mod:`.local`.

With one rank there are no workers: phase 1 is the server training alone, phase 2 is the
same local training, and there is nothing to merge. This is plain local training and gives
the same model, bit for bit, as ``parallel.mode = "sync"`` on one rank.

**Checkpoints, stop signals, resume.** Both phases honour ``checkpoint.every_steps``,
``every_seconds`` and a stop request (SIGUSR1/SIGTERM: checkpoint, exit 75); see
:mod:`.snapshot` for what each phase's checkpoint holds. ``--resume`` continues in the
phase the checkpoint was written in, on the same number of ranks with the same batch size,
``train.epochs`` and ``parallel.async_fraction`` (anything else is refused with an error).
On one rank the continuation is bit-identical to an uninterrupted run; on more it cannot
be (the order in which updates arrive depends on timing), but it continues and ends in the
same accuracy band. A WASAP step counts one batch of one rank (an accepted update in the
asynchronous phase; P per batch round in the local phase), so checkpoint folders and
``checkpoint.every_steps`` count batches over all ranks.
"""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np

from hpc_sparse.data import steps_per_epoch, updates_per_server_epoch
from hpc_sparse.engine import Engine, Resumed
from hpc_sparse.errors import UserError
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel import wasap as wp
from hpc_sparse.runtime.signals import EXIT_REQUEUE
from hpc_sparse.schedules.wasap.codec import all_arrays
from hpc_sparse.schedules.wasap.local import LocalPhase
from hpc_sparse.schedules.wasap.server import Server
from hpc_sparse.schedules.wasap.snapshot import LOCAL_SUMS, WasapRun, share_progress
from hpc_sparse.schedules.wasap.worker import Worker
from hpc_sparse.sparse import SGD

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
                            "(its phases are counted in epochs); fix: set train.max_steps=0 and use train.epochs",
                            every_rank=True)
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
                                f"train on to train.epochs={cfg.train.epochs}; fix: start a new --run-dir",
                                every_rank=True)
            return
        wanted = {"ranks": engine.size, "batch size": cfg.train.batch_size, "train.epochs": cfg.train.epochs,
                  "asynchronous epochs": async_epochs(cfg.train.epochs, cfg.parallel.async_fraction)}
        saved = {"ranks": resumed.n_ranks, "batch size": resumed.batch_size, "train.epochs": st.get("epochs"),
                 "asynchronous epochs": st.get("async_epochs")}
        diff = [f"{k} {saved[k]} -> {wanted[k]}" for k in wanted if saved[k] != wanted[k]]
        if diff:
            raise UserError(f"{where} continues only with what wrote it, but: {'; '.join(diff)}; fix: resume with "
                            f"{resumed.n_ranks} rank(s), train.batch_size={resumed.batch_size}, "
                            f"train.epochs={st.get('epochs')} and the same parallel.async_fraction", every_rank=True)

    def run(self, engine: Engine) -> int:
        cfg = engine.cfg
        n_train = engine.n_train
        run = WasapRun(n_train, steps_per_epoch(n_train, engine.size, cfg.train.batch_size),
                       updates_per_server_epoch(n_train, engine.size, cfg.train.batch_size),
                       async_epochs(cfg.train.epochs, cfg.parallel.async_fraction),
                       SGD(cfg.train.lr, cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay))
        resumed = engine.resumed
        st = resumed.schedule_state if resumed is not None else {"phase": "async"}
        phase = st.get("phase", "done")
        engine.schedule_state = run.schedule_state(engine, "done")
        if phase == "done":
            engine.log.info("wasap: the checkpoint is the end of a complete run; nothing to train")
            return 0
        if resumed is None:
            if engine.size == 1:
                engine.log.info("wasap with one rank: there are no workers and nothing to merge; this is plain "
                                "local training (the same model as parallel.mode='sync' on one rank)")
            engine.log.info(f"wasap: {run.async_epochs} asynchronous epoch(s) (rank 0 is the parameter server and "
                            f"trains on its own block; {engine.size - 1} worker(s)), then "
                            f"{cfg.train.epochs - run.async_epochs} local epoch(s) and a final merge; "
                            f"{run.upe} updates per server epoch")
        else:
            engine.log.info(f"wasap: continuing in the {phase} phase")
        if phase == "async" and run.async_epochs > 0:
            if self._async_phase(engine, run, st.get("async") or {}):
                return EXIT_REQUEUE
            local = LocalPhase(engine, run, None, None)
        else:
            sums = (resumed.rank_state or {}).get(LOCAL_SUMS) if resumed is not None else None
            local = LocalPhase(engine, run, st.get("local"), sums)
        if local.run_phase():
            return EXIT_REQUEUE
        _share_history(engine)
        return 0

    @staticmethod
    def _async_phase(engine: Engine, run: WasapRun, saved: dict) -> bool:
        """Phase 1 on every rank: rank 0 serves and trains, the others are workers. Ends with
        every rank holding the server's final model (checked). True if it stopped."""
        t0 = time.perf_counter()
        if engine.rank == 0:
            server = Server(engine, run, saved)
            status = server.run_phase()
            stats = np.zeros(3)
            if status == 0:
                t = server.totals
                engine.log.info(f"asynchronous phase done in {time.perf_counter() - t0:.1f}s: {server.updates} "
                                f"updates ({t['own']} by rank 0 on its own block and {t['taken']} taken over from "
                                f"slower workers, {t['worker']} from workers; {t['stale']} on an older topology, "
                                f"{t['dropped']} dropped); rank 0 waited {server.endpoint.poller.wait_seconds:.1f}s")
        else:
            replied = (saved.get("replied") or {}).get(str(engine.rank), -1)
            limit = (saved.get("limit") or {}).get(str(engine.rank))
            worker = Worker(engine, run, int(replied) + 1, None if limit is None else int(limit))
            status = worker.run_phase()
            stats = worker.stats()
        if status == EXIT_REQUEUE:
            engine.log.info(f"stop signal ({engine.stop.signal_name or 'on another rank'}) handled at step "
                            f"{engine.progress.step} of the asynchronous phase: checkpoint written; exiting with "
                            f"status {EXIT_REQUEUE} so the job script requeues")
            return True
        pc.allreduce_sum_polled(engine.comm, stats, "the workers' statistics")
        share_progress(engine)
        if engine.size > 1:
            engine.log.info(f"workers: {stats[0]:.1f}s computing gradients, {stats[1]:.1f}s waiting for replies "
                            f"(summed over workers), {stats[2] / 1e6:.1f} MB moved")
        pc.check_agreement(engine.comm, *all_arrays(engine.model), what="model at the end of the asynchronous phase")
        return False


def _share_history(engine: Engine) -> None:
    """Prove that every rank holds the same final model and give every rank rank 0's history
    (the asynchronous phase's lines exist only there) and progress."""
    pc.check_agreement(engine.comm, *all_arrays(engine.model), what="final model")
    text = json.dumps(engine.history).encode() if engine.rank == 0 else None
    engine.history[:] = json.loads(pc.bcast_bytes(engine.comm, text).decode())
    share_progress(engine)
