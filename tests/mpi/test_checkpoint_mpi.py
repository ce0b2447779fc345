"""Collective checkpoint tests that hold at any communicator size.

Run as ``pytest tests/mpi/test_checkpoint_mpi.py`` (one rank) and under
``mpiexec -n 2|3 python -m mpi4py -m pytest tests/mpi/test_checkpoint_mpi.py``.
Every test does all its collectives unconditionally and only then asserts on gathered results,
so a failing assertion on one rank cannot leave the other ranks waiting in a collective.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

MPI = pytest.importorskip("mpi4py.MPI")

from hpc_sparse.checkpoint import (  # noqa: E402
    CheckpointError,
    checkpoint_dir,
    find_latest_valid,
    load_checkpoint,
    save_checkpoint,
)


def make_state(n_layers=5):
    """The same replica on every rank: built from a fixed seed."""
    rng = np.random.default_rng(1234)
    state = {}
    for i in range(n_layers):
        w = sp.random(40 + i, 30, density=0.2, format="csr", dtype=np.float32, random_state=rng)
        state[f"layers/{i}/W"] = w
        state[f"layers/{i}/b"] = rng.standard_normal(30).astype(np.float32)
        state[f"opt/{i}/W_momentum"] = np.zeros(w.nnz, dtype=np.float32)
    state["layers/4/W"] = sp.csr_matrix((44, 30), dtype=np.float32)  # 0 nnz
    state["step_count"] = np.array(17, dtype=np.int64)
    return state


def fingerprint(state):
    """SHA-256 over every array's bytes, shapes and dtypes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        x = state[key]
        parts = [x.data, x.indices, x.indptr, np.asarray(x.shape)] if sp.issparse(x) else [x]
        for p in parts:
            h.update(f"{key}:{p.dtype.str}:{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def test_each_rank_writes_a_disjoint_shard_and_all_read_the_same(comm, run_dir):
    state = make_state()
    path = save_checkpoint(comm, run_dir, 10, state, {"epoch": 1, "config": {"n": comm.size}},
                           rank_state={"rank": np.array([comm.rank], dtype=np.int64)})
    loaded, manifest, mine = load_checkpoint(path, rank=comm.rank)
    shard_files = sorted(p.name for p in path.glob("shard-*.h5"))
    seen = comm.allgather((str(path), fingerprint(loaded), mine["rank"].tolist()))
    assert [s[0] for s in seen] == [str(path)] * comm.size
    assert {s[1] for s in seen} == {fingerprint(state)}
    assert [s[2] for s in seen] == [[r] for r in range(comm.size)]
    assert manifest["n_ranks"] == comm.size
    assert shard_files == [f"shard-{r:05d}-of-{comm.size:05d}.h5" for r in range(comm.size)]
    keys = [k for shard in manifest["shards"] for k in shard["keys"]]
    assert sorted(keys) == sorted(state)  # each key in exactly one shard
    assert all(manifest["arrays"][k]["shard"] == s["rank"] for s in manifest["shards"] for k in s["keys"])


def test_files_do_not_depend_on_the_readers_size(comm, run_dir):
    """A P-rank save equals a 1-rank save, whatever the size of the job that reads it."""
    state = make_state()
    wide = save_checkpoint(comm, run_dir / "wide", 3, state, {"epoch": 0})
    narrow = None
    if comm.rank == 0:
        narrow = str(save_checkpoint(MPI.COMM_SELF, run_dir / "narrow", 3, state, {"epoch": 0}))
    narrow = Path(comm.bcast(narrow, root=0))
    a, ma, _ = load_checkpoint(wide)
    b, mb, rs = load_checkpoint(narrow, rank=comm.rank)
    prints = comm.allgather((fingerprint(a), fingerprint(b), ma["n_ranks"], mb["n_ranks"], rs))
    assert all(p[0] == p[1] == fingerprint(state) for p in prints)
    assert all(p[2] == comm.size and p[3] == 1 and p[4] is None for p in prints)


def test_retention_and_latest_under_mpi(comm, run_dir):
    state = make_state(2)
    for step in (1, 2, 3):
        save_checkpoint(comm, run_dir, step, state, {"epoch": step}, keep=2)
    comm.Barrier()  # rank 0 applies retention after it has released the other ranks
    names = sorted(p.name for p in checkpoint_dir(run_dir).iterdir())
    latest, skipped = find_latest_valid(run_dir)
    results = comm.allgather((names, latest.name, skipped))
    assert all(r == (["step-000000002", "step-000000003"], "step-000000003", []) for r in results)


def test_failure_on_last_rank_aborts_on_all(comm, run_dir):
    bad = comm.rank == comm.size - 1
    rank_state = {"x": np.array(["text"])} if bad else {"x": np.zeros(1)}
    error = None
    try:
        save_checkpoint(comm, run_dir, 4, make_state(2), {"epoch": 0}, rank_state=rank_state)
    except CheckpointError as exc:
        error = str(exc)
    ckdir = checkpoint_dir(run_dir)
    left = sorted(p.name for p in ckdir.iterdir()) if ckdir.exists() else []
    results = comm.allgather((error, left))
    for err, files in results:
        assert err is not None and f"failed on rank {comm.size - 1}" in err and "fix:" in err
        assert files == []


def test_a_run_dir_that_is_another_folder_on_some_ranks_fails_the_save_by_name(comm, run_dir):
    """Issue 19: a run dir that is not shared by the nodes (simulated: ranks > 0 see another
    folder under the same checkpoint layout, as a node-local disk would give them). The save
    fails on every rank with the cause named, and the checkpoint committed before is kept."""
    first = save_checkpoint(comm, run_dir / "view-0", 4, make_state(2), {"epoch": 0})
    committed = sorted((p.name, p.read_bytes()) for p in first.iterdir())
    view = run_dir / f"view-{min(comm.rank, 1)}"  # rank 0 sees view-0, every other rank view-1
    if comm.rank == 0 and comm.size > 1:
        checkpoint_dir(view.with_name("view-1")).mkdir(parents=True)
    comm.Barrier()
    error = None
    try:
        save_checkpoint(comm, view, 8, make_state(2), {"epoch": 1})
    except CheckpointError as exc:
        error = str(exc)
    results = comm.allgather(error)
    left = sorted(p.name for p in checkpoint_dir(run_dir / "view-0").iterdir())
    assert sorted((p.name, p.read_bytes()) for p in first.iterdir()) == committed
    if comm.size == 1:  # one rank sees one folder: the save works
        assert results == [None] and left == [first.name, "step-000000008"]
        return
    assert left == [first.name]  # nothing new committed, no temporary folder left behind
    for err in results:
        assert err is not None and "does not see" in err and "shared by all ranks" in err, err
