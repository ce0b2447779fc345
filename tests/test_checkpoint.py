"""Checkpoint I/O in one process: round trips, corruption, atomic commit, retention, messages.

Multi-rank saves are simulated with threads (``ThreadComm``) so that sharding and the collective
failure agreement are tested without an MPI launcher; tests/mpi/ runs the real thing.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.checkpoint import (
    SCHEMA_VERSION,
    CheckpointError,
    checkpoint_dir,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.errors import UserError


class SelfComm:
    """Size-1 communicator with the slice of mpi4py's interface that checkpoint/ uses."""

    rank, size = 0, 1

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def Barrier(self):  # noqa: N802
        pass


class ThreadComm:
    """One rank of a communicator whose ranks are threads of this process."""

    def __init__(self, rank, shared):
        self.rank, self.size, self._shared = rank, shared["size"], shared

    def allgather(self, obj):
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    def bcast(self, obj, root=0):
        return self.allgather(obj if self.rank == root else None)[root]

    def Barrier(self):  # noqa: N802
        self._shared["barrier"].wait()


def run_ranks(size, fn):
    """Call ``fn(comm)`` on ``size`` thread-ranks; return each rank's result or exception."""
    shared = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size, timeout=30)}
    out = [None] * size

    def target(r):
        try:
            out[r] = fn(ThreadComm(r, shared))
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[r] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def make_csr(n_rows, n_cols, nnz, dtype=np.float32, index_dtype=np.int32, seed=0, empty_rows=()):
    rng = np.random.default_rng(seed)
    flat = rng.choice(n_rows * n_cols, size=nnz, replace=False)
    rows, cols = np.divmod(flat, n_cols)
    keep = ~np.isin(rows, list(empty_rows))
    m = sp.csr_matrix((rng.standard_normal(keep.sum()).astype(dtype), (rows[keep], cols[keep])),
                      shape=(n_rows, n_cols))
    m.indices = m.indices.astype(index_dtype)
    m.indptr = m.indptr.astype(index_dtype)
    return m


def make_state():
    empty = sp.csr_matrix((7, 5), dtype=np.float32)
    return {
        "layers/0/W": make_csr(30, 20, 90, empty_rows=(0, 5, 29)),
        "layers/0/b": np.arange(20, dtype=np.float32),
        "layers/1/W": make_csr(20, 10, 40, dtype=np.float64, index_dtype=np.int64, seed=1),
        "layers/2/W": empty,
        "opt/count": np.array([3, -1], dtype=np.int32),
        "opt/momentum/0": np.linspace(0, 1, 90, dtype=np.float32),
        "rng/key": np.array(2**62, dtype=np.int64),
        "flags": np.array([True, False]),
    }


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        if sp.issparse(x):
            assert isinstance(y, sp.csr_matrix), k
            assert y.shape == x.shape and y.data.dtype == x.data.dtype, k
            assert y.indices.dtype == x.indices.dtype and y.indptr.dtype == x.indptr.dtype, k
            np.testing.assert_array_equal(y.data, x.data)
            np.testing.assert_array_equal(y.indices, x.indices)
            np.testing.assert_array_equal(y.indptr, x.indptr)
        else:
            assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape, k
            np.testing.assert_array_equal(y, x)


META = {"epoch": 4, "config": {"model": {"sizes": [30, 20, 10]}, "lr": 0.01}, "rng": {"state": 2**100 + 7}}


def save(run_dir, step, state=None, keep=2, **kw):
    return save_checkpoint(SelfComm(), run_dir, step, make_state() if state is None else state,
                           dict(META, epoch=step), keep=keep, **kw)


def shard_of(path):
    return next(Path(path).glob("shard-*.h5"))


def flip_byte(file, where=0.5):
    data = bytearray(file.read_bytes())
    pos = int(len(data) * where)
    data[pos] ^= 0xFF
    file.write_bytes(bytes(data))


# ---------------------------------------------------------------- pure helpers


