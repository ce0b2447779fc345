"""Erdős–Rényi init, SET and RigL invariants, importance pruning, schedules."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.sparse import SparseLinear
from hpc_sparse.topology import erdos_renyi, evolve_model, prune_neurons, rigl
from hpc_sparse.topology.evolution import evolve_set, prune_by_mask, set_keep_mask
from hpc_sparse.topology.importance import empty_incoming, neuron_importance, remove_neurons, select_pruned
from hpc_sparse.topology.init import er_probability
from hpc_sparse.topology.sampling import free_slots_to_positions, sample_distinct
from hpc_sparse.topology.schedule import drop_fraction, evolve_after_epoch, prune_neurons_after_epoch

from helpers import dense_forward, random_csr, tiny_mlp


def assert_canonical(w: sp.csr_matrix) -> None:
    w.check_format(full_check=True)
    assert w.has_canonical_format
    for i in range(w.shape[0]):
        row = w.indices[w.indptr[i]:w.indptr[i + 1]]
        assert np.all(np.diff(row) > 0), f"row {i} unsorted or duplicated"


def test_erdos_renyi_density_and_values():
    rng = np.random.default_rng(0)
    w = erdos_renyi(rng, 1000, 800, 20, "he_uniform")
    expected = 20 * (1000 + 800)
    assert abs(w.nnz - expected) < 5 * np.sqrt(expected)
    assert np.abs(w.data).max() <= np.sqrt(6 / 1000)
    assert w.data.dtype == np.float32 and w.indices.dtype == np.int32
    assert_canonical(w)
    assert er_probability(1000, 10, 20) == 1.0
    assert erdos_renyi(rng, 100, 10, 20, "xavier_uniform").nnz == 1000  # p > 1: dense layer


def test_sample_distinct_is_uniform_and_distinct():
    rng = np.random.default_rng(1)
    for pop, k in [(10, 10), (10, 7), (1000, 30), (10**12, 5000)]:
        s = sample_distinct(rng, pop, k)
        assert s.size == k and np.unique(s).size == k and s.min() >= 0 and s.max() < pop
        assert np.all(np.diff(s) > 0)
    counts = np.bincount(np.concatenate([sample_distinct(rng, 20, 5) for _ in range(4000)]), minlength=20)
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000


def test_free_slot_mapping_matches_dense_enumeration():
    rng = np.random.default_rng(2)
    w = random_csr(rng, 13, 9, 0.4)
    dense_free = np.flatnonzero(w.toarray().ravel() == 0)
    ranks = np.arange(dense_free.size)
    rows, cols = free_slots_to_positions(w.indptr, w.indices, 9, ranks)
    np.testing.assert_array_equal(rows * 9 + cols, dense_free)


def test_set_prune_rule_removes_zeta_of_each_sign_nearest_zero():
    data = np.array([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], np.float32)
    keep = set_keep_mask(data, 0.4)
    # 5 negatives -> 2 nearest zero go (-1, -2); 10 positives -> 4 smallest go (1..4)
    np.testing.assert_array_equal(data[~keep], [-2, -1, 1, 2, 3, 4])


@pytest.mark.parametrize("zeta", [0.0, 0.3, 1.0])
def test_set_evolution_invariants(zeta):
    rng = np.random.default_rng(3)
    layer = SparseLinear(erdos_renyi(rng, 300, 200, 10, "he_uniform"))
    layer.w_velocity[:] = rng.standard_normal(layer.nnz).astype(np.float32)
    before = layer.weight.copy()
    vel_of = dict(zip(zip(*before.nonzero()), layer.w_velocity))
    nnz = layer.nnz
    replaced = evolve_set(layer, zeta, np.random.default_rng(4), "he_uniform")
    assert layer.nnz == nnz
    assert replaced == int(np.count_nonzero(~set_keep_mask(before.data, zeta)))
    assert_canonical(layer.weight)
    # survivors keep value and momentum, new connections start with zero momentum
    coo = layer.weight.tocoo()
    old = before.todok()
    for (i, j, v, m) in zip(coo.row, coo.col, coo.data, layer.w_velocity):
        if (i, j) in vel_of and old[i, j] == v:
            assert m == vel_of[(i, j)]
        else:
            assert m == 0.0
    # the kernels' column-part index follows the new topology
    _, seg = layer.part_index(1, 1)
    np.testing.assert_array_equal(seg[0], layer.weight.indptr[:-1])
    np.testing.assert_array_equal(seg[-1], layer.weight.indptr[1:])


def test_set_regrowth_on_a_dense_layer_refills_pruned_slots():
    rng = np.random.default_rng(5)
    layer = SparseLinear(erdos_renyi(rng, 30, 10, 20, "he_uniform"))
    assert layer.nnz == 300
    evolve_set(layer, 0.3, rng, "he_uniform")
    assert layer.nnz == 300
    assert_canonical(layer.weight)


def test_rigl_grows_where_gradient_is_largest():
    rng = np.random.default_rng(6)
    layer = SparseLinear(random_csr(rng, 40, 30, 0.1))
    a = rng.standard_normal((40, 16)).astype(np.float32)
    delta = rng.standard_normal((30, 16)).astype(np.float32)
    pruned = prune_by_mask(layer, set_keep_mask(layer.weight.data, 0.3))
    lin, val = rigl.candidates(pruned, a, delta, pruned.removed, block_rows=7)
    chosen = rigl.select_growth(lin, val, pruned.removed)
    # dense reference: top |G| among slots empty after pruning
    g = np.abs(a @ delta.T)
    occupied = sp.csr_matrix((np.ones(pruned.indices.size), pruned.indices, pruned.indptr), shape=(40, 30)).toarray()
    g[occupied > 0] = -1
    ref = np.sort(np.argsort(-g.ravel(), kind="stable")[:pruned.removed])
    np.testing.assert_array_equal(chosen, ref)


def test_rigl_combines_rank_lists_as_mean():
    lin = np.array([5, 7, 5, 9], np.int64)
    val = np.array([1.0, -3.0, 1.0, 2.5], np.float32)
    # slot 5: (1+1)/2 = 1; slot 7: -1.5; slot 9: 1.25 -> top 2 by |mean|: 7, 9
    np.testing.assert_array_equal(rigl.select_growth(lin, val, 2, n_ranks=2), [7, 9])


def test_evolve_model_rigl_keeps_nnz_and_output_layer():
    model = tiny_mlp(widths=(20, 30, 25, 4), epsilon=4)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 20)).astype(np.float32)
    y = rng.integers(0, 4, 16).astype(np.int32)
    from hpc_sparse.sparse import SGD

    model.train_step(x, y, SGD(0.01), None)
    nnz = [l.nnz for l in model.layers]
    out_before = model.layers[-1].weight.copy()
    replaced = evolve_model(model, zeta=0.3, growth="gradient", seed=1, evolution=0, init="he_uniform")
    assert [l.nnz for l in model.layers] == nnz and len(replaced) == 2 and all(r > 0 for r in replaced)
    assert (model.layers[-1].weight != out_before).nnz == 0
    for layer in model.layers:
        assert_canonical(layer.weight)


def test_rigl_drop_fraction_schedule():
    assert drop_fraction("random", 5, 10, 0.3, 0.75) == 0.3
    fr = [drop_fraction("gradient", e, 100, 0.3, 0.75) for e in range(100)]
    assert fr[0] == pytest.approx(0.15 * (1 + np.cos(np.pi / 75)))
    assert all(a >= b for a, b in zip(fr, fr[1:]))
    assert fr[74] == 0.0 and fr[99] == 0.0


def test_schedules_are_integer_exact():
    assert [e for e in range(10) if evolve_after_epoch(e, 10, 1)] == list(range(9))
    assert [e for e in range(10) if evolve_after_epoch(e, 10, 3)] == [2, 5, 8]
    assert not any(evolve_after_epoch(e, 10, 0) for e in range(10))
    # the paper's schedule: epoch % 20 == 0 and epoch > 200 (0-based)
    hits = [e for e in range(500) if prune_neurons_after_epoch(e, 500, True, 200, 20)]
    assert hits[0] == 220 and hits[-1] == 480


def test_importance_metric_and_selection():
    w = sp.csr_matrix(np.array([[1.0, -2.0, 0.0, 0.5], [0.0, 1.0, 0.0, -0.5]], np.float32))
    layer = SparseLinear(w)
    np.testing.assert_allclose(neuron_importance(layer), [1.0, 3.0, 0.0, 1.0])
    np.testing.assert_array_equal(select_pruned(np.array([1.0, 3.0, 0.0, 1.0]), 25, 1), [2])
    np.testing.assert_array_equal(select_pruned(np.zeros(5), 50, 2), [0, 1, 2])  # keeps min_neurons


def test_removing_a_neuron_keeps_the_evaluation_output():
    model = tiny_mlp(widths=(12, 20, 15, 4), epsilon=4, seed=3)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((10, 12)).astype(np.float32)
    neurons = np.array([0, 5, 11])
    empty_incoming(model.layers[0], neurons)  # the paper's action
    before = dense_forward(model, x)
    remove_neurons(model.layers[0], model.layers[1], model.activations[0], neurons)
    model.topology_changed()
    assert model.widths == (12, 17, 15, 4)
    np.testing.assert_allclose(dense_forward(model, x), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict_logits(x), before, rtol=1e-4, atol=1e-4)


def test_prune_neurons_shrinks_consistently_and_optimizer_follows():
    model = tiny_mlp(widths=(30, 40, 40, 5), epsilon=5, seed=4)
    for layer in model.layers:
        layer.w_velocity[:] = 1.0
    removed = prune_neurons(model, percentile=20, min_neurons=1)
    assert model.widths[1] == 40 - removed[0] and model.widths[2] == 40 - removed[1]
    assert all(r >= 8 for r in removed)
    model.check_shapes()
    for layer in model.layers:
        assert layer.w_velocity.shape == (layer.nnz,) and np.all(layer.w_velocity == 1.0)
        assert layer.bias.shape == layer.b_velocity.shape == (layer.shape[1],)
        assert_canonical(layer.weight)
    x = np.random.default_rng(0).standard_normal((4, 30)).astype(np.float32)
    np.testing.assert_allclose(model.predict_logits(x), dense_forward(model, x), rtol=1e-4, atol=1e-4)
