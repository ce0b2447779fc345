"""A checkpoint is untrusted input (issue 18, defects 2-5 and 8): crafted shards and manifests,
errors of the environment, the order of hashing and parsing, retention off the critical path.

Every crafted shard gets a manifest whose SHA-256 and size match it, as an attacker (or a
colleague's broken tool) would write it: the hash alone cannot catch any of these.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_sparse.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_latest_valid,
    list_checkpoints,
    load_agreed,
    load_checkpoint,
    save_checkpoint,
)
from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.checkpoint import manager
from hpc_sparse.errors import UserError
from test_checkpoint import META, SelfComm, make_state, run_ranks, save, shard_of

ROOT = Path(__file__).resolve().parents[1]


def rehash(ckpt: Path) -> None:
    """Make the manifest's sizes and SHA-256 match the (crafted) shards again."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = ckpt / shard["file"]
        shard["bytes"], shard["sha256"] = path.stat().st_size, fmt.sha256_file(path)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(ckpt: Path, change) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    change(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def craft(tmp_path: Path, edit) -> Path:
    """A one-shard checkpoint whose shard ``edit(h5py.File)`` changed, with a matching manifest."""
    path = save(tmp_path, 1)
    with h5py.File(shard_of(path), "r+") as f:
        edit(f)
    rehash(path)
    return path


def refused(path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, rank=0)
    text = str(info.value)
    assert f"checkpoint {path} is invalid" in text and "fix:" in text and "\n" not in text, text
    for word in words:
        assert word in text, text
    return text


# ---------------------------------------------------------------- defect 3: what a shard may contain

BIAS = "state/layers/0/b"  # float32 (20,)


def test_a_soft_link_is_refused(tmp_path):
    def edit(f):
        f.create_dataset("elsewhere", data=np.full(20, 7, np.float32))
        del f[BIAS]
        f[BIAS] = h5py.SoftLink("/elsewhere")

    refused(craft(tmp_path, edit), "layers/0/b", "SoftLink")


def test_an_external_link_is_refused_and_the_other_file_never_read(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as g:
        g.create_dataset("x", data=np.full(20, 7, np.float32))

    def edit(f):
        del f[BIAS]
        f[BIAS] = h5py.ExternalLink(str(other), "/x")

    refused(craft(tmp_path / "run", edit), "layers/0/b", "ExternalLink")


def test_external_raw_storage_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    np.full(20, 7, np.float32).tofile(secret)

    def edit(f):
        del f[BIAS]
        f.create_dataset(BIAS, shape=(20,), dtype="<f4", external=[(str(secret), 0, 80)])

    refused(craft(tmp_path / "run", edit), "layers/0/b", "external")


def test_external_storage_on_a_fifo_fails_at_once_instead_of_hanging(tmp_path):
    """Pointed at a FIFO, the load used to block in open() until killed (a batch job would sit
    there until its wall time). Run in a subprocess, so that the old behaviour fails the test."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def edit(f):
        del f[BIAS]
        f.create_dataset(BIAS, shape=(20,), dtype="<f4", external=[(str(fifo), 0, 80)])

    path = craft(tmp_path / "run", edit)
    code = ("import sys; from hpc_sparse.checkpoint import load_checkpoint, CheckpointError\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a shard whose dataset reads a FIFO blocked")
    assert "external" in proc.stdout and "is invalid" in proc.stdout, proc.stdout + proc.stderr


def test_a_virtual_dataset_is_refused(tmp_path):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as g:
        g.create_dataset("x", data=np.full(20, 7, np.float32))

    def edit(f):
        del f[BIAS]
        layout = h5py.VirtualLayout(shape=(20,), dtype="<f4")
        layout[:] = h5py.VirtualSource(str(source), "x", shape=(20,))
        f.create_virtual_dataset(BIAS, layout)

    refused(craft(tmp_path / "run", edit), "layers/0/b", "virtual")


def test_a_filter_this_package_never_writes_is_refused(tmp_path):
    def edit(f):
        data = f[BIAS][()]
        del f[BIAS]
        f.create_dataset(BIAS, data=data, chunks=(10,), fletcher32=True)

    refused(craft(tmp_path, edit), "layers/0/b", "filter")


def test_a_huge_declared_dataset_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    """2.7 KB of shard used to declare 8 GiB and be read whole before its shape was compared;
    now shape and dtype are compared with the manifest, and the stored bytes with the file,
    before any read. (Reads are trapped here, so the old code fails without allocating 8 GiB.)"""
    def edit(f):
        del f[BIAS]
        f.create_dataset(BIAS, shape=(2 ** 30,), dtype="<f8", chunks=(1 << 20,))  # no chunk written

    path = craft(tmp_path, edit)
    edit_manifest(path, lambda m: m["arrays"]["layers/0/b"].update(shape=[2 ** 30], dtype="<f8"))
    assert shard_of(path).stat().st_size < 100_000
    reads = []
    real = h5py.Dataset.__getitem__

    def trapped(self, args, *rest, **kw):
        if self.size > 10 ** 6:
            reads.append(self.name)
            raise RuntimeError(f"read {self.name} of {self.size} elements")
        return real(self, args, *rest, **kw)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", trapped)
    monkeypatch.setattr(h5py.Dataset, "read_direct", lambda self, *a, **k: trapped(self, ()))
    refused(path, "layers/0/b", "stored")
    assert reads == []


def test_shape_and_dtype_are_compared_before_reading(tmp_path, monkeypatch):
    def edit(f):
        del f[BIAS]
        f.create_dataset(BIAS, data=np.zeros(5_000_000, np.float32))

    path = craft(tmp_path, edit)
    opened = []
    real = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, *a, **k: opened.append(self.name) or real(self, *a, **k))
    refused(path, "layers/0/b", "manifest says")
    assert "/" + BIAS not in opened


def test_rank_state_arrays_have_a_spec_in_the_manifest(tmp_path):
    path = save(tmp_path, 1, rank_state={"rng/bitgen": np.arange(4, dtype=np.uint64)})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["shards"][0]["rank_state"] == {"rng/bitgen": {"kind": "dense", "shape": [4], "dtype": "<u8"}}
    with h5py.File(shard_of(path), "r+") as f:  # the shard now holds more than its spec says
        del f["rank_state/rng/bitgen"]
        f.create_dataset("rank_state/rng/bitgen", data=np.arange(10 ** 6, dtype=np.uint64))
    rehash(path)
    refused(path, "rng/bitgen", "manifest says")


def test_rank_state_links_are_refused(tmp_path):
    path = save(tmp_path, 1, rank_state={"rng/bitgen": np.arange(4, dtype=np.uint64)})
    with h5py.File(shard_of(path), "r+") as f:
        f.create_dataset("hidden", data=np.arange(4, dtype=np.uint64))
        del f["rank_state/rng/bitgen"]
        f["rank_state/rng/bitgen"] = h5py.SoftLink("/hidden")
    rehash(path)
    refused(path, "rng/bitgen", "SoftLink")


def test_a_schema_2_checkpoint_still_loads_with_its_rank_state_checked(tmp_path):
    path = save(tmp_path, 1, rank_state={"rng/bitgen": np.arange(4, dtype=np.uint64)})

    def to_schema_2(manifest):  # schema 2 described per-rank arrays without their kind
        manifest["schema_version"] = 2
        for shard in manifest["shards"]:
            for spec in shard.get("rank_state", {}).values():
                del spec["kind"]

    edit_manifest(path, to_schema_2)
    assert load_checkpoint(path, rank=0)[2]["rng/bitgen"].tolist() == [0, 1, 2, 3]
    edit_manifest(path, lambda m: m["shards"][0]["rank_state"]["rng/bitgen"].update(shape=[5]))
    refused(path, "rng/bitgen", "manifest says")


def test_a_schema_1_checkpoint_still_loads_and_its_rank_state_is_checked(tmp_path):
    path = save(tmp_path, 1, rank_state={"rng/bitgen": np.arange(4, dtype=np.uint64)})

    def to_schema_1(manifest):
        manifest["schema_version"] = 1
        for shard in manifest["shards"]:
            shard.pop("rank_state", None)

    edit_manifest(path, to_schema_1)
    assert load_checkpoint(path, rank=0)[2]["rng/bitgen"].tolist() == [0, 1, 2, 3]
    with h5py.File(shard_of(path), "r+") as f:
        f.create_dataset("hidden", data=np.arange(4, dtype=np.uint64))
        f["rank_state/more"] = h5py.SoftLink("/hidden")
    rehash(path)
    refused(path, "more", "SoftLink")


def test_a_symlinked_shard_is_refused(tmp_path):
    path = save(tmp_path, 1)
    shard = shard_of(path)
    moved = tmp_path / "elsewhere.h5"
    shard.rename(moved)
    shard.symlink_to(moved)
    refused(path, "symbolic link")


def test_crafted_checkpoints_are_skipped_by_discovery_not_fatal(tmp_path):
    def edit(f):
        f.create_dataset("elsewhere", data=np.full(20, 7, np.float32))
        del f[BIAS]
        f[BIAS] = h5py.SoftLink("/elsewhere")

    good = save(tmp_path, 1, keep=5)
    bad = save(tmp_path, 2, keep=5)
    with h5py.File(shard_of(bad), "r+") as f:
        edit(f)
    rehash(bad)
    latest, skipped = find_latest_valid(tmp_path)
    assert latest == good and [p for p, _ in skipped] == [bad]


# ---------------------------------------------------------------- defect 5: malformed manifests


@pytest.mark.parametrize("damage", [
    lambda m: m["shards"][0].update(file=["shard-00000-of-00001.h5"]),
    lambda m: m["shards"][0].update(keys=[["layers/0/W"]]),
    lambda m: m["shards"][0].update(bytes="12"),
    lambda m: m["shards"][0].update(sha256=None),
    lambda m: m["arrays"]["layers/0/b"].update(shape="20"),
    lambda m: m["arrays"]["layers/0/b"].update(shape=[-1]),
    lambda m: m["arrays"]["layers/0/b"].update(dtype="O"),
    lambda m: m["arrays"]["layers/0/b"].update(dtype=["<f4"]),
    lambda m: m["arrays"]["layers/0/W"].update(nnz="many"),
    lambda m: m["arrays"]["layers/0/W"].update(index_dtype="<f8"),
    lambda m: m["arrays"]["layers/0/b"].update(shard=True),
    lambda m: m.update(step=True),
    lambda m: m.update(epoch={"a": 1}),
    lambda m: m["arrays"].update({"../x": m["arrays"]["layers/0/b"]}),
], ids=["file-list", "key-list", "bytes-str", "sha-none", "shape-str", "shape-negative", "dtype-object",
        "dtype-list", "nnz-str", "index-float", "shard-bool", "step-bool", "epoch-dict", "key-dotdot"])
def test_a_malformed_manifest_is_an_invalid_checkpoint(tmp_path, damage):
    path = save(tmp_path, 1)
    edit_manifest(path, damage)
    refused(path, "manifest")


def test_a_deeply_nested_manifest_is_an_invalid_checkpoint(tmp_path):
    path = save(tmp_path, 1)
    text = (path / "manifest.json").read_text()
    depth = 200_000
    (path / "manifest.json").write_text(text[:-2] + ', "junk": ' + "[" * depth + "]" * depth + "}\n")
    refused(path, "manifest")


def test_an_oversized_manifest_is_refused_unread(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["meta"]["padding"] = "x" * (fmt.MANIFEST_MAX_BYTES + 1)
    (path / "manifest.json").write_text(json.dumps(manifest))
    refused(path, "bytes")


def test_malformed_manifests_do_not_break_info_saves_or_retention(tmp_path):
    """The structural error used to escape retention on rank 0 after a commit, and `info`
    (whose CLI is tested on a malformed manifest in tests/test_run_dir.py)."""
    save(tmp_path, 1, keep=2)
    bad = save(tmp_path, 2, keep=2)
    edit_manifest(bad, lambda m: m["shards"][0].update(keys=[["layers/0/W"]]))
    rows = list_checkpoints(tmp_path)
    assert [(r["step"], r["valid"]) for r in rows] == [(1, True), (2, False)]
    save(tmp_path, 3, keep=2)  # retention looks at step 2 and must not crash
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert names == ["step-000000001", "step-000000002", "step-000000003"]  # invalid 2 kept, 1 counted


# ---------------------------------------------------------------- defect 2: environment, not content


def eio_on(target: Path):
    real = fmt.sha256_file

    def failing(path):
        if Path(path) == target:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    return failing


def test_an_environment_error_is_not_a_verdict_on_the_checkpoint(tmp_path, monkeypatch):
    path = save(tmp_path, 1)
    shard = shard_of(path)
    monkeypatch.setattr(fmt, "sha256_file", eio_on(shard))
    with pytest.raises(UserError) as info:
        load_agreed(SelfComm(), path)
    exc = info.value
    assert not isinstance(exc, CheckpointError), "an I/O error must not count as an invalid checkpoint"
    text = str(exc)
    assert str(shard) in text and "EIO" in text and "errno 5" in text.lower() and "fix:" in text, text
    assert exc.every_rank


@pytest.mark.parametrize("error", [MemoryError(), OSError(errno.ESTALE, "Stale file handle"),
                                   OSError(errno.EACCES, "Permission denied"),
                                   BlockingIOError(errno.EAGAIN, "unable to lock file")])
def test_environment_errors_while_parsing_stop_the_load(tmp_path, monkeypatch, error):
    path = save(tmp_path, 1)

    class Failing:
        def __init__(self, *a, **k):
            raise error

    monkeypatch.setattr(h5py, "File", Failing)
    with pytest.raises(UserError) as info:
        load_agreed(SelfComm(), path)
    assert not isinstance(info.value, CheckpointError) and str(shard_of(path)) in str(info.value)


def test_choose_and_load_never_skips_a_checkpoint_it_could_not_read(tmp_path, monkeypatch):
    from hpc_sparse.checkpoint import choose_and_load

    save(tmp_path, 1, keep=5)
    newest = save(tmp_path, 2, keep=5)
    monkeypatch.setattr(fmt, "sha256_file", eio_on(shard_of(newest)))
    with pytest.raises(UserError, match="EIO"):
        choose_and_load(SelfComm(), tmp_path, "auto")


def test_an_hdf5_lock_held_elsewhere_is_an_environment_error(tmp_path):
    """A real HDF5 file-locking failure: another process holds the lock HDF5 takes for writing
    (flock, as HDF5 does; opening the file with h5py in "r+" mode would rewrite its superblock)."""
    path = save(tmp_path, 1)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('open', flush=True); time.sleep(60)",
                               str(shard_of(path))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(UserError) as info:
            load_agreed(SelfComm(), path)
        assert not isinstance(info.value, CheckpointError) and "EAGAIN" in str(info.value), str(info.value)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- defect 4: hash verdicts before parsing


def test_no_rank_parses_a_shard_whose_hash_failed(tmp_path, monkeypatch):
    """Shard 1's HDF5 metadata is damaged (size kept): the rank that hashes it finds out, and
    no rank may hand those bytes to HDF5's parser before the verdicts are exchanged."""
    path = run_ranks(2, lambda c: save_checkpoint(c, tmp_path, 1, make_state(), META))[0]
    damaged = path / "shard-00001-of-00002.h5"
    raw = bytearray(damaged.read_bytes())
    for i in range(64, 96):  # inside the superblock / root group header
        raw[i] ^= 0x5A
    damaged.write_bytes(bytes(raw))
    opened, lock = [], threading.Lock()
    real = h5py.File

    def recording(name, *a, **k):
        with lock:
            opened.append(Path(name).name)
        return real(name, *a, **k)

    monkeypatch.setattr(h5py, "File", recording)
    results = run_ranks(2, lambda c: load_agreed(c, path))
    assert all(isinstance(r, CheckpointError) and "SHA-256" in str(r) for r in results), results
    assert damaged.name not in opened


# ---------------------------------------------------------------- defect 8: retention off the critical path


def test_retention_runs_after_the_other_ranks_are_released(tmp_path, monkeypatch):
    for step in (1, 2):
        run_ranks(2, lambda c, s=step: save_checkpoint(c, tmp_path, s, make_state(), META, keep=2))
    released = threading.Event()
    seen = []
    real = manager._apply_retention

    def slow_retention(*args, **kwargs):
        seen.append(released.wait(timeout=10))  # rank 1 must be out of save_checkpoint by now
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "_apply_retention", slow_retention)

    def body(c):
        out = save_checkpoint(c, tmp_path, 3, make_state(), META, keep=2)
        if c.rank == 1:
            released.set()
        return out

    results = run_ranks(2, body)
    assert all(isinstance(r, Path) for r in results), results
    assert seen == [True]
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["step-000000002", "step-000000003"]


def test_retention_does_not_rehash_what_this_process_wrote(tmp_path, monkeypatch):
    calls = []
    real = fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda p: calls.append(Path(p)) or real(p))
    for step in range(1, 6):
        save(tmp_path, step, keep=3)
    assert calls == []
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == [
        "step-000000003", "step-000000004", "step-000000005"]


def test_retention_rehashes_a_checkpoint_changed_since_this_process_wrote_it(tmp_path):
    for step in (1, 2):
        save(tmp_path, step, keep=2)
    raw = bytearray(shard_of(checkpoint_dir(tmp_path) / "step-000000002").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard_of(checkpoint_dir(tmp_path) / "step-000000002").write_bytes(bytes(raw))
    save(tmp_path, 3, keep=2)  # 2 is damaged now: it does not count, so 1 is kept too
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == [
        "step-000000001", "step-000000002", "step-000000003"]