def test_assign_keys_is_disjoint_balanced_and_deterministic():
    sizes = {"a": 100, "b": 90, "c": 50, "d": 40, "e": 10, "f": 0}
    parts = fmt.assign_keys(sizes, 3)
    assert sorted(k for p in parts for k in p) == sorted(sizes)
    loads = [sum(sizes[k] for k in p) for p in parts]
    assert max(loads) - min(loads) <= 60
    assert parts == fmt.assign_keys(dict(reversed(sizes.items())), 3)
    assert fmt.assign_keys(sizes, 1) == [sorted(sizes)]
    assert fmt.assign_keys({"x": 5}, 3) == [["x"], [], []]


def test_folder_names():
    assert fmt.step_dir_name(123) == "step-000000123"
    assert fmt.parse_step_dir("step-000000123") == 123
    assert fmt.parse_step_dir(".tmp-step-000000123") is None
    assert fmt.parse_step_dir("step-12") is None
    assert fmt.shard_file_name(2, 4) == "shard-00002-of-00004.h5"
    assert checkpoint_dir("run") == Path("run/checkpoints")


# ---------------------------------------------------------------- round trips


def test_round_trip_dense_and_csr(tmp_path):
    state = make_state()
    path = save(tmp_path, 12, state, rank_state={"rng/bitgen": np.arange(4, dtype=np.uint64)})
    assert path == tmp_path / "checkpoints" / "step-000000012"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "shard-00000-of-00001.h5"]
    loaded, manifest, rank_state = load_checkpoint(path, rank=0)
    assert_same(state, loaded)
    assert loaded["layers/2/W"].nnz == 0
    assert rank_state.keys() == {"rng/bitgen"} and rank_state["rng/bitgen"].dtype == np.uint64
    assert manifest["schema_version"] == SCHEMA_VERSION == 3
    assert manifest["shards"][0]["rank_state"] == {"rng/bitgen": {"kind": "dense", "shape": [4], "dtype": "<u8"}}
    assert manifest["step"] == 12 and manifest["epoch"] == 12 and manifest["n_ranks"] == 1
    assert manifest["meta"]["config"] == META["config"] and manifest["meta"]["rng"]["state"] == 2**100 + 7
    assert manifest["arrays"]["layers/0/W"] == {"kind": "csr", "shape": [30, 20], "dtype": "<f4",
                                                "index_dtype": "<i4", "nnz": state["layers/0/W"].nnz, "shard": 0}
    assert manifest["arrays"]["rng/key"]["shape"] == []
    assert set(manifest["versions"]) >= {"hpc_sparse", "numpy", "scipy", "h5py", "python"}
    shard = manifest["shards"][0]
    assert shard["bytes"] == (path / shard["file"]).stat().st_size and len(shard["sha256"]) == 64
    assert load_checkpoint(path)[2] is None  # rank None -> no rank state
    assert load_checkpoint(path, rank=3)[2] is None  # a rank the saving run did not have


def test_round_trip_of_large_arrays_written_directly(tmp_path):
    """Arrays >= 1 MiB take the pwrite-into-reserved-extent path; the checksum must still match."""
    rng = np.random.default_rng(3)
    big = rng.standard_normal((700, 800))
    state = {
        "W": make_csr(600, 1000, 300_000, seed=2),
        "strided": big[:, ::2],  # not contiguous
        "big_endian": rng.standard_normal(300_000).astype(">f4"),
        "counts": rng.integers(0, 9, 400_000, dtype=np.uint8),
        "small": np.ones(3, dtype=np.float16),
    }
    own = {"big": np.arange(300_000, dtype=np.int64), "model/W": make_csr(600, 1000, 300_000, seed=4),
           "model/b": rng.standard_normal(1000).astype(np.float32)}
    direct = []
    real = fmt._pwrite_all
    fmt._pwrite_all = lambda fd, data, offset: direct.append(data.nbytes) or real(fd, data, offset)
    try:
        path = save(tmp_path, 2, state, rank_state=own)
    finally:
        fmt._pwrite_all = real
    loaded, manifest, rank_state = load_checkpoint(path, rank=0)
    assert_same(state, loaded)
    assert_same(own, rank_state)  # per-rank state: CSR as a CSR, large arrays by the same path
    assert 300_000 * 8 in direct and own["model/W"].data.nbytes in direct
    assert manifest["shards"][0]["rank_state"]["model/W"] == {
        "kind": "csr", "shape": [600, 1000], "dtype": "<f4", "index_dtype": "<i4", "nnz": own["model/W"].nnz}
    shard = path / "shard-00000-of-00001.h5"
    assert fmt.sha256_file(shard) == manifest["shards"][0]["sha256"]


