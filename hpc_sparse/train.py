"""The training loop: the only module that sees every package.

Per step each rank trains on its own batch; every ``parallel.sync_every`` steps (and at
every epoch end) the replicas average weights and momentum. Topology changes happen only
at epoch ends, right after a sync, identically on every rank. The checkpointer decides
when to save; the stop flag (SLURM signal) is agreed at sync points.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpc_sparse import __version__
from hpc_sparse.config import Config, config_from_dict
from hpc_sparse.data import Dataset, batch_indices, block_bounds, epoch_permutation, load_dataset, steps_per_epoch
from hpc_sparse.errors import UserError
from hpc_sparse.log import RunLog
from hpc_sparse.model_builder import build_model, check_data_shape, describe_blocking, model_from_state
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel.averaging import ReplicaAverager
from hpc_sparse.parallel.signals import EXIT_REQUEUE, StopFlag
from hpc_sparse.sparse import SGD, SparseMLP, dropout_key
from hpc_sparse.topology import evolve_model, prune_neurons
from hpc_sparse.topology.schedule import drop_fraction, evolve_after_epoch, prune_neurons_after_epoch


@dataclass
class Progress:
    """Where the run is. With the counter-based RNGs (data order, dropout, topology are pure
    functions of seed and these counters) this is the whole RNG state."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    evolutions: int = 0
    last_save_step: int = 0
    # global (all-rank) sums of the current epoch's training loss so far
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_count: int = 0


def configure_threads(cfg: Config, comm: Any) -> int:
    """Set numba's thread count: config, else HPC_SPARSE_THREADS, else cores/ranks on the node."""
    import numba

    n = cfg.train.threads or int(os.environ.get("HPC_SPARSE_THREADS", "0") or 0) or pc.default_threads(comm)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def evaluate(model: SparseMLP, data: Dataset, comm: Any, batch_size: int) -> tuple[float, float]:
    """Test loss and accuracy, each rank on its block of the test set, reduced exactly
    (sums of loss, hits and counts), so any number of ranks reports the same figures."""
    lo, hi = block_bounds(data.x_test.shape[0], comm.Get_size(), comm.Get_rank())
    r = model.evaluate(data.x_test[lo:hi], data.y_test[lo:hi], batch_size)
    tot = pc.allreduce_sum_(comm, np.array([r.loss_sum, r.correct, r.count], np.float64))
    return float(tot[0] / tot[2]), float(tot[1] / tot[2])


