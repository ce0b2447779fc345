"""The dataset cache (hpc_sparse.data.cache): what identifies an entry, torn and outdated
entries never used, concurrent builders, where the cache goes, and exact resume whether the
cache was rebuilt or mapped."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from hpc_sparse.config import load_config
from hpc_sparse.data import cache, load_dataset
from hpc_sparse.data.cache import Entry, choose_folder, user_cache_folder
from hpc_sparse.data.recipes import make_recipe
from hpc_sparse.errors import UserError


def write_xy(folder: Path, n: int = 40, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.npz", n), ("test.npz", n // 4)):
        np.savez(folder / name, X=rng.standard_normal((rows, 6)) * 3 + 1, y=rng.integers(0, 3, rows))
    return folder / "train.npz", folder / "test.npz"


def load(train: Path, test: Path, cache_dir: Path | str, preprocess: str = "auto"):
    return load_dataset("file", str(train), str(test), preprocess, cache_dir=str(cache_dir))


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_mapped_entry_equals_the_load_without_a_cache(tmp_path):
    train, test = write_xy(tmp_path / "data")
    off = load(train, test, "off")
    assert off.notes[0].startswith("data cache: off") and off.x_train.flags.writeable
    first = load(train, test, "")  # default: beside the source
    assert first.notes[0].startswith(f"data cache: {tmp_path / 'data' / 'hpc_sparse-cache'}/file-")
    assert "(beside the source), built by this process" in first.notes[0]
    second = load(train, test, "")
    assert "already built" in second.notes[0]
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(off, name), getattr(second, name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert not b.flags.writeable and b.flags.c_contiguous
    assert (second.n_classes, second.source) == (off.n_classes, off.source)
    # batches are gathered from the map into ordinary arrays
    x, y = second.train_batch(np.array([3, 1, 4]), seed=0, epoch=0)
    assert x.flags.writeable and np.array_equal(x, off.x_train[[3, 1, 4]])


def test_an_entry_is_identified_by_sources_preprocessing_and_code(tmp_path, monkeypatch):
    train, test = write_xy(tmp_path / "data")
    folder = tmp_path / "cache"
    load(train, test, folder)
    [old] = entries(folder)
    load(train, test, folder, preprocess="none")  # other preprocessing: an entry of its own, both kept
    assert len(entries(folder)) == 2 and old in entries(folder)
    write_xy(tmp_path / "data", seed=1)  # a changed source: a new entry replaces the old one
    os.utime(train, ns=(1, 1))
    changed = load(train, test, folder)
    assert "built by this process" in changed.notes[0] and old not in entries(folder)
    np.testing.assert_allclose(changed.x_train.mean(0), 0, atol=1e-5)
    [now] = [e for e in entries(folder) if e.startswith(old.rsplit("-", 1)[0])]
    monkeypatch.setattr(cache, "code_version", lambda: "another version of the code")
    assert "built by this process" in load(train, test, folder).notes[0]
    assert now not in entries(folder) and len(entries(folder)) == 2


def test_a_torn_or_damaged_entry_is_never_used(tmp_path):
    train, test = write_xy(tmp_path / "data")
    folder = tmp_path / "cache"
    ref = load(train, test, "off")
    load(train, test, folder)
    [name] = entries(folder)
    entry = folder / name
    damages = [
        lambda: (entry / "x_train.npy").write_bytes((entry / "x_train.npy").read_bytes()[:-8]),  # cut short
        lambda: (entry / "y_test.npy").unlink(),
        lambda: (entry / "cache.json").write_text('{"identity": {"format": 1, "da'),  # torn record
        lambda: (entry / "x_test.npy").write_bytes((entry / "x_test.npy").read_bytes() + b"\0" * 8),
    ]
    for damage in damages:
        damage()
        again = load(train, test, folder)
        assert "built by this process" in again.notes[0]
        assert np.array_equal(again.x_test, ref.x_test) and entries(folder) == [name]


def test_dead_builders_leftovers_are_removed_and_live_ones_kept(tmp_path):
    train, test = write_xy(tmp_path / "data")
    folder = tmp_path / "cache"
    folder.mkdir()
    dead = folder / ".tmp-file-00000000-000000000000-0123456789ab"  # a builder killed an hour ago
    dead.mkdir()
    (dead / "x_train.npy").write_bytes(b"partial")
    probe = folder / ".probe-0123456789abcdef"
    probe.write_text("0123456789abcdef")
    for p in (dead / "x_train.npy", dead, probe):
        os.utime(p, (0, 0))
    live = folder / ".tmp-file-00000000-000000000000-ba9876543210"  # a builder still writing
    live.mkdir()
    (live / "x_train.npy").write_bytes(b"partial")
    load(train, test, folder)
    assert not dead.exists() and not probe.exists() and live.exists()
    assert len([e for e in entries(folder) if not e.startswith(".")]) == 1


def _build_in_child(args: tuple[str, str, str]) -> str:
    d = load_dataset("file", args[0], args[1], cache_dir=args[2])
    return f"{float(d.x_train.sum()):.6f}"


def test_concurrent_builders_both_succeed_and_one_entry_stays(tmp_path):
    """Two jobs that find no entry at the same moment both build; the first rename wins, the
    second keeps it (no error, no torn entry, no leftovers)."""
    train, test = write_xy(tmp_path / "data", n=4000)
    folder = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_build_in_child, [(str(train), str(test), str(folder))] * 2)
    assert sums[0] == sums[1]
    assert len(entries(folder)) == 1 and not entries(folder)[0].startswith(".")


def test_where_the_cache_goes(tmp_path, monkeypatch):
    src = tmp_path / "data" / "HIGGS.csv"
    assert choose_folder(str(tmp_path / "mine"), [src]) == (tmp_path / "mine", "data.cache_dir")
    (tmp_path / "data").mkdir()
    assert choose_folder("", [src]) == (tmp_path / "data" / "hpc_sparse-cache", "beside the source")
    # Debian's Fashion-MNIST lives under /usr/share: the package manager's, never written into
    folder, why = choose_folder("", [Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")])
    assert folder == user_cache_folder() and "the source's folder is not writable" in why
    assert choose_folder("", [])[0] == user_cache_folder()  # synthetic: no source file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_folder() == tmp_path / "xdg" / "hpc_sparse"
    monkeypatch.setattr(cache.os, "access", lambda path, mode: False)  # root may write anywhere: pretend not
    assert choose_folder("", [src]) == (tmp_path / "xdg" / "hpc_sparse",
                                        "the user cache folder: the source's folder is not writable")


def test_a_cache_folder_that_cannot_be_created_loads_without_a_cache(tmp_path):
    train, test = write_xy(tmp_path / "data")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    d = load(train, test, blocker / "cache")
    assert d.notes[0].startswith(f"data cache: not used (cannot write the data cache '{blocker / 'cache'}'")
    assert d.x_train.flags.writeable and np.array_equal(d.x_train, load(train, test, "off").x_train)


def test_a_source_that_changes_while_it_is_read_is_refused(tmp_path, monkeypatch):
    train, test = write_xy(tmp_path / "data")
    recipe = make_recipe("file", str(train), str(test))
    build = recipe.build

    def build_then_touch(sink):
        info = build(sink)
        os.utime(train, ns=(5, 5))  # a copy still being written
        return info

    recipe.build = build_then_touch
    with pytest.raises(UserError, match="source files changed while they were read; fix: wait until"):
        Entry(tmp_path / "cache", recipe).build()
    assert entries(tmp_path / "cache") == []


def run(args: list[str], run_dir: Path, resume: str | None = None):
    from hpc_sparse.parallel import comm as pc
    from hpc_sparse.train import Trainer

    t = Trainer(load_config(None, args), pc.self_comm(), run_dir, quiet=True)
    t.run(resume)
    return json.loads((run_dir / "summary.json").read_text())["model_sha256"], t.data.notes[0]


def test_resume_is_exact_whether_the_cache_was_rebuilt_or_mapped(tmp_path):
    cache_dir = tmp_path / "cache"
    args = ["data.n_train=300", "data.n_test=100", "data.n_features=30", "data.n_informative=6",
            "model.layers=[30,24,4]", "model.epsilon=3", "train.epochs=3", "train.batch_size=16",
            "train.threads=1", "importance.enabled=false", f"data.cache_dir={cache_dir}"]
    reference, note = run(args, tmp_path / "full")
    assert "built by this process" in note
    run([*args, "train.max_steps=25"], tmp_path / "cut")  # stops in epoch 2 (19 steps per epoch)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")
    mapped, note = run(args, tmp_path / "cut", resume="auto")
    assert "already built" in note
    shutil.rmtree(cache_dir)
    rebuilt, note = run(args, tmp_path / "cut2", resume="auto")
    assert "built by this process" in note
    assert mapped == rebuilt == reference
    off, _ = run([*args[:-1], "data.cache_dir=off"], tmp_path / "off")
    assert off == reference


def test_config_key_reaches_the_loader(tmp_path):
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'c'}"])
    d = load_dataset(**asdict(cfg.data))
    assert d.notes[0].startswith(f"data cache: {tmp_path / 'c'}/synthetic-") and "(data.cache_dir)" in d.notes[0]