def test_round_trip_with_real_comm_self(tmp_path):
    mpi = pytest.importorskip("mpi4py.MPI")
    state = make_state()
    path = save_checkpoint(mpi.COMM_SELF, tmp_path, 1, state, {"epoch": 0})
    assert_same(state, load_checkpoint(path)[0])


def test_numpy_scalars_in_meta_become_json(tmp_path):
    meta = {"epoch": np.int64(3), "lr": np.float32(0.5)}
    path = save_checkpoint(SelfComm(), tmp_path, 0, {"w": np.ones(2)}, meta)
    manifest = load_checkpoint(path)[1]
    assert manifest["epoch"] == 3 and manifest["meta"]["lr"] == 0.5


def test_multi_rank_save_shards_disjointly(tmp_path):
    state = make_state()
    results = run_ranks(3, lambda c: save_checkpoint(c, tmp_path, 5, state, META,
                                                     rank_state={"seed": np.array([c.rank])}))
    assert all(r == tmp_path / "checkpoints" / "step-000000005" for r in results), results
    path = results[0]
    loaded, manifest, _ = load_checkpoint(path)
    assert_same(state, loaded)
    shard_keys = [s["keys"] for s in manifest["shards"]]
    assert sorted(k for keys in shard_keys for k in keys) == sorted(state)
    assert all(keys for keys in shard_keys)  # 8 keys over 3 ranks: nobody idle
    for r in range(3):
        assert load_checkpoint(path, rank=r)[2]["seed"].tolist() == [r]


def test_existing_step_is_replaced_and_the_old_copy_kept_renamed(tmp_path):
    save(tmp_path, 7, {"w": np.zeros(3)})
    path = save(tmp_path, 7, {"w": np.ones(3)})
    assert load_checkpoint(path)[0]["w"].tolist() == [1, 1, 1]
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert names[0] == "step-000000007" and len(names) == 2
    assert names[1].startswith("step-000000007.replaced-")  # ignored by discovery, never deleted
    assert load_checkpoint(checkpoint_dir(tmp_path) / names[1])[0]["w"].tolist() == [0, 0, 0]
    assert find_latest_valid(tmp_path)[0] == path


def test_corrupt_step_reached_again_is_kept_renamed_invalid(tmp_path):
    """Issue 11, defect 6: a corrupt step-N that a run saves again is set aside as
    step-N.invalid-<time>, byte for byte, not deleted."""
    old = save(tmp_path, 7, {"w": np.zeros(3)})
    flip_byte(shard_of(old))
    damaged = {p.name: p.read_bytes() for p in old.iterdir()}
    save(tmp_path, 7, {"w": np.ones(3)})
    kept = [p for p in checkpoint_dir(tmp_path).iterdir() if p.name.startswith("step-000000007.invalid-")]
    assert len(kept) == 1
    assert {p.name: p.read_bytes() for p in kept[0].iterdir()} == damaged


# ---------------------------------------------------------------- damaged checkpoints


def test_checksum_mismatch(tmp_path):
    path = save(tmp_path, 1)
    flip_byte(shard_of(path))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_truncated_shard(tmp_path):
    path = save(tmp_path, 1)
    shard = shard_of(path)
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(path)


def test_missing_manifest(tmp_path):
    path = save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(path)


def test_unparsable_manifest(tmp_path):
    path = save(tmp_path, 1)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be parsed"):
        load_checkpoint(path)


