"""Importance pruning's two modes (``importance.mode``): the paper's "empty" (incoming column
emptied, neuron kept) against a dense numpy reference, its invariants, the regrowth scale, and
the SET threshold compared with the paper's index formula."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from hpc_sparse.config import load_config
from hpc_sparse.engine import Engine
from hpc_sparse.engine.topology_update import configured_shapes
from hpc_sparse.parallel import comm as pc
from hpc_sparse.sparse import SGD, SparseLinear
from hpc_sparse.topology import erdos_renyi, evolve_model, prune_neurons
from hpc_sparse.topology.evolution import evolve_set, set_keep_mask
from hpc_sparse.topology.importance import neurons_without_inputs

from helpers import dense_forward, tiny_mlp

WIDTHS = (30, 40, 40, 5)


def dense_weights(model) -> list[np.ndarray]:
    return [l.weight.toarray().astype(np.float64) for l in model.layers]


def dense_velocity(layer) -> np.ndarray:
    w = layer.weight
    v = np.zeros(w.shape)
    rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    v[rows, w.indices] = layer.w_velocity
    return v


def reference_selection(w: np.ndarray, q: float) -> np.ndarray:
    """The paper's rule on a dense matrix: columns whose sum |W_ij| <= the q-th percentile."""
    imp = np.abs(w).sum(axis=0)
    return imp <= np.percentile(imp, q)


def test_empty_mode_matches_the_dense_reference_and_keeps_the_neurons():
    model = tiny_mlp(widths=WIDTHS, epsilon=5, seed=4)
    for layer in model.layers:
        layer.w_velocity[:] = np.arange(1, layer.nnz + 1, dtype=np.float32)
    dense, vel = dense_weights(model), [dense_velocity(l) for l in model.layers]
    biases = [l.bias.copy() for l in model.layers]
    nnz = model.nnz
    sel = [reference_selection(w, 20) for w in dense[:-1]]
    expect = [w.copy() for w in dense]
    for k, s in enumerate(sel):
        expect[k][:, s] = 0.0

    counts = prune_neurons(model, percentile=20, min_neurons=1, mode="empty")

    assert model.widths == WIDTHS  # nothing removed
    assert counts == [int(np.count_nonzero(np.abs(w[:, s]).sum(axis=0) > 0)) for w, s in zip(dense, sel)]
    assert all(c >= 8 for c in counts)
    for k, (got, want) in enumerate(zip(dense_weights(model), expect)):
        np.testing.assert_array_equal(got, want)  # emptied columns, every other entry untouched
        np.testing.assert_array_equal(model.layers[k].bias, biases[k])  # biases kept
        # momentum follows its entry; the emptied entries' momentum is gone
        np.testing.assert_array_equal(dense_velocity(model.layers[k]), np.where(want != 0, vel[k], 0.0))
    assert model.nnz == nnz - sum(int(np.count_nonzero(w[:, s])) for w, s in zip(dense, sel))
    assert neurons_without_inputs(model) == [int(s.sum()) for s in sel]
    x = np.random.default_rng(0).standard_normal((6, WIDTHS[0])).astype(np.float32)
    reference = dense_forward(model, x, weights=expect, biases=[b.astype(np.float64) for b in biases])
    np.testing.assert_allclose(model.predict_logits(x), reference, rtol=1e-4, atol=1e-5)


