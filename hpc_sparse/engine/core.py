"""The training engine: everything a run needs whatever its schedule, written once.

A *schedule* (:mod:`hpc_sparse.schedules`: synchronous averaging, WASAP-SGD) decides who
trains which batch and when replicas meet. The engine does the rest: start and resume
(:mod:`hpc_sparse.engine.resume`), the epoch-end topology update (importance pruning, the
RigL gradient refresh, SET/RigL evolution), evaluation, the metrics record and divergence
check, saving checkpoints, the stop flag and the requeue status, finishing, and ending the
whole job when one rank fails (:mod:`hpc_sparse.engine.failure`).

A schedule is any object with ``name``, ``check_config(engine)``,
``check_resume(engine, resumed)`` and ``run(engine) -> int`` (0 when the run is complete,
``EXIT_REQUEUE`` after a stop with a checkpoint); it calls only the public methods here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from hpc_sparse import __version__
from hpc_sparse.checkpoint import save_checkpoint
from hpc_sparse.config import Config
from hpc_sparse.data import Dataset, block_bounds, load_dataset
from hpc_sparse.engine import resume as rs
from hpc_sparse.engine.failure import end_job_on_error, must_abort
from hpc_sparse.engine.ownership import take_run_dir
from hpc_sparse.engine.progress import Progress
from hpc_sparse.errors import UserError
from hpc_sparse.log import RunLog
from hpc_sparse.model_builder import build_model, check_data_shape, describe_blocking, layer_structure
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel import node_build
from hpc_sparse.parallel.placement import describe_placement, gather_placement
from hpc_sparse.runtime.host import host_info
from hpc_sparse.runtime.run_lock import RunLock
from hpc_sparse.runtime.signals import EXIT_REQUEUE, StopFlag
from hpc_sparse.runtime.slurm import describe as describe_slurm
from hpc_sparse.runtime.slurm import read_slurm_env
from hpc_sparse.sparse import SparseMLP
from hpc_sparse.topology import Gather, evolve_model, prune_neurons
from hpc_sparse.topology.importance import describe_pruning, neurons_without_inputs
from hpc_sparse.topology.schedule import drop_fraction, evolve_after_epoch, prune_neurons_after_epoch

Batch = tuple[np.ndarray, np.ndarray]


class Schedule(Protocol):
    """What the engine needs from a training mode (see the module docstring)."""

    name: str

    def check_config(self, engine: "Engine") -> None: ...

    def check_resume(self, engine: "Engine", resumed: rs.Resumed) -> None: ...

    def run(self, engine: "Engine") -> int: ...


@dataclass
class TopologyUpdate:
    """What one epoch-end topology update did."""

    pruned: list[int] | None  # neurons pruned per hidden layer (prune_neurons), None if none was scheduled
    evolved: bool
    evolve_seconds: float

    @property
    def changed(self) -> bool:
        return self.pruned is not None or self.evolved


def configured_shapes(cfg: Config) -> list[tuple[int, int]]:
    """The (n_in, n_out) of every weight matrix as configured: SET draws regrown values for
    these shapes, whatever importance pruning has removed since (README, "Where this differs")."""
    w = cfg.model.layers
    return list(zip(w[:-1], w[1:]))


def configure_threads(cfg: Config, comm: Any) -> int:
    """Set numba's thread count: config, else HPC_SPARSE_THREADS, else cores/ranks on the node."""
    import numba

    on_node = pc.ranks_on_node(comm)  # a collective: on every rank, whatever the environment says
    n = cfg.train.threads or int(os.environ.get("HPC_SPARSE_THREADS", "0") or 0) or pc.default_threads(on_node)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def load_data(cfg: Config, comm: Any = None) -> Dataset:
    """The dataset ``cfg.data`` describes, loaded and preprocessed as a run sees it
    (:func:`~hpc_sparse.data.load_dataset`). Collective over
    ``comm`` (None: this process alone): a missing cache entry is built once per node (or
    once, on a folder every rank sees) while the other ranks wait, then every rank maps it."""
    coordinate = None if comm is None else node_build.coordinator(comm)
    return load_dataset(**asdict(cfg.data), coordinate=coordinate)


def evaluate(model: SparseMLP, data: Dataset, comm: Any, batch_size: int) -> tuple[float, float]:
    """Mean test loss and accuracy (a fraction) of ``model`` on ``data.x_test``.

    Each rank of ``comm`` evaluates its block of the test set, in batches of ``batch_size``
    samples; the sums of loss, hits and counts are reduced exactly, so any number of ranks
    reports the same figures. Collective: every rank of ``comm`` must call it."""
    lo, hi = block_bounds(data.x_test.shape[0], comm.Get_size(), comm.Get_rank())
    r = model.evaluate(data.x_test[lo:hi], data.y_test[lo:hi], batch_size)
    tot = pc.allreduce_sum_(comm, np.array([r.loss_sum, r.correct, r.count], np.float64))
    return float(tot[0] / tot[2]), float(tot[1] / tot[2])


