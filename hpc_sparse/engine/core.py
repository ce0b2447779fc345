"""The training engine: everything a run needs whatever its schedule, written once.

A *schedule* (:mod:`hpc_sparse.schedules`: synchronous averaging, WASAP-SGD) decides who
trains which batch and when replicas meet. The engine does the rest: start and resume
(:mod:`~hpc_sparse.engine.resume`), the step loop (:mod:`~hpc_sparse.engine.loop`), the
training step, the agreement at meeting points and what follows from it (a checkpoint, a stop
with exit 75, a divergence error), the epoch-end topology update
(:mod:`~hpc_sparse.engine.topology_update`), evaluation, the metrics record
(:mod:`~hpc_sparse.engine.metrics`), saving, finishing, and ending the whole job when one
rank fails (:mod:`~hpc_sparse.engine.failure`).

A schedule is any object with ``name``, ``check_config(engine)``,
``check_resume(engine, resumed)``, ``run(engine) -> int`` (the status :meth:`Engine.act`
or the step loop returned: 0, or ``EXIT_REQUEUE`` after a stop with a checkpoint) and
``done_state(engine)`` (the schedule state of a complete run's checkpoint).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hpc_sparse import __version__
from hpc_sparse.checkpoint import save_checkpoint
from hpc_sparse.config import Config
from hpc_sparse.data import Dataset
from hpc_sparse.engine import rank_models
from hpc_sparse.engine.agreement import Agreement, agree
from hpc_sparse.engine.failure import agreed, end_job_on_error, must_abort
from hpc_sparse.engine.loop import Checkpoint, Plan, train_epochs
from hpc_sparse.engine.metrics import AsyncFigures, EpochRecord, MergeFigures, Traffic, describe, diverged
from hpc_sparse.engine.ownership import take_run_dir
from hpc_sparse.engine.progress import Progress
from hpc_sparse.engine.services import configure_threads, evaluate, load_data
from hpc_sparse.engine.resume import Resumed, finish_resume, load_resumed, replica_arrays
from hpc_sparse.engine.topology_update import TopologyUpdate, prune, update_topology
from hpc_sparse.errors import UserError
from hpc_sparse.log import RunLog
from hpc_sparse.model_builder import build_model, check_data_shape, describe_blocking
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel.placement import describe_placement, gather_placement
from hpc_sparse.runtime.host import host_info
from hpc_sparse.runtime.run_lock import RunLock
from hpc_sparse.runtime.signals import EXIT_REQUEUE, StopFlag
from hpc_sparse.runtime.slurm import describe as describe_slurm
from hpc_sparse.runtime.slurm import read_slurm_env
from hpc_sparse.sparse import SGD, SparseMLP, StepResult, dropout_key
from hpc_sparse.topology import Gather
from hpc_sparse.topology.importance import neurons_without_inputs


class Schedule(Protocol):
    """What the engine needs from a training mode (see the module docstring)."""

    name: str

    def check_config(self, engine: "Engine") -> None: ...

    def check_resume(self, engine: "Engine", resumed: Resumed) -> None: ...

    def run(self, engine: "Engine") -> int: ...

    def done_state(self, engine: "Engine") -> dict[str, Any]: ...


class Engine:
    """One training job on ``comm`` writing into ``run_dir``; :meth:`run_schedule` trains it.

    Attributes a schedule reads and updates: ``cfg``, ``comm``, ``rank``, ``size``, ``log``,
    ``data``, ``model`` (the model this rank trains), ``progress``, ``history`` (one JSON
    record per epoch, the same on every rank), ``stop`` (the stop flag), ``resumed`` (what a
    resume loaded, else None), ``sums`` (this rank's training loss sum, hits and samples
    since the epoch began or the run resumed, float64 (3,)), ``last_batch`` (the sample
    indices of this rank's last training batch, for RigL's refresh after a pruning).
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
        self.resumed: Resumed | None = None
        self.schedule_name = ""
        self.host = host_info()
        self.run_host = self.host  # rank 0's, once the run has started: the one checkpoints record
        self.lock: RunLock | None = None  # the run dir's lock while run_schedule runs
        self.n_train = 0
        self.model: SparseMLP
        self.data: Dataset
        self.sums = np.zeros(3)
        self.last_batch: np.ndarray | None = None
        self._last_save_time = time.monotonic()
        self._late_stop = False  # a stop agreed once the run was complete

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
            agreed(self.comm, lambda: schedule.check_config(self))
            self.start(resume, schedule, fresh_if_none_valid)
            status = schedule.run(self)
            if status == 0:
                self.finish(schedule)
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
        exists and this job holds it. A user error on any rank is raised on every rank."""
        cfg, comm = self.cfg, self.comm
        threads = configure_threads(cfg, comm)
        hosts = gather_placement(comm, threads)  # collective: before anything that may fail on one rank
        self.run_host = comm.bcast(self.host if self.rank == 0 else None, root=0)
        self.data = d = load_data(cfg, comm)  # its errors are agreed by the ranks that build the cache
        self.n_train = int(d.x_train.shape[0])
        agreed(comm, lambda: check_data_shape(cfg, d.n_features, d.n_classes))
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
            self.resumed = load_resumed(comm, cfg, self.run_dir, resume, self.log, schedule.name, fresh_if_none_valid)
        if self.resumed is not None:
            resumed = self.resumed
            self.model, self.progress, self.history = resumed.model, resumed.progress, resumed.history
            agreed(comm, lambda: schedule.check_resume(self, resumed))  # may refuse, or move the position
            self.progress.last_save_step = self.progress.step
            finish_resume(comm, self.run_dir, resumed, self.progress, self.host, self.log)
            self.log.write_metrics(self.history)
        else:
            self.model = agreed(comm, lambda: build_model(cfg))
            self.log.info(f"model: {list(self.model.widths)}, nnz {self.model.nnz:,}, epsilon {cfg.model.epsilon}, "
                          f"{cfg.model.activation}, dropout {cfg.model.dropout}")
        self.log.info(describe_blocking(self.model, cfg.train.batch_size))
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n")

    def finish(self, schedule: Schedule) -> None:
        """Prove that every rank holds the same model, save it at the end
        (``checkpoint.at_end``, unless this step is saved already), measure a run that stopped
        mid-epoch, write summary.json."""
        p = self.progress
        pc.check_agreement(self.comm, *replica_arrays(self.model), what="final model")
        if self.cfg.checkpoint.at_end and p.last_save_step != p.step:
            self.save(Checkpoint(per_rank=False, schedule_state=schedule.done_state(self)))
        last = dict(self.history[-1]) if self.history else {}
        if not self.history or last.get("step") != p.step:  # stopped mid-epoch: measure afresh
            last["test_loss"], last["test_accuracy"] = self.evaluate(self.model)
        summary = {**last, "model_sha256": self.model.sha256(), "widths": list(self.model.widths),
                   "nnz": self.model.nnz, "hidden_neurons": self.model.hidden_neurons,
                   "neurons_without_inputs": sum(neurons_without_inputs(self.model)), "steps": p.step,
                   "epochs_completed": p.epoch, "ranks": self.size, "mode": self.schedule_name,
                   "best_test_accuracy": max((h["test_accuracy"] for h in self.history), default=None)}
        self.log.write_json("summary.json", summary)
        if self._late_stop:
            self.log.info(f"stop signal ({self._stop_name()}) arrived as training completed: finishing (status 0) "
                          "instead of requeueing")
        self.log.info(f"done: test_accuracy {last.get('test_accuracy', float('nan')):.4f}, "
                      f"model_sha256 {summary['model_sha256'][:16]}..., summary in {self.run_dir / 'summary.json'}")

    def complete(self) -> bool:
        """The run has trained ``train.epochs`` epochs or ``train.max_steps`` steps."""
        return self.progress.complete(self.cfg.train.epochs, self.cfg.train.max_steps)

    # ---------------------------------------------------------------- training
    def train_epochs(self, plan: Plan) -> int:
        """The step loop over ``plan`` (:func:`~hpc_sparse.engine.loop.train_epochs`)."""
        return train_epochs(self, plan)

    def train_batch(self, idx: np.ndarray, epoch: int, dropout_step: int, sgd: SGD, owner: int | None = None
                    ) -> StepResult | None:
        """One training step of this rank's model on samples ``idx`` of 0-based ``epoch``
        (None if ``idx`` is empty). The dropout masks are those of step ``dropout_step`` of
        rank ``owner`` (default: this rank), whoever trains the batch."""
        if idx.size == 0:
            self.log.step()
            return None
        cfg = self.cfg
        who = self.rank if owner is None else owner
        r = self.model.train_step(*self.data.train_batch(idx, cfg.seed, epoch), sgd,
                                  dropout_key(cfg.seed, dropout_step, who, 0))
        self.last_batch = idx
        self.log.step(r.loss_sum / idx.size)
        return r

    def update_topology(self, model: SparseMLP, epoch: int, *, stream: int = 0, gather: Gather | None = None,
                        prune: bool = True, who: str = "") -> TopologyUpdate:
        """The epoch-end topology update of ``model`` after 0-based ``epoch``
        (:func:`~hpc_sparse.engine.topology_update.update_topology`): importance pruning if
        scheduled (and ``prune``), SET/RigL evolution if scheduled, with RNG stream
        ``progress.evolutions + stream``; counts the evolution. RigL's refresh after a pruning
        uses this rank's last training batch."""
        p = self.progress
        update = update_topology(self.cfg, self.log, model, epoch, p.evolutions + stream, self._last_batch,
                                 gather, prune, who)
        if update.evolved:
            p.evolutions += 1
        return update

    def prune(self, model: SparseMLP, when: str) -> list[int]:
        """Importance-prune ``model`` now, logged as "importance pruning {when}: ..."."""
        return prune(self.cfg, self.log, model, when)

    def _last_batch(self) -> tuple[np.ndarray, np.ndarray] | None:
        idx = self.last_batch
        return None if idx is None else (self.data.x_train[idx], self.data.y_train[idx])

    def evaluate(self, model: SparseMLP, comm: Any | None = None, polled: bool = False) -> tuple[float, float]:
        """Test (loss, accuracy) of ``model``, the test set split over ``comm`` (default: the run's)."""
        return evaluate(model, self.data, self.comm if comm is None else comm, self.cfg.train.eval_batch_size,
                        polled)

    def close_epoch(self, epoch: int, train: tuple[float, float | None, float], test: tuple[float, float],
                    t0: float, train_seconds: float, sample_seconds: float, update: TopologyUpdate, *,
                    shared: bool, phase: str | None = None, traffic: Traffic | None = None,
                    asynchronous: AsyncFigures | None = None, merge: MergeFigures | None = None) -> None:
        """The end of 0-based ``epoch``, after its topology update and evaluation: the
        progress moves on to the next epoch and the epoch's record is written (:meth:`record`,
        ``shared`` as there). ``train``: the epoch's training loss sum, hits (None: not every
        update reported them) and samples, over all ranks; ``test``: test loss and accuracy;
        ``t0``: ``time.perf_counter()`` when the epoch began; ``sample_seconds``: the time the
        samples took (for samples_per_second); the optional groups: the schedule's own figures."""
        p, model = self.progress, self.model
        loss, correct, count = train
        p.epoch, p.step_in_epoch = epoch + 1, 0
        p.epoch_loss_sum, p.epoch_correct, p.epoch_count = 0.0, 0, 0
        self.sums[:] = 0
        self.record(EpochRecord(
            epoch=epoch + 1, step=p.step, train_loss=loss / max(count, 1),
            train_accuracy=None if correct is None else correct / max(count, 1), test_loss=test[0],
            test_accuracy=test[1], nnz=model.nnz, neurons=model.hidden_neurons, widths=list(model.widths),
            epoch_seconds=time.perf_counter() - t0, train_seconds=train_seconds, evolve_seconds=update.evolve_seconds,
            samples_per_second=count / max(sample_seconds, 1e-9), ranks=self.size, phase=phase, traffic=traffic,
            asynchronous=asynchronous, merge=merge), shared)

    def record(self, rec: EpochRecord, shared: bool) -> None:
        """The one writer of the metrics: append ``rec`` to the history and metrics.jsonl and
        log it; raise a UserError if its training loss is not finite. ``shared``: every rank
        calls this, and every rank records rank 0's record (collective)."""
        entry = rec.to_json()
        if shared and self.size > 1:
            entry = json.loads(pc.bcast_bytes(self.comm, json.dumps(entry).encode() if self.rank == 0 else None))
        self.history.append(entry)
        self.log.write_metrics(self.history)
        self.log.info(describe(entry, rec.details(), self.cfg.train.epochs))
        if not np.isfinite(entry["train_loss"]):
            raise UserError(diverged(f"in epoch {entry['epoch']}", self.cfg.train.lr), every_rank=shared)

    # ---------------------------------------------------------- meeting points
    def agree(self, nonfinite: bool = False, figures: tuple[float, ...] = (), polled: bool = False) -> Agreement:
        """The ranks' agreement at a meeting point (:func:`~hpc_sparse.engine.agreement.agree`):
        this rank's stop flag, whether a checkpoint is due (``checkpoint.every_steps``, or
        ``every_seconds`` on rank 0's clock), ``nonfinite`` and ``figures``. Collective."""
        due = self.save_steps_due() or (self.rank == 0 and self.save_time_due())
        return agree(self.comm, stop=self.stop.requested, save_due=due, nonfinite=nonfinite, figures=figures,
                     polled=polled)

    def meeting_wanted(self, peer_stop: bool = False) -> bool:
        """Whether this rank should call the replicas to a meeting (WASAP-SGD's server, which
        decides when the asynchronous phase meets): a stop asked of it or reported by a peer
        (``peer_stop``), or a checkpoint due; never once the run is complete."""
        return not self.complete() and (peer_stop or self.stop.requested or self.save_steps_due()
                                        or self.save_time_due())

    def raise_if_diverged(self, agreement: Agreement) -> None:
        if agreement.nonfinite:
            raise UserError(diverged(f"at step {self.progress.step}", self.cfg.train.lr), every_rank=True)

    def act(self, agreement: Agreement, checkpoint: Checkpoint) -> int | None:
        """What the ranks do after agreeing, the same for every schedule: a divergence error;
        once the run is complete, nothing (a stop then finishes with status 0, the checkpoint
        is ``checkpoint.at_end``'s); a stop: a checkpoint (unless this step has one), a log
        line, ``EXIT_REQUEUE``; a checkpoint due: ``checkpoint``. Returns the status to end
        the run with, or None to go on. Collective."""
        self.raise_if_diverged(agreement)
        if self.complete():
            self._late_stop |= agreement.stop
            return None
        p = self.progress
        if agreement.stop:
            if p.last_save_step != p.step:
                self.save(checkpoint)
            self.log.info(f"stop signal ({self._stop_name()}) handled at step {p.step}: checkpoint written; exiting "
                          f"with status {EXIT_REQUEUE} so the job script requeues")
            return EXIT_REQUEUE
        if agreement.save_due:
            self.save(checkpoint)
        return None

    def _stop_name(self) -> str:
        return self.stop.signal_name or "on another rank"

    # -------------------------------------------------------------- checkpoints
    def seconds_since_save(self) -> float:
        return time.monotonic() - self._last_save_time

    def save_time_due(self) -> bool:
        """``checkpoint.every_seconds`` passed since the last save, on this rank's clock (the
        ranks agree on rank 0's)."""
        every = self.cfg.checkpoint.every_seconds
        return every > 0 and self.seconds_since_save() >= every

    def save_steps_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.progress.step - self.progress.last_save_step >= every

    def save(self, checkpoint: Checkpoint) -> Path:
        """Collectively write a checkpoint of this step: the replica, or every rank's own model
        (``checkpoint.per_rank``), and the meta, the same on every rank (config, progress with
        the epoch's training sums over all ranks, history, rank 0's host, the schedule state)."""
        p = self.progress
        sums = pc.allreduce_sum_(self.comm, self.sums.copy())
        saved = replace(p, last_save_step=p.step, epoch_loss_sum=p.epoch_loss_sum + float(sums[0]),
                        epoch_correct=p.epoch_correct + int(sums[1]), epoch_count=p.epoch_count + int(sums[2]))
        meta: dict[str, Any] = {
            "config": self.cfg.to_dict(), "progress": asdict(saved), "history": self.history,
            "epoch": saved.epoch, "n_train": self.n_train, "widths": list(self.model.widths),
            "schedule": self.schedule_name, "host": self.run_host, "schedule_state": checkpoint.schedule_state,
            "rng": "counter-based: data order = f(seed, epoch), dropout = f(seed, step, rank, layer), "
                   "topology = f(seed, evolution, layer)"}
        if checkpoint.per_rank:
            meta["rank_model_sha256"] = self.comm.allgather(self.model.sha256())
            state, own = {}, rank_models.pack(self.model)
        else:
            meta["model_sha256"] = self.model.sha256()
            state, own = self.model.state_dict(), None
        path = save_checkpoint(self.comm, self.run_dir, saved.step, state, meta, keep=self.cfg.checkpoint.keep,
                               rank_state=own)
        p.last_save_step = saved.step
        self._last_save_time = time.monotonic()
        self.log.info(f"checkpoint {path.name} written (step {saved.step})")
        return path
