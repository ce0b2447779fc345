"""N:M and transposable N:M sparsity: the checker against a dense reference, init, SET and RigL
evolution, importance-pruning repair, mask diversity, and config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.config import load_config
from hpc_sparse.errors import UserError
from hpc_sparse.model_builder import build_model
from hpc_sparse.sparse import SGD, SparseLinear, SparseMLP, hidden_activations
from hpc_sparse.topology import NMStructure, erdos_renyi, evolve_model, prune_neurons
from hpc_sparse.topology.evolution import evolve_set
from hpc_sparse.topology.init import max_epsilon
from hpc_sparse.topology.structure import (block_masks, check_structure, count_violations, enforce_structure,
                                           log10_mask_diversity, square_block_masks)
from hpc_sparse.topology.structured_growth import capacity

from helpers import random_csr

FORMS = [NMStructure(2, 4), NMStructure(2, 4, True), NMStructure(1, 5), NMStructure(1, 5, True),
         NMStructure(3, 8, True)]


def dense_violations(d: np.ndarray, s: NMStructure) -> tuple[int, int]:
    """Reference: pad to multiples of M, count the (block, column) and (row, block) groups > N."""
    n_in, n_out = d.shape
    m = s.m
    pad = np.zeros((-(-n_in // m) * m, -(-n_out // m) * m), bool)
    pad[:n_in, :n_out] = d != 0
    cols = pad.reshape(-1, m, pad.shape[1]).sum(axis=1)  # (row blocks, n_out')
    rows = pad.reshape(pad.shape[0], -1, m).sum(axis=2)  # (n_in', column blocks)
    return int((cols > s.n).sum()), int((rows > s.n).sum())


def pattern(w: sp.csr_matrix) -> np.ndarray:
    """Dense bool of the stored slots (RigL grows explicit zeros, so != 0 would miss them)."""
    out = np.zeros(w.shape, bool)
    out[np.repeat(np.arange(w.shape[0]), np.diff(w.indptr)), w.indices] = True
    return out


def assert_structured(w: sp.csr_matrix, s: NMStructure) -> None:
    """The constraint on W, and for the transposable form N:M on W^T (an independent path:
    the transpose's column groups are W's row groups)."""
    w.check_format(full_check=True)
    check_structure(w, s)
    assert dense_violations(pattern(w), s)[0] == 0
    if s.transposable:
        check_structure(w.T.tocsr(), NMStructure(s.n, s.m), "W^T")
        assert dense_violations(pattern(w), s)[1] == 0


@pytest.mark.parametrize("shape,s", [((37, 23), NMStructure(2, 4)), ((40, 33), NMStructure(1, 5, True)),
                                     ((16, 16), NMStructure(3, 8, True))])
def test_checker_matches_the_dense_reference(shape, s):
    rng = np.random.default_rng(1)
    for density in (0.05, 0.2, 0.5):
        w = random_csr(rng, *shape, density)
        w.sort_indices()
        assert count_violations(w.indptr, w.indices, w.shape, s) == dense_violations(w.toarray(), s)


@pytest.mark.parametrize("s", FORMS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(60, 40), (37, 23)])
def test_init_holds_the_constraint_at_the_unstructured_nnz(s, shape):
    eps = 0.6 * max_epsilon(*shape, s)
    w = erdos_renyi(np.random.default_rng(3), *shape, eps, "he_uniform", s)
    assert_structured(w, s)
    assert w.nnz == erdos_renyi(np.random.default_rng(3), *shape, eps, "he_uniform").nnz
    again = erdos_renyi(np.random.default_rng(3), *shape, eps, "he_uniform", s)
    assert (w != again).nnz == 0  # deterministic from the seed
    assert np.abs(w.data).max() <= math.sqrt(6 / shape[0])


def test_init_refuses_a_density_above_n_over_m():
    s = NMStructure(1, 4)
    with pytest.raises(ValueError, match="lower epsilon to at most"):
        erdos_renyi(np.random.default_rng(0), 40, 40, 1.05 * max_epsilon(40, 40, s), "he_uniform", s)


@pytest.mark.parametrize("s", [NMStructure(2, 4), NMStructure(1, 3, True), NMStructure(2, 5, True)],
                         ids=lambda s: s.name)
def test_capacity_is_reachable_and_exact(s):
    """A fill at exactly the capacity exists (edge blocks padded); one more does not fit."""
    shape = (13, 11)
    cap = capacity(shape, s)
    full = np.ones(shape, np.float32)
    w, _, _ = enforce_structure(sp.csr_matrix(full), np.zeros(full.size, np.float32), s)
    assert_structured(w, s)
    if not s.transposable:
        assert w.nnz == cap  # the greedy repair of a dense block is optimal for plain N:M
    assert cap >= s.max_density * shape[0] * shape[1]
    from hpc_sparse.topology.structured_growth import structured_random_pattern

    with pytest.raises(ValueError, match="do not fit"):
        structured_random_pattern(np.random.default_rng(0), shape, cap + 1, s)


@pytest.mark.parametrize("s", FORMS, ids=lambda s: s.name)
def test_set_evolution_keeps_the_constraint_and_nnz(s):
    shape = (48, 36)
    layer = SparseLinear(erdos_renyi(np.random.default_rng(5), *shape, 0.8 * max_epsilon(*shape, s),
                                     "he_uniform", s))
    nnz = layer.nnz
    rng = np.random.default_rng(6)
    for _ in range(5):
        before = layer.weight.copy()
        replaced = evolve_set(layer, 0.3, rng, "he_uniform", s)
        assert replaced > 0 and layer.nnz == nnz
        assert_structured(layer.weight, s)
        assert (layer.weight != before).nnz > 0
        assert layer.w_velocity.shape == (nnz,)


def structured_mlp(widths, s, seed=0, fill=0.7) -> SparseMLP:
    rng = np.random.default_rng(seed)
    layers = []
    for l, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        last = l == len(widths) - 2
        w = erdos_renyi(rng, a, b, 3.0 if last else fill * max_epsilon(a, b, s), "he_uniform", None if last else s)
        layers.append(SparseLinear(w, rng.uniform(-0.2, 0.2, b).astype(np.float32)))
    return SparseMLP(layers, hidden_activations("allrelu", 0.6, len(widths) - 2), 0.0)


@pytest.mark.parametrize("s", [NMStructure(2, 4), NMStructure(1, 4, True), NMStructure(2, 5, True)],
                         ids=lambda s: s.name)
def test_rigl_growth_keeps_the_constraint_and_prefers_large_gradients(s):
    model = structured_mlp((30, 40, 28, 4), s, seed=2)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 30)).astype(np.float32)
    y = rng.integers(0, 4, 32).astype(np.int32)
    model.train_step(x, y, SGD(0.01), None)
    nnz = [l.nnz for l in model.layers]
    inputs, deltas = model.last_batch()
    before = [l.weight.copy() for l in model.layers]
    evolve_model(model, zeta=0.3, growth="gradient", seed=1, evolution=0, init="he_uniform", structure=s)
    assert [l.nnz for l in model.layers] == nnz
    for l, layer in enumerate(model.layers[:-1]):
        assert_structured(layer.weight, s)
        new = pattern(layer.weight) & ~pattern(before[l])
        assert new.any() and np.all(layer.weight.toarray()[new] == 0)  # RigL: new weights start at 0
        # the grown slots score higher than the median empty slot (gradient, not chance)
        g = np.abs(inputs[l] @ deltas[l].T)
        assert np.median(g[new]) > np.median(g[~pattern(before[l])])


def test_rigl_growth_is_the_greedy_walk_over_the_dense_gradient():
    """Serial reference: rank every empty slot by |G| (ties: lower index) and take those whose
    groups still have room, until as many as were pruned."""
    s = NMStructure(1, 4, True)
    model = structured_mlp((24, 32, 4), s, seed=4, fill=0.6)
    rng = np.random.default_rng(9)
    model.train_step(rng.standard_normal((16, 24)).astype(np.float32), rng.integers(0, 4, 16).astype(np.int32),
                     SGD(0.01), None)
    inputs, deltas = model.last_batch()
    w0 = model.layers[0].weight.copy()
    from hpc_sparse.topology.evolution import set_keep_mask

    keep = set_keep_mask(w0.data, 0.3)
    evolve_model(model, zeta=0.3, growth="gradient", seed=1, evolution=0, init="he_uniform", structure=s)
    d = w0.toarray()
    kept = np.zeros_like(d, bool)
    r, c = w0.nonzero()
    kept[r[keep], c[keep]] = True
    g = np.abs((inputs[0] @ deltas[0].T).astype(np.float32)).ravel()
    order = np.lexsort((np.arange(g.size), -g))
    occ = kept.copy()
    want = []
    for lin in order:
        i, j = divmod(int(lin), d.shape[1])
        if occ[i, j]:
            continue
        trial = occ.copy()
        trial[i, j] = True
        if dense_violations(trial, s) == (0, 0):
            occ = trial
            want.append(lin)
            if len(want) == int((~keep).sum()):
                break
    got = pattern(model.layers[0].weight)
    np.testing.assert_array_equal(got, occ)


@pytest.mark.parametrize("s", [NMStructure(2, 4), NMStructure(2, 4, True), NMStructure(1, 3, True)],
                         ids=lambda s: s.name)
def test_importance_pruning_repairs_the_constraint(s):
    model = structured_mlp((30, 40, 40, 5), s, seed=4, fill=0.85)
    unrepaired = structured_mlp((30, 40, 40, 5), s, seed=4, fill=0.85)
    prune_neurons(unrepaired, percentile=30, min_neurons=1)
    assert any(sum(count_violations(l.weight.indptr, l.weight.indices, l.weight.shape, s)[:1 + s.transposable])
               for l in unrepaired.layers[:-1])  # the shift of indices does break blocks
    for layer in model.layers:
        layer.w_velocity[:] = np.arange(layer.nnz, dtype=np.float32)
    removed = prune_neurons(model, percentile=30, min_neurons=1, structure=s)
    assert all(r > 0 for r in removed)
    model.check_shapes()
    for layer in model.layers[:-1]:
        assert_structured(layer.weight, s)
        assert layer.w_velocity.shape == (layer.nnz,)


def test_enforce_drops_the_smallest_excess_per_group():
    s = NMStructure(1, 2, True)
    d = np.array([[0.5, -3.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 4.0]], np.float32)
    w = sp.csr_matrix(d)
    vel = np.arange(w.nnz, dtype=np.float32)  # 0.5:0, -3:1, 2:2, 1:3, 4:4
    out, v, dropped = enforce_structure(w, vel, s)
    # column groups (rows 0-1): col 0 keeps 2.0, col 1 keeps -3.0; then row 0 [-3] and row 1 [2] fit
    np.testing.assert_array_equal(out.toarray(), [[0, -3.0, 0], [2.0, 0, 0], [0, 0, 4.0]])
    np.testing.assert_array_equal(v, [1, 2, 4])
    assert dropped == 2
    same, _, none = enforce_structure(out, v, s)
    assert none == 0 and same is out


def test_mask_diversity_counts():
    assert square_block_masks(4, 2) == 90  # 4x4 0/1 matrices, two ones in every row and column
    assert all(square_block_masks(m, 1) == math.factorial(m) for m in range(2, 9))  # permutation matrices
    assert square_block_masks(8, 4) == 116963796250  # OEIS A058527, n = 4
    assert square_block_masks(3, 2) == 6  # complements of permutation matrices
    assert block_masks(2, 3, 2) == 9  # a 2x3 edge block of 2:4: each row picks 2 of 3 columns, C(3,2)^2
    assert square_block_masks(40, 20) is None  # too large: reported as n/a
    # N:M: n_out * ceil(n_in/M) blocks of C(M, N); a 6-row edge block of 2:4 -> C(2, 2) = 1
    assert log10_mask_diversity((8, 3), NMStructure(2, 4)) == pytest.approx(6 * math.log10(6))
    assert log10_mask_diversity((10, 3), NMStructure(2, 4)) == pytest.approx(6 * math.log10(6))
    assert log10_mask_diversity((8, 8), NMStructure(2, 4, True)) == pytest.approx(4 * math.log10(90))


def test_block_masks_brute_force():
    from itertools import product

    for r, c, n in [(2, 3, 1), (3, 3, 2), (2, 4, 2), (3, 2, 1)]:
        rr, cc = min(r, c), max(r, c)
        a = min(n, cc)
        count = 0
        for bits in product((0, 1), repeat=rr * cc):
            m = np.array(bits).reshape(rr, cc)
            count += bool(np.all(m.sum(1) == a) and np.all(m.sum(0) <= n))
        assert block_masks(r, c, n) == count, (r, c, n)


BASE = ["data.n_features=60", "model.layers=[60,40,30,4]", "model.epsilon=4"]


@pytest.mark.parametrize("sets,match", [
    (["topology.structure=nm", "topology.nm_n=4", "topology.nm_m=4"], "topology.nm_n=4 must be smaller"),
    (["topology.structure=nm", "topology.nm_n=0"], "topology.nm_n"),
    (["topology.structure=nm", "topology.nm_m=1"], "topology.nm_m"),
    (["topology.structure=nm_2_4"], "topology.structure"),
    (["topology.structure=nm", "topology.nm_n=1", "topology.nm_m=16"], r"set model.epsilon <= 1\.071"),
    (["topology.structure=nm_transposable", "parallel.mode=wasap"], "parallel.mode='sync'"),
])
def test_bad_structure_config_is_one_clear_line(sets, match):
    with pytest.raises(UserError, match=match) as exc:
        load_config(None, BASE + sets)
    assert "\n" not in str(exc.value) and "fix:" in str(exc.value)


def test_build_model_constrains_every_layer_but_the_output():
    cfg = load_config(None, BASE + ["topology.structure=nm_transposable"])
    model = build_model(cfg)
    s = NMStructure(2, 4, True)
    for layer in model.layers[:-1]:
        assert_structured(layer.weight, s)
    plain = build_model(load_config(None, BASE))
    assert [l.nnz for l in model.layers] == [l.nnz for l in plain.layers]  # equal nnz per seed


@pytest.mark.parametrize("s", [NMStructure(2, 4), NMStructure(1, 5, True)], ids=lambda s: s.name)
def test_full_group_slots_match_the_dense_reference_on_any_row_range(s):
    from hpc_sparse.topology.structure import full_group_slots

    shape = (23, 17)
    w = erdos_renyi(np.random.default_rng(11), *shape, 0.9 * max_epsilon(*shape, s), "he_uniform", s)
    occ = pattern(w)
    m = s.m
    pad = np.zeros((-(-shape[0] // m) * m, -(-shape[1] // m) * m), bool)
    pad[:shape[0], :shape[1]] = occ
    col_full = np.repeat(pad.reshape(-1, m, pad.shape[1]).sum(1) >= s.n, m, axis=0)[:shape[0], :shape[1]]
    row_full = np.repeat(pad.reshape(pad.shape[0], -1, m).sum(2) >= s.n, m, axis=1)[:shape[0], :shape[1]]
    want = col_full | (row_full if s.transposable else False)
    for r0, r1 in [(0, 23), (3, 9), (5, 6), (20, 23)]:
        rows, cols = full_group_slots(w.indptr, w.indices, shape, s, r0, r1)
        got = np.zeros((r1 - r0, shape[1]), bool)
        got[rows, cols] = True
        np.testing.assert_array_equal(got, want[r0:r1])


def test_rigl_with_small_scoring_blocks_keeps_the_constraint():
    s = NMStructure(1, 4, True)
    model = structured_mlp((30, 40, 4), s, seed=5)
    rng = np.random.default_rng(3)
    model.train_step(rng.standard_normal((16, 30)).astype(np.float32), rng.integers(0, 4, 16).astype(np.int32),
                     SGD(0.01), None)
    nnz = model.layers[0].nnz
    evolve_model(model, zeta=0.5, growth="gradient", seed=1, evolution=0, init="he_uniform", block_rows=7,
                 structure=s)
    assert model.layers[0].nnz == nnz
    assert_structured(model.layers[0].weight, s)


def test_random_placement_treats_every_slot_alike():
    """By symmetry every slot of a layer of full blocks is equally likely to be occupied; a
    placement biased toward low rows (e.g. accepting proposals in sorted order) fails this."""
    from hpc_sparse.topology.structured_growth import structured_random_pattern

    s = NMStructure(1, 4, True)
    shape, nnz, draws = (8, 8), 12, 1500
    hits = np.zeros(shape)
    for seed in range(draws):
        indptr, cols = structured_random_pattern(np.random.default_rng(seed), shape, nnz, s)
        hits[np.repeat(np.arange(8), np.diff(indptr)), cols] += 1
    p = nnz / 64
    sd = np.sqrt(draws * p * (1 - p))
    assert np.abs(hits - draws * p).max() < 5 * sd


@pytest.mark.parametrize("s", [NMStructure(2, 4), NMStructure(1, 16, True)], ids=lambda s: s.name)
def test_wide_structured_layer_never_allocates_dense(s):
    """A 30,000 x 30,000 layer (900 MB as a dense bool mask, 750 bytes per connection) at
    epsilon 20: build, one SET evolution and the check peak at ~150 bytes per connection
    (int64 group keys, their argsort and the proposals; unstructured: ~70)."""
    import tracemalloc

    n = 30_000
    tracemalloc.start()
    try:
        layer = SparseLinear(erdos_renyi(np.random.default_rng(0), n, n, 20, "he_uniform", s))
        evolve_set(layer, 0.3, np.random.default_rng(1), "he_uniform", s)
        check_structure(layer.weight, s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert layer.nnz > 1_000_000
    assert peak < 250 * layer.nnz, peak / layer.nnz
