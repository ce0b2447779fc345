"""Synchronous data-parallel training; holds at any communicator size.

Run with plain ``pytest`` (one rank) and under
``mpiexec -n 2|3 python -m mpi4py -m pytest tests/mpi/test_sync_mpi.py``. Collectives run
unconditionally on every rank before any assertion, so a failure cannot hang the others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from helpers import run_with_stop  # noqa: E402
from hpc_sparse.config import load_config  # noqa: E402
from hpc_sparse.data import batch_indices, epoch_permutation, load_dataset, steps_per_epoch  # noqa: E402
from hpc_sparse.model_builder import build_model  # noqa: E402
from hpc_sparse.parallel import comm as pc  # noqa: E402
from hpc_sparse.sparse import SGD  # noqa: E402
from hpc_sparse.train import Trainer  # noqa: E402

BASE = ["data.n_train=600", "data.n_test=300", "data.n_features=60", "data.n_informative=10",
        "model.layers=[60,40,30,4]", "model.epsilon=4", "train.batch_size=20", "train.epochs=3",
        "train.lr=0.05", "train.threads=1", "checkpoint.at_end=false"]


def train(comm, run_dir: Path, overrides: list[str]) -> Trainer:
    cfg = load_config(None, BASE + overrides)
    t = Trainer(cfg, comm, run_dir, quiet=True)
    assert t.run() == 0
    return t


def gathered(comm, value: str) -> list[str]:
    return comm.allgather(value)


def test_same_seed_same_model(comm, run_dir):
    a = train(comm, run_dir / "a", [])
    b = train(comm, run_dir / "b", [])
    ha, hb = gathered(comm, a.model.sha256()), gathered(comm, b.model.sha256())
    assert ha[0] == hb[0]
    assert len(set(ha)) == 1
    if comm.rank == 0:
        s = json.loads((run_dir / "a" / "summary.json").read_text())
        assert s["model_sha256"] == ha[0] and s["ranks"] == comm.size


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_replicas_identical_after_evolution_and_pruning(comm, run_dir, growth):
    t = train(comm, run_dir / growth, [f"topology.growth=\"{growth}\"", "importance.enabled=true",
                                          "importance.start_epoch=0", "importance.every=1",
                                          "model.dropout=0.3", "parallel.sync_every=3"])
    # right after the final sync every rank holds bit-identical topology and weights
    hashes = gathered(comm, t.model.sha256())
    vel = gathered(comm, hashlib.sha256(b"".join(a.tobytes() for a in t.model.parameter_arrays())).hexdigest())
    assert len(set(hashes)) == 1 and len(set(vel)) == 1
    assert t.model.widths[1] < 40  # pruning happened (identically everywhere)


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_replicas_identical_with_the_papers_emptying(comm, run_dir, growth):
    """importance.mode='empty': every rank empties the same columns and regrows the same
    connections; the widths stay, the nnz falls by what was emptied (SET and RigL regrow only
    what they pruned)."""
    t = train(comm, run_dir / growth, [f"topology.growth=\"{growth}\"", "importance.enabled=true",
                                          "importance.mode=\"empty\"", "importance.start_epoch=0",
                                          "importance.every=1", "importance.percentile=20",
                                          "model.dropout=0.3", "parallel.sync_every=3"])
    hashes = gathered(comm, t.model.sha256())
    vel = gathered(comm, hashlib.sha256(b"".join(a.tobytes() for a in t.model.parameter_arrays())).hexdigest())
    assert len(set(hashes)) == 1 and len(set(vel)) == 1
    nnz = [h["nnz"] for h in t.history]
    assert t.model.widths == (60, 40, 30, 4) and all(h["neurons"] == 70 for h in t.history)
    assert nnz[0] > nnz[1] == nnz[2]  # emptied after epoch 2 (0-based 1), nothing after the last


@pytest.mark.parametrize("structure,growth,mode", [("nm", "random", "remove"), ("nm_transposable", "random", "remove"),
                                                   ("nm_transposable", "gradient", "remove"),
                                                   ("nm_transposable", "gradient", "empty")])
def test_replicas_identical_under_nm_structure(comm, run_dir, structure, growth, mode):
    """N:M training: SET/RigL growth and importance pruning (its repair after removing
    neurons; emptying needs none) decide the same topology on every rank, and it satisfies the
    constraint (on W and, transposable, on W^T)."""
    from hpc_sparse.model_builder import layer_structure
    from hpc_sparse.topology.structure import count_violations

    t = train(comm, run_dir / f"{structure}-{growth}-{mode}", [
        f"topology.structure=\"{structure}\"", f"topology.growth=\"{growth}\"", "topology.nm_n=1",
        "topology.nm_m=4", "model.epsilon=3", "importance.enabled=true", "importance.start_epoch=0",
        "importance.every=1", f"importance.mode=\"{mode}\"", "parallel.sync_every=3"])
    hashes = gathered(comm, t.model.sha256())
    assert len(set(hashes)) == 1
    s = layer_structure(t.cfg)
    for layer in t.model.layers[:-1]:
        w = layer.weight
        cols, rows = count_violations(w.indptr, w.indices, w.shape, s)
        assert cols == 0 and (rows == 0 or not s.transposable)
    assert t.model.widths[1] < 40 if mode == "remove" else t.history[1]["nnz"] < t.history[0]["nnz"]


@pytest.mark.parametrize("mode", ["remove", "empty"])
def test_resume_after_pruning_is_bit_exact(comm, run_dir, mode):
    """Stopped mid-epoch (train.max_steps, a checkpoint at the stop) after an importance
    pruning, then resumed: the same model as the uninterrupted run, on every rank. The stop is
    at a regular sync point (max_steps adds a sync point of its own, which at P > 1 would
    change the run)."""
    over = ["importance.enabled=true", "importance.start_epoch=0", "importance.every=1",
            f"importance.mode=\"{mode}\"", "train.epochs=4", "checkpoint.at_end=true", "parallel.sync_every=4"]
    whole = train(comm, run_dir / "whole", over)
    steps_per_epoch = whole.progress.step // 4
    stop = 4 * ((2 * steps_per_epoch) // 4 + 1)  # in epoch 3, after the pruning that followed epoch 2
    assert stop < 3 * steps_per_epoch
    cfg = load_config(None, BASE + over + [f"train.max_steps={stop}"])
    assert Trainer(cfg, comm, run_dir / "parts", quiet=True).run() == 0
    resumed = Trainer(load_config(None, BASE + over), comm, run_dir / "parts", quiet=True)
    assert resumed.run("auto") == 0
    assert resumed.resumed is not None and resumed.resumed.step == stop
    assert resumed.history[1]["nnz"] < resumed.history[0]["nnz"]  # the checkpoint holds a pruned model
    got, want = gathered(comm, resumed.model.sha256()), gathered(comm, whole.model.sha256())
    assert len(set(got)) == 1 and got == want


def test_ranks_match_one_process_with_the_union_batch(comm, run_dir):
    """Plain SGD, sync_every=1: P ranks with batch B == one process with batch P*B."""
    over = ["train.momentum=0", "model.dropout=0", "parallel.sync_every=1", "topology.evolve_every=0",
            "parallel.lr_scaling=\"none\"",
            "train.epochs=2"]
    t = train(comm, run_dir / "p", over)
    cfg = load_config(None, BASE + over)
    data = load_dataset(**asdict(cfg.data))
    ref = build_model(cfg)
    sgd = SGD(cfg.train.lr, 0.0)
    n, size, b = data.x_train.shape[0], comm.size, cfg.train.batch_size
    for epoch in range(cfg.train.epochs):
        perm = epoch_permutation(n, cfg.seed, epoch)
        for s in range(steps_per_epoch(n, size, b)):
            idx = np.concatenate([batch_indices(perm, size, r, b, s) for r in range(size)])
            ref.train_step(data.x_train[idx], data.y_train[idx], sgd, None)
    for mine, want in zip(t.model.layers, ref.layers):
        np.testing.assert_array_equal(mine.weight.indices, want.weight.indices)
        np.testing.assert_allclose(mine.weight.data, want.weight.data, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(mine.bias, want.bias, rtol=1e-4, atol=1e-6)


def test_each_sample_once_per_epoch_across_ranks(comm):
    n, b = 103, 8
    perm = epoch_permutation(n, 5, 2)
    mine = np.concatenate([batch_indices(perm, comm.size, comm.rank, b, s)
                           for s in range(steps_per_epoch(n, comm.size, b))])
    everything = pc.allgatherv(comm, mine.astype(np.int64))
    assert np.array_equal(np.sort(everything), np.arange(n))


def test_metrics_are_exact_reductions(comm, run_dir):
    """Test accuracy from P ranks equals a one-process evaluation of the same weights."""
    t = train(comm, run_dir / "m", ["train.epochs=1"])
    data = load_dataset(**asdict(t.cfg.data))
    r = t.model.evaluate(data.x_test, data.y_test, 1000)
    assert t.history[-1]["test_accuracy"] == pytest.approx(r.correct / r.count, abs=0)
    assert t.history[-1]["test_loss"] == pytest.approx(r.loss_sum / r.count, rel=1e-9)


def test_agreement_check_detects_divergence(comm):
    arrays = [np.arange(10, dtype=np.int32) + (comm.rank if comm.size > 1 else 0)]
    err = None
    try:
        pc.check_agreement(comm, arrays, ["layers/0/W.indices"])
    except pc.TopologyMismatch as exc:
        err = str(exc)
    if comm.size > 1:
        assert err is not None and "layers/0/W.indices" in err
    else:
        assert err is None


@pytest.mark.parametrize("limit", ["epochs", "max_steps"])
def test_a_stop_as_training_completes_finishes_instead_of_requeueing(comm, run_dir, limit):
    """Issue 18, defect 7: a stop signal seen at the last sync point of the last epoch (or at
    train.max_steps) used to exit 75 (a needless requeue; after scancel no summary.json).
    The run is complete: it finishes with status 0 and writes summary.json."""
    spe = steps_per_epoch(600, comm.size, 20)
    last = spe + 3 if limit == "max_steps" else 3 * spe  # max_steps: in the middle of epoch 2
    cfg = load_config(None, BASE + ([f"train.max_steps={last}"] if limit == "max_steps" else []))
    statuses, summary, _ = run_with_stop(comm, cfg, run_dir, {comm.size - 1}, lambda p: p.step >= last)
    assert statuses == [0] * comm.size
    assert summary.get("steps") == last


def test_a_stop_in_the_last_epoch_with_steps_left_still_requeues(comm, run_dir):
    """Only a complete run finishes: with steps of the last epoch left, a stop saves and exits 75."""
    from hpc_sparse.runtime.signals import EXIT_REQUEUE

    cfg = load_config(None, BASE + ["parallel.sync_every=1"])
    spe = steps_per_epoch(600, comm.size, 20)
    statuses, summary, t = run_with_stop(comm, cfg, run_dir, {0}, lambda p: p.step >= 2 * spe + 2)
    t.stop.restore()
    assert statuses == [EXIT_REQUEUE] * comm.size and not summary
