"""The compute kernels against dense numpy references, on every path: four/one-entry
unrolling (rows with 0..40 entries), int32 and int64 indices, empty rows and columns,
single-sample and odd batches, column blocks and batch chunks of any size (also sizes the
planner never picks), fused forward+activation+dropout, fused backward+SDDMM+SGD with the
step spread over several chunks (plain and Nesterov momentum), and the gradient-only path.
Small shapes; fast."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.sparse import dropout_key
from hpc_sparse.sparse import kernels_backward as kb
from hpc_sparse.sparse import kernels_forward as kf
from hpc_sparse.sparse.activations import Activation
from hpc_sparse.sparse.blocking import CACHE_FRACTION, MIN_ROW_RUN, balanced_bounds, part_bounds, plan_layer
from hpc_sparse.sparse.kernels_layout import part_pointers, transpose_into

from helpers import dropout_keep_reference

IDX = [np.int32, np.int64]
BATCHES = [1, 7, 37]
# (column blocks, threads' parts per block, samples per chunk; 0 = the whole batch)
PLANS = [(1, 1, 0), (1, 2, 0), (3, 2, 0), (2, 1, 16), (4, 3, 5)]


def ragged_csr(rng: np.random.Generator, n_in: int, n_out: int, idx) -> sp.csr_matrix:
    """Rows with 0..min(40, n_out) entries (exercise every unroll remainder), some empty rows
    and, by leaving the last columns unused, empty columns."""
    used_cols = max(1, n_out - 3)
    rows, cols = [], []
    for i in range(n_in):
        k = 0 if i % 5 == 2 else int(rng.integers(0, min(40, used_cols) + 1))
        rows.append(np.full(k, i))
        cols.append(np.sort(rng.choice(used_cols, size=k, replace=False)))
    r, c = np.concatenate(rows), np.concatenate(cols)
    w = sp.csr_matrix((rng.uniform(-1, 1, r.size).astype(np.float32), (r, c)), shape=(n_in, n_out))
    w.sort_indices()
    w.indices = w.indices.astype(idx)
    w.indptr = w.indptr.astype(idx)
    return w


def parts(w: sp.csr_matrix, n_blocks: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    bounds = part_bounds(np.bincount(w.indices, minlength=w.shape[1]), n_blocks, threads)
    seg = np.empty((bounds.size, w.shape[0]), w.indices.dtype)
    part_pointers(w.indptr, w.indices, bounds, seg)
    return bounds, seg


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# ------------------------------------------------------------------- the plan itself
def test_part_bounds_cover_columns_and_blocks_ignore_threads(rng):
    counts = rng.integers(0, 9, 100)
    for n_blocks in (1, 3, 7):
        blocks = balanced_bounds(counts, n_blocks)
        for threads in (1, 2, 5):
            b = part_bounds(counts, n_blocks, threads)
            assert b.size == n_blocks * threads + 1 and b[0] == 0 and b[-1] == 100
            assert np.all(np.diff(b) >= 0)
            np.testing.assert_array_equal(b[::threads], blocks)
    # nnz balance: no block holds much more than its share
    b = balanced_bounds(np.ones(1000, np.int64), 4)
    np.testing.assert_array_equal(b, [0, 250, 500, 750, 1000])


def test_part_pointers_match_searchsorted(rng):
    w = ragged_csr(rng, 30, 50, np.int32)
    bounds, seg = parts(w, 3, 2)
    for i in range(30):
        lo, hi = w.indptr[i], w.indptr[i + 1]
        for p in range(bounds.size - 1):
            assert seg[p, i] == lo + np.searchsorted(w.indices[lo:hi], bounds[p])
        assert seg[-1, i] == hi


def test_plan_blocks_wide_layers_and_keeps_small_ones_whole():
    cache = 32 << 20
    small = plan_layer(1000, 1000, 40_000, 128, cache)
    assert (small.chunk, small.n_blocks) == (128, 1)
    d = plan_layer(95_000, 95_000, 3_800_000, 128, cache)  # 48 MB of rows: column blocks, whole batch
    assert d.chunk == 128 and d.n_blocks > 1 and d.block_bytes <= cache // CACHE_FRACTION
    first = plan_layer(784, 95_000, 1_900_000, 128, cache)  # long rows: blocked by the cache alone
    assert first.n_blocks == d.n_blocks
    # 2 M wide at 20 entries per row: cache-sized blocks would hold < MIN_ROW_RUN entries per row
    sparse_wide = plan_layer(2_000_000, 2_000_000, 40_000_000, 64, cache)
    assert sparse_wide.chunk == 64 and sparse_wide.n_blocks == 40_000_000 // (2_000_000 * MIN_ROW_RUN)
    assert plan_layer(95_000, 95_000, 3_800_000, 128, cache, chunk=32).chunk == 32
    assert plan_layer(95_000, 95_000, 3_800_000, 128, cache, chunk=20).chunk == 16  # whole cache lines
    assert plan_layer(95_000, 95_000, 3_800_000, 128, cache, block_columns=10_000).n_blocks == 10


# ------------------------------------------------------------------------- forward
@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nb", BATCHES)
@pytest.mark.parametrize("kind,slope", [(0, -0.6), (0, 0.0), (1, 0.0), (2, 0.0)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_act_matches_dense_for_every_plan(rng, idx, nb, kind, slope, p):
    w = ragged_csr(rng, 33, 41, idx)
    a, bias = f32(rng, 33, nb), f32(rng, 41)
    thr, scale, key = np.uint64(int(p * 2 ** 32)), np.float32(1 / (1 - p)), dropout_key(3, 4, 0, 1)
    z_ref = w.toarray().astype(np.float64).T @ a + bias[:, None]
    f = Activation(kind, np.float32(slope))
    results = []
    for n_blocks, threads, chunk in PLANS:
        bounds, seg = parts(w, n_blocks, threads)
        z, out = np.full((41, nb), np.nan, np.float32), np.full((41, nb), np.nan, np.float32)
        keep = np.zeros((41, nb), np.uint8)
        kf.forward_act(seg, bounds, n_blocks, w.indices, w.data, a, bias, chunk or nb, z, kind, np.float32(slope),
                       thr, scale, key, out, keep)
        np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
        if p == 0:
            np.testing.assert_allclose(out, f(z), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(keep, dropout_keep_reference(key, z.shape, p))
            np.testing.assert_allclose(out, f(z) * keep * scale, rtol=1e-5, atol=1e-6)
        results.append((z, out))
    for z, out in results[1:]:  # every term reaches z[j, b] in the same order whatever the plan
        np.testing.assert_array_equal(z, results[0][0])
        np.testing.assert_array_equal(out, results[0][1])


@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nb", BATCHES)
def test_forward_linear_matches_dense(rng, idx, nb):
    w = ragged_csr(rng, 45, 50, idx)
    assert np.any(np.diff(w.indptr) == 0) and np.any(np.bincount(w.indices, minlength=50) == 0)
    a, bias = f32(rng, 45, nb), f32(rng, 50)
    for n_blocks, threads, chunk in PLANS:
        bounds, seg = parts(w, n_blocks, threads)
        z = np.full((50, nb), np.nan, np.float32)
        kf.forward_linear(seg, bounds, n_blocks, w.indices, w.data, a, bias, chunk or nb, z)
        np.testing.assert_allclose(z, w.toarray().astype(np.float64).T @ a + bias[:, None], rtol=1e-4, atol=1e-4)


def test_dropout_mask_rate_and_determinism(rng):
    w = sp.identity(200, np.float32, format="csr")
    bounds, seg = parts(w, 1, 1)
    z, a, keep = np.empty((200, 64), np.float32), np.empty((200, 64), np.float32), np.empty((200, 64), np.uint8)
    x = np.ones((200, 64), np.float32)
    key, thr = dropout_key(7, 3, 0, 0), np.uint64(int(0.3 * 2 ** 32))
    kf.forward_act(seg, bounds, 1, w.indices, w.data, x, np.zeros(200, np.float32), 64, z, 0, np.float32(0), thr,
                   np.float32(1 / 0.7), key, a, keep)
    assert abs(keep.mean() - 0.7) < 0.02
    np.testing.assert_allclose(a[keep == 1], 1 / 0.7, rtol=1e-6)
    assert np.all(a[keep == 0] == 0)
    # seed, step, rank and layer each change the key (every pair differs, not just neighbours)
    keys = [int(dropout_key(*c)) for c in [(7, 3, 0, 0), (7, 4, 0, 0), (7, 3, 1, 0), (7, 3, 0, 1), (8, 3, 0, 0)]]
    assert len(set(keys)) == len(keys), keys


# ------------------------------------------------------------------------ backward
def _sgd_reference(w0, v0, g, lr, mu, dec, nesterov):
    v = mu * v0 - lr * (g + dec * w0)
    return w0 + (mu * v - lr * (g + dec * w0) if nesterov else v), v


@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nb", BATCHES)
@pytest.mark.parametrize("kind,slope", [(0, -0.6), (0, 0.6), (1, 0.0), (2, 0.0)])
@pytest.mark.parametrize("use_keep", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_backward_act_sgd_matches_dense_for_every_plan(rng, idx, nb, kind, slope, use_keep, nesterov):
    n_in, n_out = 36, 43
    w = ragged_csr(rng, n_in, n_out, idx)
    dense = w.toarray().astype(np.float64)
    delta, a_prev, z = f32(rng, n_out, nb), f32(rng, n_in, nb), f32(rng, n_in, nb)
    keep = (rng.random((n_in, nb)) > 0.3).astype(np.uint8)
    v0 = f32(rng, w.nnz)
    scale = np.float32(1 / 0.7)
    lr, mu, dec = np.float32(0.05), np.float32(0.9), np.float32(1e-3)
    f = Activation(kind, np.float32(slope))
    ref = (dense @ delta) * f.derivative(z.astype(np.float64))
    if use_keep:
        ref = ref * keep * float(scale)
    coo = w.tocoo()
    g = (a_prev.astype(np.float64) @ delta.T)[coo.row, coo.col]
    w_ref, v_ref = _sgd_reference(w.data.astype(np.float64), v0, g, 0.05, 0.9, 1e-3, nesterov)
    for n_blocks, threads, chunk in PLANS:
        _, seg = parts(w, n_blocks, threads)
        data, vel = w.data.copy(), v0.copy()
        chunked = (chunk or nb) < nb
        scratch = np.empty(w.nnz if (nesterov and chunked) else 0, np.float32)
        out, gb = np.full((n_in, nb), np.nan, np.float32), np.full(n_in, np.nan, np.float32)
        kb.backward_act_sgd(seg, n_blocks, w.indices, data, vel, scratch, delta, a_prev, z, keep, kind,
                            np.float32(slope), scale, use_keep, lr, mu, dec, nesterov, chunk or nb, out, gb)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gb, ref.sum(axis=1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(vel, v_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(data, w_ref, rtol=1e-4, atol=1e-5)
        # the first layer's kernel: the same step, no gradient into the input
        data, vel = w.data.copy(), v0.copy()
        kb.sddmm_sgd(seg, n_blocks, w.indices, data, vel, scratch, delta, a_prev, lr, mu, dec, nesterov, chunk or nb)
        np.testing.assert_allclose(vel, v_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(data, w_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nb", BATCHES)
def test_gradient_kernels_match_dense(rng, idx, nb):
    n_in, n_out = 30, 44
    w = ragged_csr(rng, n_in, n_out, idx)
    dense = w.toarray().astype(np.float64)
    delta, a_prev, z = f32(rng, n_out, nb), f32(rng, n_in, nb), f32(rng, n_in, nb)
    keep = (rng.random((n_in, nb)) > 0.3).astype(np.uint8)
    coo = w.tocoo()
    g_ref = (a_prev.astype(np.float64) @ delta.T)[coo.row, coo.col]
    ref = (dense @ delta) * np.where(z >= 0, 1.0, -0.6) * keep * 2.0
    for n_blocks, threads, chunk in PLANS:
        _, seg = parts(w, n_blocks, threads)
        g, out, gb = np.full(w.nnz, np.nan, np.float32), np.empty((n_in, nb), np.float32), np.empty(n_in, np.float32)
        kb.backward_act_grad(seg, n_blocks, w.indices, w.data, g, delta, a_prev, z, keep, 0, np.float32(-0.6),
                             np.float32(2.0), True, chunk or nb, out, gb)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gb, ref.sum(axis=1), rtol=1e-4, atol=1e-4)
        g2 = np.full(w.nnz, np.nan, np.float32)
        kb.sddmm_grad(seg, n_blocks, w.indices, w.data, g2, delta, a_prev, chunk or nb)
        np.testing.assert_allclose(g2, g_ref, rtol=1e-4, atol=1e-4)


def test_row_sums_and_dense_sgd_update(rng):
    x = f32(rng, 9, 37)
    sums = np.empty(9, np.float32)
    kb.row_sums(x, sums)
    np.testing.assert_allclose(sums, x.sum(axis=1), rtol=1e-5, atol=1e-5)
    for nesterov in (False, True):
        g, w, v = f32(rng, 9), f32(rng, 9), f32(rng, 9)
        w2, v2 = w.copy(), v.copy()
        kb.dense_sgd_update(g, w2, v2, np.float32(0.1), np.float32(0.5), np.float32(0.01), nesterov)
        w_ref, v_ref = _sgd_reference(w.astype(np.float64), v, g, 0.1, 0.5, 0.01, nesterov)
        np.testing.assert_allclose(v2, v_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w2, w_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 5), (7, 130), (100, 3072)])
def test_transpose_into(rng, shape):
    x = f32(rng, *shape)
    out = np.empty(shape[::-1], np.float32)
    transpose_into(x, out)
    np.testing.assert_array_equal(out, x.T)
