"""A resume is agreed by all ranks (issue 11, defect 2); any communicator size.

Run as ``pytest tests/mpi/test_resume_agreed.py`` and under
``mpiexec -n 2|3 python -m mpi4py -m pytest tests/mpi/test_resume_agreed.py``.

* Rank 0 chooses the checkpoint: a rank whose verification of the newest one fails (a
  transient read error, simulated) makes *every* rank skip it, instead of resuming an older
  step on its own.
* Each shard is SHA-256-checked once per job, not once per rank.
* After loading, the ranks prove they hold the same state; a rank that loaded something
  else stops every rank with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from hpc_sparse.checkpoint import format as ckfmt  # noqa: E402
from hpc_sparse.config import load_config  # noqa: E402
from hpc_sparse.errors import UserError  # noqa: E402
from hpc_sparse.train import Trainer  # noqa: E402

BASE = ["data.n_train=600", "data.n_test=300", "data.n_features=60", "data.n_informative=10",
        "model.layers=[60,40,30,4]", "model.epsilon=4", "train.batch_size=20", "train.epochs=3",
        "train.lr=0.05", "train.threads=1", "checkpoint.keep=5"]


def config(*extra: str):
    return load_config(None, BASE + list(extra))


def two_checkpoints(comm, run_dir: Path) -> list[Path]:
    """A run that leaves checkpoints at steps 12 (every_steps=10, rounded up to a sync point)
    and 20 (max_steps, at the end)."""
    Trainer(config("train.max_steps=20", "checkpoint.every_steps=10"), comm, run_dir, quiet=True).run()
    return sorted((run_dir / "checkpoints").glob("step-*"))


def test_one_rank_failing_to_verify_the_newest_makes_every_rank_skip_it(comm, run_dir, monkeypatch):
    older, newest = two_checkpoints(comm, run_dir)
    real = ckfmt.sha256_file
    if comm.rank == comm.size - 1:  # this rank cannot read the newest checkpoint right now
        monkeypatch.setattr(ckfmt, "sha256_file",
                            lambda path: "0" * 64 if Path(path).parent == newest else real(path))
    tr = Trainer(config("train.max_steps=20"), comm, run_dir, quiet=True)
    status = tr.run("auto")
    monkeypatch.undo()
    resumed = comm.allgather(tr.resumed.path.name if tr.resumed else None)
    steps = comm.allgather(tr.progress.step)
    assert status == 0
    assert resumed == [older.name] * comm.size  # the same choice everywhere: the older one
    assert steps == [20] * comm.size
    # the skipped one was set aside (renamed, kept); the run then saved step 20 anew
    assert len(list(newest.parent.glob(newest.name + ".invalid-*"))) == 1 and newest.is_dir()


def test_each_shard_is_hashed_once_per_job(comm, run_dir, monkeypatch):
    _, newest = two_checkpoints(comm, run_dir)
    n_shards = len(list(newest.glob("shard-*.h5")))
    real, calls = ckfmt.sha256_file, []
    monkeypatch.setattr(ckfmt, "sha256_file", lambda path: calls.append(Path(path).name) or real(path))
    tr = Trainer(config("train.max_steps=20"), comm, run_dir, quiet=True)
    status = tr.run("auto")  # resumes the newest, which is the end: nothing to train or save
    monkeypatch.undo()
    everyone = sum(comm.allgather(calls), [])
    assert sorted(everyone) == sorted(p.name for p in newest.glob("shard-*.h5")) and len(everyone) == n_shards
    assert status == 0 and tr.resumed is not None and tr.resumed.path == newest


def test_a_rank_that_loaded_another_model_stops_every_rank(comm, run_dir, monkeypatch):
    import importlib

    try:  # where the resume builds the model (hpc_sparse.train before the engine existed)
        loader = importlib.import_module("hpc_sparse.engine.resume")
    except ImportError:
        loader = importlib.import_module("hpc_sparse.train")
    two_checkpoints(comm, run_dir)
    real = loader.model_from_state

    def damaged(cfg, state, source):
        model = real(cfg, state, source)
        model.layers[0].weight.data[0] += np.float32(1e-3)  # what a bad read could leave behind
        return model

    if comm.rank == comm.size - 1:
        monkeypatch.setattr(loader, "model_from_state", damaged)
    error = None
    try:
        Trainer(config(), comm, run_dir, quiet=True).run("auto")
    except UserError as exc:
        error = str(exc)
    monkeypatch.undo()
    errors = comm.allgather(error)
    assert all(e is not None and "differ" in e and "fix:" in e for e in errors), errors


# ---------------------------------------------------------------- issue 18


def test_an_io_error_on_one_rank_stops_every_rank_and_sets_nothing_aside(comm, run_dir, monkeypatch):
    """Defect 2: an EIO while hashing the newest checkpoint (on the last rank) is not a verdict
    on it: every rank raises the same environment error naming the file and errno, and
    neither checkpoint is set aside nor older one resumed."""
    import errno

    from hpc_sparse.checkpoint import CheckpointError

    older, newest = two_checkpoints(comm, run_dir)
    real = ckfmt.sha256_file

    def failing(path):
        if Path(path).parent == newest:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(ckfmt, "sha256_file", failing)  # on every rank: whoever hashes a shard of it fails
    error = None
    try:
        Trainer(config("train.max_steps=20"), comm, run_dir, quiet=True).run("auto")
    except UserError as exc:
        error = exc
    monkeypatch.undo()
    comm.Barrier()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    errors = comm.allgather(None if error is None else (type(error).__name__, str(error)))
    assert all(e is not None and e[0] != CheckpointError.__name__ and "EIO" in e[1] and newest.name in e[1]
               for e in errors), errors
    assert names == [older.name, newest.name]


def test_no_rank_parses_a_checkpoint_before_every_hash_passed(comm, run_dir, monkeypatch):
    """Defect 4: shard k is hashed by rank k % P only; the verdicts are exchanged before any
    rank hands a shard to HDF5, so a damaged shard (its size kept) reaches no parser."""
    import h5py

    from hpc_sparse.checkpoint import CheckpointError, load_agreed

    _, newest = two_checkpoints(comm, run_dir)
    damaged = sorted(newest.glob("shard-*.h5"))[-1]
    comm.Barrier()
    if comm.rank == 0:
        raw = bytearray(damaged.read_bytes())
        for i in range(64, 96):
            raw[i] ^= 0x5A
        damaged.write_bytes(bytes(raw))
    comm.Barrier()
    opened = []
    real = h5py.File
    monkeypatch.setattr(h5py, "File", lambda name, *a, **k: opened.append(Path(name).name) or real(name, *a, **k))
    error = None
    try:
        load_agreed(comm, newest)
    except CheckpointError as exc:
        error = str(exc)
    monkeypatch.undo()
    results = comm.allgather((error, damaged.name in opened))
    assert all(e is not None and "SHA-256" in e and not parsed for e, parsed in results), results


def test_a_locked_run_dir_is_refused_on_every_rank(comm, run_dir):
    """Defect 1: rank 0 takes the lock; every rank learns the verdict through one collective
    and raises the same one-line error naming the holder, before touching anything."""
    from hpc_sparse.runtime.run_lock import acquire

    held = None
    if comm.rank == 0:
        held, _ = acquire(run_dir)  # this process holds the run dir, as another live job would
    error = None
    try:
        Trainer(config(), comm, run_dir, quiet=True).run("auto")
    except UserError as exc:
        error = str(exc)
    if held is not None:
        held.release()
    errors = comm.allgather(error)
    comm.Barrier()
    assert all(e is not None and "is in use by" in e and "pid" in e for e in errors), errors
    assert len(set(errors)) == 1 and not (run_dir / "checkpoints").exists()


def test_evaluate_and_info_load_rank_0s_choice_hashing_each_shard_once(comm, run_dir, monkeypatch):
    """Defect 13: evaluate, info and convert load through the rank-agreed loader: rank 0
    chooses (a rank that lists the folder differently, e.g. while a save commits, follows
    it) and each shard is hashed once per job, not by every rank."""
    from hpc_sparse.checkpoint import agreed
    from hpc_sparse.run_commands import load_run

    older, newest = two_checkpoints(comm, run_dir)
    real_hash, calls = ckfmt.sha256_file, []
    monkeypatch.setattr(ckfmt, "sha256_file", lambda path: calls.append(Path(path).name) or real_hash(path))
    if comm.rank == comm.size - 1 and comm.rank != 0:  # this rank would list only the older one
        monkeypatch.setattr(agreed, "committed_checkpoints", lambda d: [(12, older)])
    _, model, manifest, path = load_run(comm, run_dir, None)
    monkeypatch.undo()
    everyone = sum(comm.allgather(calls), [])
    chosen = comm.allgather((path.name, model.sha256()))
    assert sorted(everyone) == sorted(p.name for p in newest.glob("shard-*.h5"))
    assert len(set(chosen)) == 1 and chosen[0][0] == newest.name
