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