class Trainer:
    """Runs one training job on ``comm`` writing into ``run_dir``."""

    def __init__(self, cfg: Config, comm: Any, run_dir: Path, quiet: bool = False) -> None:
        self.cfg = cfg
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.run_dir = run_dir
        self.log = RunLog(run_dir, self.rank, quiet)
        self.progress = Progress()
        self.history: list[dict[str, Any]] = []
        self.averager = ReplicaAverager(comm)
        self.stop = StopFlag()
        self._last_save_time = time.monotonic()
        self._local = np.zeros(3)  # this rank's (loss sum, hits, samples) since the epoch began
        self._last_idx: np.ndarray | None = None  # the last training batch (RigL re-scores it)
        self._flags = np.zeros(3, np.int64)  # agreed (stop, nonfinite, save-time-due) of the last sync
        self.model: SparseMLP

    # ------------------------------------------------------------------ setup
    def _start(self, resume: str | None) -> Dataset:
        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.comm.Barrier()
        threads = configure_threads(cfg, self.comm)
        data = load_dataset(cfg.data)
        self.n_train = int(data.x_train.shape[0])
        check_data_shape(cfg, data.n_features, data.n_classes)
        self.log.info(f"hpc_sparse {__version__} | {self.size} rank(s) x {threads} thread(s) | {pc.mpi_vendor()}")
        self.log.info(f"data: {data.name} from {data.source}: {data.x_train.shape[0]} train, "
                      f"{data.x_test.shape[0]} test, {data.n_features} features, {data.n_classes} classes")
        self.model = self._resume(resume) if resume else None  # type: ignore[assignment]
        if self.model is None:
            self.model = build_model(cfg)
            self.log.info(f"model: {list(self.model.widths)}, nnz {self.model.nnz:,}, epsilon {cfg.model.epsilon}, "
                          f"{cfg.model.activation}, dropout {cfg.model.dropout}")
        self.log.info(describe_blocking(self.model, cfg.train.batch_size))
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n")
        return data

    def _resume(self, resume: str) -> SparseMLP | None:
        from hpc_sparse.checkpoint import find_latest_valid, load_checkpoint

        if resume == "auto":
            path, skipped = find_latest_valid(self.run_dir)
            for bad, reason in skipped:
                self.log.info(f"skipping invalid checkpoint {bad}: {reason}")
            if path is None:
                self.log.info(f"no valid checkpoint in {self.run_dir}; starting from scratch")
                return None
        else:
            path = Path(resume)
        state, manifest, _ = load_checkpoint(path)  # CheckpointError is a UserError: one line, exit 2
        meta = manifest["meta"]
        model = model_from_state(self.cfg, state, str(path))
        self._check_resume_config(meta["config"], str(path))
        self.progress = Progress(**meta["progress"])
        self.history = list(meta["history"])
        if manifest["n_ranks"] != self.size:
            n_train = int(meta["n_train"])
            old_spe = steps_per_epoch(n_train, manifest["n_ranks"], self.cfg.train.batch_size)
            new_spe = steps_per_epoch(n_train, self.size, self.cfg.train.batch_size)
            self.progress.step_in_epoch = round(self.progress.step_in_epoch * new_spe / old_spe)
            self.log.info(f"checkpoint was written by {manifest['n_ranks']} rank(s), resuming on {self.size}: "
                          "state re-sharded, data re-partitioned (mid-epoch position kept as a fraction)")
        self.progress.last_save_step = self.progress.step
        self.log.info(f"resumed from {path} at step {self.progress.step} (epoch {self.progress.epoch + 1}, "
                      f"step {self.progress.step_in_epoch} in epoch); widths {list(model.widths)}, nnz {model.nnz:,}")
        self.log.write_metrics(self.history)
        return model

    def _check_resume_config(self, saved: dict[str, Any], source: str) -> None:
        old = config_from_dict(saved).to_dict()
        new = self.cfg.to_dict()
        diffs = [f"{sec}.{k}: {old[sec][k]!r} -> {new[sec][k]!r}" for sec in new if isinstance(new[sec], dict)
                 for k in new[sec] if old[sec][k] != new[sec][k]]
        if old["seed"] != new["seed"]:
            raise UserError(f"checkpoint {source} was trained with seed={old['seed']} but the config says "
                            f"seed={new['seed']}; fix: use the run's seed or a new --run-dir")
        if diffs:
            self.log.info("config differs from the checkpoint's: " + "; ".join(diffs))

    # ------------------------------------------------------------------- loop
    def run(self, resume: str | None = None) -> int:
        """Train to the end (exit 0) or until a stop signal (checkpoint, exit EXIT_REQUEUE)."""
        if self.cfg.parallel.mode == "wasap":
            from hpc_sparse.train_wasap import run_wasap

            return run_wasap(self, resume)
        self.stop.install()  # first: a signal during start-up must not kill the rank
        try:
            return self._run(resume)
        finally:
            self.stop.restore()

    def _run(self, resume: str | None) -> int:
        data = self._start(resume)
        cfg, p = self.cfg, self.progress
        n_train = data.x_train.shape[0]
        spe = steps_per_epoch(n_train, self.size, cfg.train.batch_size)
        lr = cfg.train.lr * (self.size if cfg.parallel.lr_scaling == "linear" else 1)
        sgd = SGD(lr, cfg.train.momentum, cfg.train.nesterov, cfg.train.weight_decay)
        while p.epoch < cfg.train.epochs:
            perm = epoch_permutation(n_train, cfg.seed, p.epoch)
            t_epoch = time.perf_counter()
            comm_before = self.averager.comm_seconds
            self.log.start_epoch(p.epoch, cfg.train.epochs, spe, p.step_in_epoch)
            while p.step_in_epoch < spe:
                idx = batch_indices(perm, self.size, self.rank, cfg.train.batch_size, p.step_in_epoch)
                loss_sum, correct = 0.0, 0
                if idx.size:
                    self._last_idx = idx
                    r = self.model.train_step(data.x_train[idx], data.y_train[idx], sgd,
                                              dropout_key(cfg.seed, p.step, self.rank, 0))
                    loss_sum, correct = r.loss_sum, r.correct
                self._local += (loss_sum, correct, idx.size)
                p.step += 1
                p.step_in_epoch += 1
                self.log.step(loss_sum / max(idx.size, 1))
                last = bool(cfg.train.max_steps) and p.step >= cfg.train.max_steps
                if p.step % cfg.parallel.sync_every == 0 or p.step_in_epoch == spe or last:
                    if self._sync_point(at_epoch_end=p.step_in_epoch == spe):
                        return self._save_and_stop()
                if last:
                    break
            self.log.end_epoch()
            train_seconds = time.perf_counter() - t_epoch
            comm_seconds = self.averager.comm_seconds - comm_before
            if p.step_in_epoch < spe:  # max_steps reached mid-epoch
                break
            self._end_epoch(data, t_epoch, train_seconds, comm_seconds)
            # checkpoints at an epoch boundary are taken after evolution and evaluation
            if self._flags[0]:
                return self._save_and_stop()
            if self._save_due():
                self._save()
        # a signal from here on is too late to matter: the run completes normally
        self._finish(data)
        return 0

    def _sync_point(self, at_epoch_end: bool) -> bool:
        """Average replicas and agree on flags (one small Allreduce). Mid-epoch, save if due.
        Returns True if a stop signal was seen on any rank and the run must stop here
        (at an epoch end the caller stops after the epoch's evolution and evaluation)."""
        p, cfg = self.progress, self.cfg
        self.averager.average_(self.model.parameter_arrays())
        nonfinite = int(not math.isfinite(self._local[0]))
        due_time = int(self.rank == 0 and cfg.checkpoint.every_seconds > 0
                       and time.monotonic() - self._last_save_time >= cfg.checkpoint.every_seconds)
        self._flags = pc.agree_max(self.comm, np.array([int(self.stop.requested), nonfinite, due_time], np.int64))
        if self._flags[1]:
            raise UserError(f"training diverged at step {p.step} (loss is NaN or inf); fix: lower train.lr "
                            f"(now {cfg.train.lr}); the last good checkpoint is kept")
        if at_epoch_end:
            return False
        if self._flags[0]:
            return True
        if self._save_due():
            self._save()
        return False

    def _save_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(self._flags[2]) or (every > 0 and self.progress.step - self.progress.last_save_step >= every)

    def _save_and_stop(self) -> int:
        self._save()
        self.log.info(f"stop signal ({self.stop.signal_name or 'on another rank'}) handled at step "
                      f"{self.progress.step}: checkpoint written; exiting with status {EXIT_REQUEUE} "
                      "so the job script requeues")
        return EXIT_REQUEUE

    def _epoch_sums(self) -> tuple[float, int, int]:
        """This epoch's training (loss sum, hits, samples) so far over all ranks, including
        what a resumed checkpoint had already counted. Collective."""
        p = self.progress
        tot = pc.allreduce_sum_(self.comm, self._local.copy())
        return p.epoch_loss_sum + float(tot[0]), p.epoch_correct + int(tot[1]), p.epoch_count + int(tot[2])

    def _end_epoch(self, data: Dataset, t_epoch: float, train_seconds: float, comm_seconds: float) -> None:
        p, cfg = self.progress, self.cfg
        loss_sum, correct, count = self._epoch_sums()
        self._local = np.zeros(3)
        widths_before = list(self.model.widths)
        pruned = None
        if prune_neurons_after_epoch(p.epoch, cfg.train.epochs, cfg.importance.enabled,
                                     cfg.importance.start_epoch, cfg.importance.every):
            pruned = prune_neurons(self.model, cfg.importance.percentile, cfg.importance.min_neurons)
            if cfg.topology.growth == "gradient" and self._last_idx is not None:
                # RigL scores need this batch's activations at the new widths
                self.model.gradients(data.x_train[self._last_idx], data.y_train[self._last_idx])
            self.log.info(f"importance pruning after epoch {p.epoch + 1}: removed {pruned} neurons; "
                          f"widths {widths_before} -> {list(self.model.widths)}")
        t_evolve = 0.0
        evolved = evolve_after_epoch(p.epoch, cfg.train.epochs, cfg.topology.evolve_every)
        if evolved:
            t0 = time.perf_counter()
            zeta = drop_fraction(cfg.topology.growth, p.epoch, cfg.train.epochs, cfg.topology.zeta,
                                 cfg.topology.rigl_end_fraction)
            gather = lambda lin, val: (pc.allgatherv(self.comm, lin), pc.allgatherv(self.comm, val),  # noqa: E731
                                       self.size)
            evolve_model(self.model, zeta=zeta, growth=cfg.topology.growth, seed=cfg.seed,
                         evolution=p.evolutions, init=cfg.model.init, block_rows=cfg.topology.rigl_block_rows,
                         gather=gather)
            p.evolutions += 1
            t_evolve = time.perf_counter() - t0
        if pruned is not None or evolved:
            arrays, names = self.model.topology_arrays()
            pc.check_agreement(self.comm, arrays, names)
        test_loss, test_acc = evaluate(self.model, data, self.comm, cfg.train.eval_batch_size)
        epoch_seconds = time.perf_counter() - t_epoch
        rec = {
            "epoch": p.epoch + 1, "step": p.step, "train_loss": loss_sum / max(count, 1),
            "train_accuracy": correct / max(count, 1),
            "test_loss": test_loss, "test_accuracy": test_acc, "nnz": self.model.nnz,
            "neurons": self.model.hidden_neurons, "widths": list(self.model.widths),
            "epoch_seconds": epoch_seconds, "train_seconds": train_seconds, "evolve_seconds": t_evolve,
            "samples_per_second": count / max(train_seconds, 1e-9),
            "comm_share": comm_seconds / max(train_seconds, 1e-9),
            "bytes_per_sync": self.averager.bytes_per_sync, "ranks": self.size,
        }
        self.history.append(rec)
        self.log.write_metrics(self.history)
        self.log.info(f"epoch {p.epoch + 1}/{cfg.train.epochs}: train_loss {rec['train_loss']:.4f} "
                      f"test_loss {test_loss:.4f} test_acc {test_acc:.4f} nnz {rec['nnz']:,} "
                      f"neurons {rec['neurons']:,} {epoch_seconds:.2f}s ({rec['samples_per_second']:.0f} samples/s"
                      + (f", comm {100 * rec['comm_share']:.1f}%, {rec['bytes_per_sync']:,} B/sync"
                         if self.size > 1 else "") + ")")
        p.epoch += 1
        p.step_in_epoch = 0
        p.epoch_loss_sum, p.epoch_correct, p.epoch_count = 0.0, 0, 0
        if not math.isfinite(rec["train_loss"]):
            raise UserError(f"training diverged in epoch {p.epoch} (loss is NaN or inf); fix: lower train.lr")

    # ---------------------------------------------------------------- output
    def _save(self) -> None:
        from hpc_sparse.checkpoint import save_checkpoint

        p = self.progress
        saved = Progress(**asdict(p))
        # global sums, not this rank's: a resume on any number of ranks continues them
        saved.epoch_loss_sum, saved.epoch_correct, saved.epoch_count = self._epoch_sums()
        saved.last_save_step = p.step
        meta = {"config": self.cfg.to_dict(), "progress": asdict(saved), "history": self.history,
                "epoch": p.epoch, "n_train": self.n_train, "widths": list(self.model.widths),
                "model_sha256": self.model.sha256(),
                "rng": "counter-based: data order = f(seed, epoch), dropout = f(seed, step, rank, layer), "
                       "topology = f(seed, evolution, layer)"}
        path = save_checkpoint(self.comm, self.run_dir, p.step, self.model.state_dict(), meta,
                               keep=self.cfg.checkpoint.keep)
        p.last_save_step = p.step
        self._last_save_time = time.monotonic()
        self.log.info(f"checkpoint {path.name} written (step {p.step})")

    def _finish(self, data: Dataset) -> None:
        if self.cfg.checkpoint.at_end and self.progress.last_save_step != self.progress.step:
            self._save()
        last = dict(self.history[-1]) if self.history else {}
        if not self.history or last.get("step") != self.progress.step:  # stopped mid-epoch: measure afresh
            last["test_loss"], last["test_accuracy"] = evaluate(self.model, data, self.comm,
                                                                self.cfg.train.eval_batch_size)
        summary = {**last, "model_sha256": self.model.sha256(), "widths": list(self.model.widths),
                   "nnz": self.model.nnz, "hidden_neurons": self.model.hidden_neurons, "steps": self.progress.step,
                   "epochs_completed": self.progress.epoch, "ranks": self.size,
                   "best_test_accuracy": max((h["test_accuracy"] for h in self.history), default=None)}
        self.log.write_json("summary.json", summary)
        self.log.info(f"done: test_accuracy {last.get('test_accuracy', float('nan')):.4f}, "
                      f"model_sha256 {summary['model_sha256'][:16]}..., summary in {self.run_dir / 'summary.json'}")