def test_both_modes_give_the_same_evaluation_output():
    """"remove" is "empty" with the emptied neurons folded away: the same function."""
    model = tiny_mlp(widths=WIDTHS, epsilon=5, seed=9)
    other = copy.deepcopy(model)
    expect = dense_weights(model)
    for w in expect[:-1]:
        w[:, reference_selection(w, 30)] = 0.0
    x = np.random.default_rng(1).standard_normal((8, WIDTHS[0])).astype(np.float32)
    reference = dense_forward(model, x, weights=expect)
    prune_neurons(model, 30, 1, mode="empty")
    prune_neurons(other, 30, 1, mode="remove")
    assert model.widths == WIDTHS and other.widths[1] < WIDTHS[1] and other.widths[2] < WIDTHS[2]
    # both consecutive hidden layers pruned: a removed neuron's constant output reaches the
    # next layer only through its columns that were not emptied
    np.testing.assert_allclose(model.predict_logits(x), reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(other.predict_logits(x), reference, rtol=1e-4, atol=1e-5)


def test_emptied_neurons_count_in_the_next_percentile():
    """The paper's percentile includes the empty neurons (importance 0), so pruning again at
    the same q finds no new neuron; "remove" takes the percentile over the survivors and
    removes another q% every time."""
    empty = tiny_mlp(widths=WIDTHS, epsilon=5, seed=4)
    removing = copy.deepcopy(empty)
    first = prune_neurons(empty, 20, 1, mode="empty")
    nnz = empty.nnz
    assert prune_neurons(empty, 20, 1, mode="empty") == [0, 0] and empty.nnz == nnz
    assert neurons_without_inputs(empty) == first
    r1 = prune_neurons(removing, 20, 1, mode="remove")
    r2 = prune_neurons(removing, 20, 1, mode="remove")
    assert all(b >= 6 for b in r2) and removing.widths[1] == WIDTHS[1] - r1[0] - r2[0]


def test_min_neurons_bounds_the_emptied_count():
    model = tiny_mlp(widths=WIDTHS, epsilon=5, seed=4)
    prune_neurons(model, 95, 30, mode="empty")
    assert all(n == 10 for n in neurons_without_inputs(model))  # 40 - 30


def test_emptied_columns_stay_empty_in_training_until_regrowth():
    model = tiny_mlp(widths=WIDTHS, epsilon=5, seed=4)
    prune_neurons(model, 20, 1, mode="empty")
    emptied = [np.setdiff1d(np.arange(l.shape[1]), l.weight.indices) for l in model.layers[:-1]]
    nnz = model.nnz
    rng = np.random.default_rng(2)
    sgd = SGD(0.05, 0.9)
    for _ in range(3):
        x = rng.standard_normal((16, WIDTHS[0])).astype(np.float32)
        model.train_step(x, rng.integers(0, WIDTHS[-1], 16).astype(np.int32), sgd, None)
    assert model.nnz == nnz
    for layer, cols in zip(model.layers[:-1], emptied):
        assert not np.isin(layer.weight.indices, cols).any()  # gradients exist only at stored entries
    evolve_model(model, zeta=0.5, growth="random", seed=3, evolution=0, init="he_uniform")
    assert model.nnz == nnz  # SET regrows what it pruned, no more
    refilled = sum(int(np.isin(cols, layer.weight.indices).sum()) for layer, cols in zip(model.layers[:-1], emptied))
    assert refilled > 0  # regrowth may connect an emptied neuron again


@pytest.mark.parametrize("init,limit", [("he_uniform", lambda n_in, n_out: math.sqrt(6 / n_in)),
                                        ("xavier_uniform", lambda n_in, n_out: math.sqrt(6 / (n_in + n_out)))])
def test_regrowth_takes_the_configured_shape_scale(init, limit):
    """A layer shrunk from 1000 to 10 inputs regrows with the 1000-input scale when told so."""
    rng = np.random.default_rng(5)
    w = erdos_renyi(rng, 10, 50, 5, init)
    w.data = np.where(rng.random(w.nnz) < 0.5, -5.0, 5.0).astype(np.float32)  # survivors are easy to tell
    layer = SparseLinear(w)
    shrunk = copy.deepcopy(layer)
    replaced = evolve_set(layer, 0.5, np.random.default_rng(6), init, init_shape=(1000, 50))
    new = layer.weight.data[np.abs(layer.weight.data) < 5]
    assert new.size == replaced > 50 and np.abs(new).max() <= limit(1000, 50)
    evolve_set(shrunk, 0.5, np.random.default_rng(6), init)  # the current shape: 10 inputs
    assert np.abs(shrunk.weight.data[np.abs(shrunk.weight.data) < 5]).max() > limit(1000, 50)


def test_the_engine_regrows_a_pruned_layer_at_the_configured_scale(tmp_path):
    cfg = load_config(None, ["model.layers=[30,40,40,5]", "model.init=\"he_uniform\"", "train.epochs=5",
                             "importance.enabled=true", "importance.start_epoch=0", "importance.every=1",
                             "importance.percentile=50", "importance.mode=\"remove\""])
    assert configured_shapes(cfg) == [(30, 40), (40, 40), (40, 5)]
    engine = Engine(cfg, pc.self_comm(), tmp_path, quiet=True)
    model = tiny_mlp(widths=WIDTHS, epsilon=5, seed=4)
    for layer in model.layers:
        layer.weight.data[:] = 5.0
    update = engine.update_topology(model, epoch=2)
    assert update.evolved and model.widths[2] <= 20  # pruned to half, then evolved
    new = model.layers[1].weight.data[model.layers[1].weight.data < 5]
    assert new.size > 0 and np.abs(new).max() <= math.sqrt(6 / 40)  # not sqrt(6 / 20)


def paper_keep_mask(data: np.ndarray, zeta: float) -> np.ndarray:
    """The paper's index formula (PAPER.md §1), with a full sort, as a reference."""
    v = np.sort(data)
    n = v.size
    closest = np.abs(v)
    f = int(np.argmin(closest))  # first index of the value closest to 0
    g = n - int(np.argmin(closest[::-1]))  # 1 + its last index
    neg_t = v[int((1 - zeta) * f)]
    pos_t = v[int(min(n - 1, g + zeta * (n - g)))]
    return (data < neg_t) | (data > pos_t)


@pytest.mark.parametrize("seed", range(8))
def test_set_threshold_drops_a_subset_of_the_papers_index_formula(seed):
    """docs/paper-differences.md: ours removes floor(zeta * n) of each sign; the paper's formula
    also removes the entries equal to its thresholds, 1-3 more per layer and evolution
    (distinct values)."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(-1, 1, rng.integers(200, 5000)).astype(np.float32)
    ours, paper = set_keep_mask(data, 0.3), paper_keep_mask(data, 0.3)
    assert np.all(paper <= ours)  # every connection the paper keeps, we keep
    assert 1 <= int(np.count_nonzero(ours & ~paper)) <= 3