class Engine:
    """One training job on ``comm`` writing into ``run_dir``; :meth:`run_schedule` trains it.

    Attributes a schedule reads and updates: ``cfg``, ``comm``, ``rank``, ``size``, ``log``,
    ``data``, ``model`` (the model this rank trains), ``progress``, ``history`` (one record
    per epoch), ``stop`` (the stop flag), ``resumed`` (what a resume loaded, else None),
    ``schedule_state`` (the JSON its checkpoints store unless a save passes its own).
    """

    def __init__(self, cfg: Config, comm: Any, run_dir: Path, quiet: bool = False,
                 stop: StopFlag | None = None) -> None:
        self.cfg = cfg
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.run_dir = Path(run_dir)
        self.log = RunLog(self.run_dir, self.rank, quiet)
        self.stop = stop if stop is not None else StopFlag()
        self.progress = Progress()
        self.history: list[dict[str, Any]] = []
        self.resumed: rs.Resumed | None = None
        self.schedule_name = ""
        self.schedule_state: dict[str, Any] = {}  # what checkpoints store for the schedule by default
        self.host = host_info()
        self.lock: RunLock | None = None  # the run dir's lock while run_schedule runs
        self.n_train = 0
        self.model: SparseMLP
        self.data: Dataset
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def run_schedule(self, schedule: Schedule, resume: str | None = None, *, fresh_if_none_valid: bool = False,
                     break_lock: bool = False) -> int:
        """Take the run dir, start (or resume), train with ``schedule`` to the end (0) or to a
        stop signal (checkpoint written, returns ``EXIT_REQUEUE``), finish. An exception on one
        rank of several ends every rank (:func:`~hpc_sparse.engine.failure.end_job_on_error`).

        ``fresh_if_none_valid``: with ``resume="auto"``, start from step 0 when committed
        checkpoints exist but none loads (otherwise that is refused). ``break_lock``: take
        over a run dir lock whose holder cannot be checked (:mod:`hpc_sparse.engine.ownership`).
        The lock is released at every exit, also when one rank's error aborts the job.

        The stop flag's handlers are installed first (a signal during start-up must not kill
        the rank) and stay installed when this returns ``EXIT_REQUEUE``: a second signal
        before the process exits must not turn 75 into death by signal (``stop.restore()``
        puts the old handlers back if the process continues)."""
        own_handlers = not self.stop.installed
        if own_handlers:
            self.stop.install()
        status = None
        try:
            self.lock = take_run_dir(self.comm, self.run_dir, self.log, break_lock)
            self.schedule_name = schedule.name
            schedule.check_config(self)
            self.start(resume, schedule, fresh_if_none_valid)
            status = schedule.run(self)
            if status == 0:
                self.finish()
            # rank 0 applies retention after a save has released the other ranks; wait for it,
            # so that the run dir is final on every rank when this returns
            self.comm.Barrier()
            return status
        except BaseException as exc:
            if self.lock is not None and must_abort(exc, self.size):
                self.lock.release()  # the abort below ends every rank, rank 0 included
            end_job_on_error(self.comm, exc)
            raise
        finally:
            if self.lock is not None and self.rank == 0:
                self.lock.release()
            self.lock = None
            if own_handlers and status != EXIT_REQUEUE:
                self.stop.restore()

    def start(self, resume: str | None, schedule: Schedule, fresh_if_none_valid: bool = False) -> None:
        """Threads, data; the model from a checkpoint (``resume``) or fresh. The run dir
        exists and this job holds it."""
        cfg = self.cfg
        threads = configure_threads(cfg, self.comm)
        hosts = gather_placement(self.comm, threads)  # collective: before anything that may fail on one rank
        self.data = load_data(cfg, self.comm)
        self.n_train = int(self.data.x_train.shape[0])
        check_data_shape(cfg, self.data.n_features, self.data.n_classes)
        d = self.data
        self.log.info(f"hpc_sparse {__version__} | {self.size} rank(s) x {threads} thread(s) | {pc.mpi_vendor()} "
                      f"| {schedule.name} | {self.host['cpu_model']} ({self.host['numba_cpu_name']})")
        self.log.info(describe_placement(hosts))
        slurm = read_slurm_env()
        if slurm is not None:
            self.log.info(describe_slurm(slurm))
        self.log.info(f"data: {d.name} from {d.source}: {d.x_train.shape[0]} train, {d.x_test.shape[0]} test, "
                      f"{d.n_features} features, {d.n_classes} classes")
        for note in d.notes:
            self.log.info(note)
        if resume:
            self.resumed = rs.load_resumed(self.comm, cfg, self.run_dir, resume, self.log, schedule.name,
                                           fresh_if_none_valid)
        if self.resumed is not None:
            self.model, self.progress, self.history = self.resumed.model, self.resumed.progress, self.resumed.history
            schedule.check_resume(self, self.resumed)  # may refuse (every rank) or move the position
            self.progress.last_save_step = self.progress.step
            rs.finish_resume(self.comm, self.run_dir, self.resumed, self.progress, self.host, self.log)
            self.log.write_metrics(self.history)
        else:
            self.model = build_model(cfg)
            self.log.info(f"model: {list(self.model.widths)}, nnz {self.model.nnz:,}, epsilon {cfg.model.epsilon}, "
                          f"{cfg.model.activation}, dropout {cfg.model.dropout}")
        self.log.info(describe_blocking(self.model, cfg.train.batch_size))
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n")

    def finish(self) -> None:
        """Save at the end (``checkpoint.at_end``, if this step is not saved yet; the model must
        be the same on every rank by now), measure a run that stopped mid-epoch, write summary.json."""
        p = self.progress
        if self.cfg.checkpoint.at_end and p.last_save_step != p.step:
            self.save(Progress(**asdict(p)), state=self.model.state_dict())
        last = dict(self.history[-1]) if self.history else {}
        if not self.history or last.get("step") != p.step:  # stopped mid-epoch: measure afresh
            last["test_loss"], last["test_accuracy"] = self.evaluate(self.model)
        summary = {**last, "model_sha256": self.model.sha256(), "widths": list(self.model.widths),
                   "nnz": self.model.nnz, "hidden_neurons": self.model.hidden_neurons,
                   "neurons_without_inputs": sum(neurons_without_inputs(self.model)), "steps": p.step,
                   "epochs_completed": p.epoch, "ranks": self.size, "mode": self.schedule_name,
                   "best_test_accuracy": max((h["test_accuracy"] for h in self.history), default=None)}
        self.log.write_json("summary.json", summary)
        self.log.info(f"done: test_accuracy {last.get('test_accuracy', float('nan')):.4f}, "
                      f"model_sha256 {summary['model_sha256'][:16]}..., summary in {self.run_dir / 'summary.json'}")

    # ---------------------------------------------------------------- epoch end
    def update_topology(self, model: SparseMLP, epoch: int, evolution: int, last_batch: Batch | None,
                        gather: Gather | None = None, prune: bool = True, who: str = "") -> TopologyUpdate:
        """The epoch-end topology update of ``model`` after 0-based ``epoch``: importance
        pruning (if scheduled and ``prune``), then SET/RigL evolution (if scheduled) with RNG
        stream ``evolution``.

        RigL scores missing connections from the buffers of the model's last training step.
        Importance pruning clears them (the widths or the emptied neurons' outputs changed),
        so before evolving they are recomputed from ``last_batch`` (x, y of this rank's last
        training batch) on the pruned model. ``gather`` exchanges RigL candidates between
        ranks that share the model (None: this rank decides alone). ``who`` names the model
        in log lines."""
        cfg = self.cfg
        pruned = None
        if prune and prune_neurons_after_epoch(epoch, cfg.train.epochs, cfg.importance.enabled,
                                               cfg.importance.start_epoch, cfg.importance.every):
            before = (list(model.widths), model.nnz)
            pruned = prune_neurons(model, cfg.importance.percentile, cfg.importance.min_neurons,
                                   layer_structure(cfg), cfg.importance.mode)
            self.log.info(f"importance pruning after {who}epoch {epoch + 1}: "
                          + describe_pruning(model, cfg.importance.mode, pruned, before))
        evolved = evolve_after_epoch(epoch, cfg.train.epochs, cfg.topology.evolve_every)
        t0 = time.perf_counter()
        if evolved:
            if cfg.topology.growth == "gradient" and model.last_batch() is None:
                if last_batch is None:
                    raise RuntimeError(f"RigL growth after epoch {epoch + 1} needs a training batch of this "
                                       "rank, and it has trained none; this is a bug")
                model.gradients(*last_batch)  # RigL scores need this batch's activations at the new widths
            zeta = drop_fraction(cfg.topology.growth, epoch, cfg.train.epochs, cfg.topology.zeta,
                                 cfg.topology.rigl_end_fraction)
            kwargs = {} if gather is None else {"gather": gather}
            evolve_model(model, zeta=zeta, growth=cfg.topology.growth, seed=cfg.seed, evolution=evolution,
                         init=cfg.model.init, block_rows=cfg.topology.rigl_block_rows,
                         structure=layer_structure(cfg), init_shapes=configured_shapes(cfg), **kwargs)
        return TopologyUpdate(pruned, evolved, time.perf_counter() - t0)

    def evaluate(self, model: SparseMLP, comm: Any | None = None) -> tuple[float, float]:
        """Test (loss, accuracy) of ``model``, the test set split over ``comm`` (default: the run's)."""
        return evaluate(model, self.data, self.comm if comm is None else comm, self.cfg.train.eval_batch_size)

    def record_epoch(self, rec: dict[str, Any], phase: str = "", details: str = "", every_rank: bool = True) -> None:
        """Append one epoch's metrics to the history and metrics.jsonl, log a line, and stop
        with a UserError if the training loss is not finite (``every_rank``: the figures are
        the same on every rank, so all of them raise together)."""
        self.history.append(rec)
        self.log.write_metrics(self.history)
        tag = f" ({phase})" if phase else ""
        self.log.info(f"epoch {rec['epoch']}/{self.cfg.train.epochs}{tag}: train_loss {rec['train_loss']:.4f} "
                      f"test_loss {rec['test_loss']:.4f} test_acc {rec['test_accuracy']:.4f} nnz {rec['nnz']:,} "
                      f"neurons {rec['neurons']:,} {rec['epoch_seconds']:.2f}s "
                      f"({rec['samples_per_second']:.0f} samples/s{details})")
        if not math.isfinite(rec["train_loss"]):
            raise UserError(f"training diverged in epoch {rec['epoch']} (loss is NaN or inf); fix: lower train.lr "
                            f"(now {self.cfg.train.lr}); the last good checkpoint is kept", every_rank=every_rank)

    def diverged(self, step: int, every_rank: bool = True) -> UserError:
        """The error for a non-finite loss seen at ``step``."""
        return UserError(f"training diverged at step {step} (loss is NaN or inf); fix: lower train.lr "
                         f"(now {self.cfg.train.lr}); the last good checkpoint is kept", every_rank=every_rank)

    # -------------------------------------------------------------- checkpoints
    def seconds_since_save(self) -> float:
        return time.monotonic() - self._last_save_time

    def save_time_due(self) -> bool:
        """``checkpoint.every_seconds`` passed since the last save, on this rank's clock (the
        schedule agrees on rank 0's)."""
        every = self.cfg.checkpoint.every_seconds
        return every > 0 and self.seconds_since_save() >= every

    def save_steps_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.progress.step - self.progress.last_save_step >= every

    def save(self, progress: Progress, state: dict[str, Any] | None = None,
             rank_state: dict[str, np.ndarray] | None = None, schedule_state: dict[str, Any] | None = None) -> Path:
        """Collectively write a checkpoint of step ``progress.step``.

        ``state``: the model state, the same on every rank (a replica); or None when every
        rank holds its own model, which then goes into ``rank_state`` (its own shard).
        ``schedule_state``: JSON the schedule needs to continue (e.g. WASAP's phase and
        positions; default ``self.schedule_state``). The meta also records the config,
        progress, history and rank 0's CPU."""
        p = self.progress
        saved = Progress(**asdict(progress))
        saved.last_save_step = saved.step
        meta: dict[str, Any] = {
            "config": self.cfg.to_dict(), "progress": asdict(saved), "history": self.history,
            "epoch": saved.epoch, "n_train": self.n_train, "widths": list(self.model.widths),
            "schedule": self.schedule_name, "host": self.host,
            "schedule_state": self.schedule_state if schedule_state is None else schedule_state,
            "rng": "counter-based: data order = f(seed, epoch), dropout = f(seed, step, rank, layer), "
                   "topology = f(seed, evolution, layer)"}
        if state is None:
            meta["rank_model_sha256"] = self.comm.allgather(self.model.sha256())
            state = {}
        else:
            meta["model_sha256"] = self.model.sha256() if self.rank == 0 else None
        path = save_checkpoint(self.comm, self.run_dir, saved.step, state, meta, keep=self.cfg.checkpoint.keep,
                               rank_state=rank_state)
        p.last_save_step = saved.step
        self._last_save_time = time.monotonic()
        self.log.info(f"checkpoint {path.name} written (step {saved.step})")
        return path

    def requeue(self, save: Callable[[], Any] | None) -> int:
        """After the ranks agreed on a stop: ``save()`` unless this step is saved already, log,
        and return ``EXIT_REQUEUE`` (the CLI exits with it; the job script requeues)."""
        p = self.progress
        if save is not None and p.last_save_step != p.step:
            save()
        self.log.info(f"stop signal ({self.stop.signal_name or 'on another rank'}) handled at step {p.step}: "
                      f"checkpoint written; exiting with status {EXIT_REQUEUE} so the job script requeues")
        return EXIT_REQUEUE