def test_missing_shard(tmp_path):
    path = run_ranks(2, lambda c: save_checkpoint(c, tmp_path, 1, make_state(), META))[0]
    (path / "shard-00001-of-00002.h5").unlink()
    with pytest.raises(CheckpointError, match="shard shard-00001-of-00002.h5 is missing"):
        load_checkpoint(path)


def test_unsupported_schema_version(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="schema_version 99 is not supported"):
        load_checkpoint(path)


def test_manifest_shape_lie_is_caught(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["arrays"]["layers/0/b"]["shape"] = [21]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest says"):
        load_checkpoint(path)


def test_half_written_tmp_folder_is_ignored(tmp_path):
    good = save(tmp_path, 1)
    tmp = checkpoint_dir(tmp_path) / ".tmp-step-000000002"
    tmp.mkdir()
    (tmp / "shard-00000-of-00001.h5").write_bytes(b"partial")
    assert find_latest_valid(tmp_path) == (good, [])
    assert [row["step"] for row in list_checkpoints(tmp_path)] == [1]
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(tmp)


def test_failed_load_modifies_nothing(tmp_path):
    path = save(tmp_path, 1)
    flip_byte(shard_of(path))
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()}
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()} == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "schema"])
def test_error_messages_name_path_and_fix(tmp_path, damage):
    path = save(tmp_path, 1)
    shard = shard_of(path)
    if damage == "flip":
        flip_byte(shard)
    elif damage == "truncate":
        os.truncate(shard, 10)
    elif damage == "manifest":
        (path / "manifest.json").unlink()
    else:
        (path / "manifest.json").write_text(json.dumps({"schema_version": 2}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert f"checkpoint {path} is invalid:" in message and "; fix: " in message and "\n" not in message


# ---------------------------------------------------------------- discovery and retention


def test_keep_k_retention(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep=2)
    ckdir = checkpoint_dir(tmp_path)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-000000004", "step-000000005"]


def test_corrupt_newer_checkpoint_does_not_cost_the_good_older_one(tmp_path):
    for step in (1, 2):
        save(tmp_path, step, keep=2)
    flip_byte(shard_of(checkpoint_dir(tmp_path) / "step-000000002"))
    save(tmp_path, 3, keep=2)  # step 2 is invalid, so step 1 is still one of the 2 kept
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert names == ["step-000000001", "step-000000002", "step-000000003"]
    save(tmp_path, 4, keep=2)  # now 4 and 3 are valid; 2 and 1 are older than both
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["step-000000003", "step-000000004"]


def test_retention_leaves_foreign_and_newer_entries_alone(tmp_path):
    ckdir = checkpoint_dir(tmp_path)
    save(tmp_path, 1, keep=1)
    save(tmp_path, 9, keep=1)
    for name in (".tmp-step-000000000", "step-abc", "notes"):
        (ckdir / name).mkdir()
    (ckdir / "step-000000000.txt").write_text("x")
    save(tmp_path, 5, keep=1)  # a resumed run saving below an existing newer step
    names = sorted(p.name for p in ckdir.iterdir())
    assert names == [".tmp-step-000000000", "notes", "step-000000000.txt", "step-000000005",
                     "step-000000009", "step-abc"]


def test_find_latest_valid_skips_corrupt_newest(tmp_path):
    assert find_latest_valid(tmp_path) == (None, [])
    for step in (1, 2, 3):
        save(tmp_path, step, keep=5)
    ckdir = checkpoint_dir(tmp_path)
    flip_byte(shard_of(ckdir / "step-000000003"))
    (ckdir / "step-000000002" / "manifest.json").unlink()
    latest, skipped = find_latest_valid(tmp_path)
    assert latest == ckdir / "step-000000001"
    assert [p.name for p, _ in skipped] == ["step-000000003", "step-000000002"]
    assert "SHA-256" in skipped[0][1] and "manifest.json is missing" in skipped[1][1]


def test_folder_renamed_to_another_step_is_invalid(tmp_path):
    save(tmp_path, 1)
    ckdir = checkpoint_dir(tmp_path)
    (ckdir / "step-000000001").rename(ckdir / "step-000000002")
    latest, skipped = find_latest_valid(tmp_path)
    assert latest is None and "manifest says step 1 but the folder is step 2" in skipped[0][1]


def test_list_checkpoints_reports_validity(tmp_path):
    for step in (1, 2):
        save(tmp_path, step, keep=5)
    os.truncate(shard_of(checkpoint_dir(tmp_path) / "step-000000002"), 100)
    rows = list_checkpoints(tmp_path)
    assert [(r["step"], r["epoch"], r["n_ranks"], r["valid"]) for r in rows] == [(1, 1, 1, True), (2, 2, 1, False)]
    assert rows[0]["reason"] == "" and "truncated" in rows[1]["reason"]
    assert rows[0]["bytes"] > 0 and rows[1]["bytes"] < rows[0]["bytes"]


# ---------------------------------------------------------------- refused saves


@pytest.mark.parametrize("state, meta, match", [
    ({"a": np.zeros(2), "a/b": np.zeros(2)}, {}, "prefix"),
    ({"": np.zeros(2)}, {}, "not a valid path"),
    ({"a//b": np.zeros(2)}, {}, "empty"),
    ({"w": np.array(["x"])}, {}, "non-numeric"),
    ({"w": [1, 2]}, {}, "numpy array"),
    ({"w": np.zeros(2)}, {"bad": object()}, "JSON"),
])
def test_bad_input_is_refused_and_nothing_is_left(tmp_path, state, meta, match):
    with pytest.raises(CheckpointError, match=match) as info:
        save_checkpoint(SelfComm(), tmp_path, 3, state, meta)
    assert "fix:" in str(info.value)
    assert not checkpoint_dir(tmp_path).exists() or list(checkpoint_dir(tmp_path).iterdir()) == []


def test_failure_on_one_rank_aborts_the_save_everywhere(tmp_path, monkeypatch):
    save(tmp_path, 1)
    real = fmt.write_shard

    def failing(path, state, keys, rank_state, attrs):
        if attrs["rank"] == 1:
            raise OSError(28, "No space left on device")
        return real(path, state, keys, rank_state, attrs)

    monkeypatch.setattr(fmt, "write_shard", failing)
    results = run_ranks(3, lambda c: save_checkpoint(c, tmp_path, 2, make_state(), META, keep=1))
    for exc in results:
        assert isinstance(exc, CheckpointError), exc
        assert "failed on rank 1" in str(exc) and "No space left" in str(exc) and "fix:" in str(exc)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["step-000000001"]


def test_a_rank_passing_other_meta_aborts_the_save_everywhere(tmp_path):
    """Every rank must pass the same meta (rank 0's is written); a rank whose meta differs
    (as WASAP-SGD's workers' once did) is a bug that nothing may commit silently."""
    def body(c):
        meta = {**META, "history": [] if c.rank == 2 else [{"epoch": 1}]}
        return save_checkpoint(c, tmp_path, 1, make_state(), meta)

    results = run_ranks(3, body)
    for exc in results:
        assert isinstance(exc, CheckpointError), exc
        assert "failed on rank 2" in str(exc) and "differs from rank 0's in history" in str(exc)
    assert not checkpoint_dir(tmp_path).exists() or list(checkpoint_dir(tmp_path).iterdir()) == []


def test_bad_rank_state_on_one_rank_aborts_everywhere(tmp_path):
    def body(c):
        rank_state = {"x": np.array(["s"])} if c.rank == 2 else {"x": np.zeros(1)}
        return save_checkpoint(c, tmp_path, 1, make_state(), META, rank_state=rank_state)

    results = run_ranks(3, body)
    assert all(isinstance(e, CheckpointError) and "failed on rank 2" in str(e) for e in results), results
    assert list(checkpoint_dir(tmp_path).iterdir()) == []


@pytest.mark.parametrize("codec", ["lzf", "gzip"])
def test_round_trip_with_index_compression(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(fmt, "INDEX_COMPRESSION", codec)
    state = make_state() | {"big": make_csr(600, 1000, 300_000, seed=5)}
    assert_same(state, load_checkpoint(save(tmp_path, 1, state))[0])
