"""Synchronous data-parallel training (``parallel.mode = "sync"``), a schedule on the engine.

Per step each rank trains on its own batch of the epoch's global permutation; every
``parallel.sync_every`` steps (and at every epoch end) the replicas average weights and
momentum with one Allreduce, and agree on a few flags (stop requested, loss not finite,
rank 0's save clock) with another. Topology changes happen only at epoch ends, right after
a sync, identically on every rank (the engine's topology update; RigL candidates are
exchanged by Allgatherv). A stop request is acted on at the next sync point: mid-epoch at
once, at an epoch end after the epoch's evolution and evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from hpc_sparse.data import batch_indices, epoch_permutation, position_in_epoch, steps_per_epoch
from hpc_sparse.engine import Engine, Progress, Resumed
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel.averaging import ReplicaAverager
from hpc_sparse.sparse import SGD, dropout_key


class SyncSchedule:
    """Collective replica averaging; the same model on every rank after every sync point."""

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
        return _SyncRun(engine).run()


class _SyncRun:
    """The state of one sync training run between sync points."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.averager = ReplicaAverager(engine.comm)
        self.local = np.zeros(3)  # this rank's (loss sum, hits, samples) since the epoch began
        self.last_idx: np.ndarray | None = None  # this rank's last training batch (RigL's refresh)
        self.flags = np.zeros(3, np.int64)  # agreed (stop, nonfinite, save-time-due) of the last sync

    def run(self) -> int:
        e, cfg, p = self.e, self.e.cfg, self.e.progress
        data, model = e.data, e.model
        n_train = data.x_train.shape[0]
        spe = steps_per_epoch(n_train, e.size, cfg.train.batch_size)
        lr = cfg.train.lr * (e.size if cfg.parallel.lr_scaling == "linear" else 1)
        sgd = SGD(lr, cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay)
        max_steps = cfg.train.max_steps
        while p.epoch < cfg.train.epochs and not (max_steps and p.step >= max_steps):
            perm = epoch_permutation(n_train, cfg.seed, p.epoch)
            t_epoch = time.perf_counter()
            comm_before = self.averager.comm_seconds
            e.log.start_epoch(p.epoch, cfg.train.epochs, spe, p.step_in_epoch)
            while p.step_in_epoch < spe:
                idx = batch_indices(perm, e.size, e.rank, cfg.train.batch_size, p.step_in_epoch)
                loss_sum, correct = 0.0, 0
                if idx.size:
                    self.last_idx = idx
                    r = model.train_step(*data.train_batch(idx, cfg.seed, p.epoch), sgd,
                                         dropout_key(cfg.seed, p.step, e.rank, 0))
                    loss_sum, correct = r.loss_sum, r.correct
                self.local += (loss_sum, correct, idx.size)
                p.step += 1
                p.step_in_epoch += 1
                e.log.step(loss_sum / max(idx.size, 1))
                last = bool(max_steps) and p.step >= max_steps
                if p.step % cfg.parallel.sync_every == 0 or p.step_in_epoch == spe or last:
                    # a stop at max_steps is not acted on: the run is complete, it finishes
                    if self.sync_point(at_epoch_end=p.step_in_epoch == spe) and not last:
                        return e.requeue(self.save)
                if last:
                    break
            e.log.end_epoch()
            train_seconds = time.perf_counter() - t_epoch
            comm_seconds = self.averager.comm_seconds - comm_before
            if p.step_in_epoch < spe:  # max_steps reached mid-epoch
                break
            self.end_epoch(t_epoch, train_seconds, comm_seconds)
            complete = p.epoch >= cfg.train.epochs or bool(max_steps and p.step >= max_steps)
            # checkpoints at an epoch boundary are taken after evolution and evaluation; a stop
            # after the last epoch is not acted on: the run finishes (exit 0, summary.json)
            if self.flags[0] and not complete:
                return e.requeue(self.save)
            if self.save_due():
                self.save()
        if self.flags[0]:
            e.log.info(f"stop signal ({e.stop.signal_name or 'on another rank'}) arrived as training completed: "
                       "finishing (status 0) instead of requeueing")
        # a signal from here on is too late to matter: the run completes normally
        return 0

    def sync_point(self, at_epoch_end: bool) -> bool:
        """Average replicas and agree on flags (one small Allreduce). Mid-epoch, save if due.
        Returns True if a stop signal was seen on any rank and the run must stop here
        (at an epoch end the caller stops after the epoch's evolution and evaluation)."""
        e = self.e
        self.averager.average_(e.model.parameter_arrays())
        nonfinite = int(not math.isfinite(self.local[0]))
        due_time = int(e.rank == 0 and e.save_time_due())
        self.flags = pc.agree_max(e.comm, np.array([int(e.stop.requested), nonfinite, due_time], np.int64))
        if self.flags[1]:
            raise e.diverged(e.progress.step, every_rank=True)
        if at_epoch_end:
            return False
        if self.flags[0]:
            return True
        if self.save_due():
            self.save()
        return False

    def save_due(self) -> bool:
        return bool(self.flags[2]) or self.e.save_steps_due()

    def epoch_sums(self) -> tuple[float, int, int]:
        """This epoch's training (loss sum, hits, samples) so far over all ranks, including
        what a resumed checkpoint had already counted. Collective."""
        p = self.e.progress
        tot = pc.allreduce_sum_(self.e.comm, self.local.copy())
        return p.epoch_loss_sum + float(tot[0]), p.epoch_correct + int(tot[1]), p.epoch_count + int(tot[2])

    def save(self) -> None:
        """Checkpoint the replica; the epoch's loss sums are stored as global sums, so a resume
        on any number of ranks continues them. Collective."""
        saved = Progress(**asdict(self.e.progress))
        saved.epoch_loss_sum, saved.epoch_correct, saved.epoch_count = self.epoch_sums()
        self.e.save(saved, state=self.e.model.state_dict())

    def end_epoch(self, t_epoch: float, train_seconds: float, comm_seconds: float) -> None:
        e, p, cfg = self.e, self.e.progress, self.e.cfg
        data, model = e.data, e.model
        loss_sum, correct, count = self.epoch_sums()
        self.local = np.zeros(3)
        last = None if self.last_idx is None else (data.x_train[self.last_idx], data.y_train[self.last_idx])
        gather = lambda lin, val: (pc.allgatherv(e.comm, lin), pc.allgatherv(e.comm, val), e.size)  # noqa: E731
        update = e.update_topology(model, p.epoch, p.evolutions, last, gather)
        if update.evolved:
            p.evolutions += 1
        if update.changed:
            arrays, names = model.topology_arrays()
            pc.check_agreement(e.comm, arrays, names)
        test_loss, test_acc = e.evaluate(model)
        rec: dict[str, Any] = {
            "epoch": p.epoch + 1, "step": p.step, "train_loss": loss_sum / max(count, 1),
            "train_accuracy": correct / max(count, 1),
            "test_loss": test_loss, "test_accuracy": test_acc, "nnz": model.nnz,
            "neurons": model.hidden_neurons, "widths": list(model.widths),
            "epoch_seconds": time.perf_counter() - t_epoch, "train_seconds": train_seconds,
            "evolve_seconds": update.evolve_seconds,
            "samples_per_second": count / max(train_seconds, 1e-9),
            "comm_share": comm_seconds / max(train_seconds, 1e-9),
            "bytes_per_sync": self.averager.bytes_per_sync, "ranks": e.size,
        }
        details = (f", comm {100 * rec['comm_share']:.1f}%, {rec['bytes_per_sync']:,} B/sync" if e.size > 1 else "")
        p.epoch += 1
        p.step_in_epoch = 0
        p.epoch_loss_sum, p.epoch_correct, p.epoch_count = 0.0, 0, 0
        e.record_epoch(rec, details=details, every_rank=True)
