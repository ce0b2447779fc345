"""The compute kernels against dense numpy references, on every path: four/one-entry
unrolling (rows with 0..40 entries), int32 and int64 indices, float32 and bfloat16 activation
storage (against a float64 reference of the stored inputs, to bfloat16's rounding), empty
rows and columns, single-sample and odd batches, column blocks and batch chunks of any size
(also sizes the planner never picks), fused forward+activation+dropout with the sign bits
the backward pass needs, fused backward+SDDMM+SGD with the recomputed dropout mask and the
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
from hpc_sparse.sparse.blocking import (CACHE_FRACTION, MIN_ROW_RUN, backward_cost, balanced_bounds, forward_cost,
                                        part_bounds, plan_layer)
from hpc_sparse.sparse.kernels_elementwise import BF16, from_bfloat16, to_bfloat16
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
    assert (small.chunk, small.n_blocks, small.forward_blocks) == (128, 1, 1)
    d = plan_layer(95_000, 95_000, 3_800_000, 128, cache)  # 48 MB of rows: column blocks, whole batch
    assert d.chunk == 128 and d.n_blocks > 1 and d.block_bytes <= cache // CACHE_FRACTION
    first = plan_layer(784, 95_000, 1_900_000, 128, cache, first=True)  # long rows: blocked by the cache alone
    assert first.forward_blocks == d.forward_blocks
    # bfloat16 halves the rows the backward pass gathers, not the forward's float32 sums
    d16 = plan_layer(95_000, 95_000, 3_800_000, 128, cache, elem_bytes=2)
    assert d16.forward_blocks == d.forward_blocks and d16.n_blocks < d.n_blocks
    assert d16.stream_bytes < d.stream_bytes and d16.row_bytes < d.row_bytes and d16.seconds < d.seconds
    # 2 M wide at 20 entries per row: at most MIN_ROW_RUN entries per row and block on average
    sparse_wide = plan_layer(2_000_000, 2_000_000, 40_000_000, 64, cache)
    cap = 40_000_000 // (2_000_000 * MIN_ROW_RUN)
    assert sparse_wide.chunk == 64 and max(sparse_wide.n_blocks, sparse_wide.forward_blocks) <= cap
    assert plan_layer(95_000, 95_000, 3_800_000, 128, cache, chunk=32).chunk == 32
    assert plan_layer(95_000, 95_000, 3_800_000, 128, cache, chunk=20).chunk == 16  # whole cache lines
    forced = plan_layer(95_000, 95_000, 3_800_000, 128, cache, block_columns=10_000)
    assert forced.n_blocks == forced.forward_blocks == 10


def test_traffic_model_counts_both_sides():
    """The streamed bytes of one pass, counted by hand: weights, part pointers, the input side
    once per block, the output side once."""
    n_in, n_out, nnz, b = 1000, 2000, 30_000, 64
    f = forward_cost(n_in, n_out, nnz, b, b, 3, 2, 32 << 20)
    assert f.stream_bytes == 8 * nnz + 8 * n_in * 3 + 3 * n_in * b * 2 + n_out * b * (2 * 2 + 0.25)
    assert f.row_bytes == nnz * b * 4  # float32 sums, whatever the dtype
    g = backward_cost(n_in, n_out, nnz, b, b // 2, 3, 4, 32 << 20)  # two chunks
    assert g.stream_bytes == (2 * (16 * nnz + 8 * n_in * 3) + 4 * nnz + n_out * b * 4 + 3 * n_in * b * (4 + 8)
                              + n_in * b * 0.125)
    assert g.row_bytes == nnz * b * 4
    # more blocks: more streaming, fewer misses; the model's time has a minimum in between
    wide = [forward_cost(95_000, 95_000, 3_800_000, 128, 128, j, 4, 32 << 20).seconds for j in (1, 6, 32)]
    assert wide[1] < wide[0] and wide[1] < wide[2]


# ----------------------------------------------------------- activation storage
def stored(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """x in the kernels' storage dtype (float32, or bfloat16 bits) and its exact float32 value."""
    if dtype == "bf16":
        h = to_bfloat16(x)
        return h, from_bfloat16(h)
    x = x.astype(np.float32)
    return x, x


def widened(x: np.ndarray) -> np.ndarray:
    return from_bfloat16(x) if x.dtype == BF16 else x


def tolerance(dtype) -> dict:
    """A value stored in bfloat16 carries a relative rounding error of at most 2**-8."""
    return dict(rtol=2 ** -7, atol=1e-4) if dtype == "bf16" else dict(rtol=1e-4, atol=1e-4)


def zinfo_for(kind: int, z: np.ndarray, dtype) -> np.ndarray:
    """What the forward pass keeps of z: sign bits for kind 0, else the values."""
    if kind == 0:
        return np.packbits(z < 0, axis=1, bitorder="little")
    return stored(z, dtype)[0]


def sign_bits(zinfo: np.ndarray, nb: int) -> np.ndarray:
    return np.unpackbits(zinfo, axis=1, bitorder="little")[:, :nb].astype(bool)


# (storage dtype, index dtype): bfloat16 is independent of the index dtype, so int32 only
DTYPES = [("f32", np.int32), ("f32", np.int64), ("bf16", np.int32)]


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan():
    cases = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.5, 3.4e38, np.inf, -np.inf,
                      0.0, -0.0, np.nan], np.float32)
    # ties go to the even neighbour; past the largest bfloat16 a value rounds to infinity
    want = np.array([1.0, 1.0, 1 + 2 ** -6, 1 + 2 ** -7, -2.5, np.inf, np.inf, -np.inf, 0.0, -0.0], np.float32)
    got = from_bfloat16(to_bfloat16(cases))
    np.testing.assert_array_equal(got[:-1], want)
    assert np.signbit(got[9]) and np.isnan(got[-1])
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    rel = np.abs(from_bfloat16(to_bfloat16(x)) - x) / np.abs(x)
    assert rel.max() <= 2 ** -8  # half a unit in the last of 8 significant bits
    # the kernels' own rounding is the numpy reference's, bit for bit
    out = np.empty((x.size // 100, 100), BF16)
    transpose_into(x.reshape(100, -1), out)
    np.testing.assert_array_equal(out, to_bfloat16(x.reshape(100, -1).T))


# ------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype,idx", DTYPES)
@pytest.mark.parametrize("nb", BATCHES)
@pytest.mark.parametrize("kind,slope", [(0, -0.6), (0, 0.0), (1, 0.0), (2, 0.0)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_act_matches_dense_for_every_plan(rng, dtype, idx, nb, kind, slope, p):
    w = ragged_csr(rng, 33, 41, idx)
    a, a64 = stored(f32(rng, 33, nb), dtype)
    bias = f32(rng, 41)
    thr, scale, key = np.uint64(int(p * 2 ** 32)), np.float32(1 / (1 - p)), dropout_key(3, 4, 0, 1)
    z_ref = w.toarray().astype(np.float64).T @ a64.astype(np.float64) + bias[:, None]
    f = Activation(kind, np.float32(slope))
    want = f(z_ref) * (dropout_keep_reference(key, z_ref.shape, p) * float(scale) if p > 0 else 1.0)
    results = []
    for n_blocks, threads, chunk in PLANS:
        bounds, seg = parts(w, n_blocks, threads)
        out = np.zeros((41, nb), a.dtype)
        acc = np.full((41, chunk or nb), np.nan, np.float32)
        zinfo = np.zeros_like(zinfo_for(kind, z_ref, dtype))
        kf.forward_act(seg, bounds, n_blocks, w.indices, w.data, a, bias, chunk or nb, acc, kind, np.float32(slope),
                       thr, scale, key, out, zinfo)
        np.testing.assert_allclose(widened(out), want, **tolerance(dtype))
        if kind == 0:
            clear = np.abs(z_ref) > 1e-3
            np.testing.assert_array_equal(sign_bits(zinfo, nb)[clear], (z_ref < 0)[clear])
        else:
            np.testing.assert_allclose(widened(zinfo), z_ref, **tolerance(dtype))
        results.append((out, zinfo))
    for out, zinfo in results[1:]:  # every term reaches z[j, b] in the same order whatever the plan
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(zinfo, results[0][1])


@pytest.mark.parametrize("dtype,idx", DTYPES)
@pytest.mark.parametrize("nb", BATCHES)
def test_forward_linear_matches_dense(rng, dtype, idx, nb):
    w = ragged_csr(rng, 45, 50, idx)
    assert np.any(np.diff(w.indptr) == 0) and np.any(np.bincount(w.indices, minlength=50) == 0)
    a, a64 = stored(f32(rng, 45, nb), dtype)
    bias = f32(rng, 50)
    for n_blocks, threads, chunk in PLANS:
        bounds, seg = parts(w, n_blocks, threads)
        z = np.full((50, nb), np.nan, np.float32)
        kf.forward_linear(seg, bounds, n_blocks, w.indices, w.data, a, bias, chunk or nb, z)
        np.testing.assert_allclose(z, w.toarray().astype(np.float64).T @ a64 + bias[:, None], rtol=1e-4, atol=1e-4)


def test_dropout_mask_rate_and_determinism(rng):
    w = sp.identity(200, np.float32, format="csr")
    bounds, seg = parts(w, 1, 1)
    acc, a, zinfo = np.empty((200, 64), np.float32), np.empty((200, 64), np.float32), np.empty((200, 8), np.uint8)
    x = np.ones((200, 64), np.float32)
    key, thr = dropout_key(7, 3, 0, 0), np.uint64(int(0.3 * 2 ** 32))
    kf.forward_act(seg, bounds, 1, w.indices, w.data, x, np.zeros(200, np.float32), 64, acc, 0, np.float32(0), thr,
                   np.float32(1 / 0.7), key, a, zinfo)
    keep = a != 0
    assert abs(keep.mean() - 0.7) < 0.02
    np.testing.assert_array_equal(keep, dropout_keep_reference(key, a.shape, 0.3).astype(bool))
    np.testing.assert_allclose(a[keep], 1 / 0.7, rtol=1e-6)
    # seed, step, rank and layer each change the key (every pair differs, not just neighbours)
    keys = [int(dropout_key(*c)) for c in [(7, 3, 0, 0), (7, 4, 0, 0), (7, 3, 1, 0), (7, 3, 0, 1), (8, 3, 0, 0)]]
    assert len(set(keys)) == len(keys), keys


# ------------------------------------------------------------------------ backward
def _sgd_reference(w0, v0, g, lr, mu, dec, nesterov):
    v = mu * v0 - lr * (g + dec * w0)
    return w0 + (mu * v - lr * (g + dec * w0) if nesterov else v), v


def _backward_inputs(rng, w, nb, kind, dtype, use_keep):
    """delta (n_out, B), a_prev and zinfo of the layer below, the dropout (key, threshold,
    scale) and the float64 reference of out = (W @ delta) * f'(z) * mask * scale."""
    n_in, n_out = w.shape
    delta, d64 = stored(f32(rng, n_out, nb), dtype)
    a_prev, a64 = stored(f32(rng, n_in, nb), dtype)
    z = f32(rng, n_in, nb)
    zinfo = zinfo_for(kind, z, dtype)
    z64 = z if kind == 0 else widened(zinfo)
    key, p = dropout_key(1, 2, 0, 0), 0.3 if use_keep else 0.0
    thr, scale = np.uint64(int(p * 2 ** 32)), np.float32(1 / (1 - p))
    ref = (w.toarray().astype(np.float64) @ d64) * Activation(kind, np.float32(-0.6)).derivative(z64.astype(np.float64))
    if use_keep:
        ref = ref * dropout_keep_reference(key, ref.shape, p) * float(scale)
    return delta, d64, a_prev, a64, zinfo, (key, thr, scale), ref


@pytest.mark.parametrize("dtype,idx", DTYPES)
@pytest.mark.parametrize("nb", BATCHES)
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("use_keep", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_backward_act_sgd_matches_dense_for_every_plan(rng, dtype, idx, nb, kind, use_keep, nesterov):
    n_in, n_out = 36, 43
    w = ragged_csr(rng, n_in, n_out, idx)
    delta, d64, a_prev, a64, zinfo, (key, thr, scale), ref = _backward_inputs(rng, w, nb, kind, dtype, use_keep)
    v0 = f32(rng, w.nnz)
    lr, mu, dec = np.float32(0.05), np.float32(0.9), np.float32(1e-3)
    coo = w.tocoo()
    g = (a64.astype(np.float64) @ d64.T)[coo.row, coo.col]
    w_ref, v_ref = _sgd_reference(w.data.astype(np.float64), v0, g, 0.05, 0.9, 1e-3, nesterov)
    for n_blocks, threads, chunk in PLANS:
        _, seg = parts(w, n_blocks, threads)
        data, vel = w.data.copy(), v0.copy()
        chunked = (chunk or nb) < nb
        scratch = np.empty(w.nnz if (nesterov and chunked) else 0, np.float32)
        out, gb = np.zeros((n_in, nb), delta.dtype), np.full(n_in, np.nan, np.float32)
        # float32: the sums accumulate in out itself; bfloat16: in a float32 scratch of one chunk
        acc = out if dtype == "f32" else np.full((n_in, chunk or nb), np.nan, np.float32)
        kb.backward_act_sgd(seg, n_blocks, w.indices, data, vel, scratch, delta, a_prev, zinfo, kind,
                            np.float32(-0.6), scale, key, thr, lr, mu, dec, nesterov, chunk or nb, acc, out, gb)
        np.testing.assert_allclose(widened(out), ref, **tolerance(dtype))
        np.testing.assert_allclose(gb, ref.sum(axis=1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(vel, v_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(data, w_ref, rtol=1e-4, atol=1e-5)
        # the first layer's kernel: the same step, no gradient into the input
        data, vel = w.data.copy(), v0.copy()
        kb.sddmm_sgd(seg, n_blocks, w.indices, data, vel, scratch, delta, a_prev, lr, mu, dec, nesterov, chunk or nb)
        np.testing.assert_allclose(vel, v_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(data, w_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,idx", DTYPES)
@pytest.mark.parametrize("nb", BATCHES)
def test_gradient_kernels_match_dense(rng, dtype, idx, nb):
    n_in, n_out = 30, 44
    w = ragged_csr(rng, n_in, n_out, idx)
    delta, d64, a_prev, a64, zinfo, (key, thr, scale), ref = _backward_inputs(rng, w, nb, 0, dtype, True)
    coo = w.tocoo()
    g_ref = (a64.astype(np.float64) @ d64.T)[coo.row, coo.col]
    for n_blocks, threads, chunk in PLANS:
        _, seg = parts(w, n_blocks, threads)
        g, out, gb = np.full(w.nnz, np.nan, np.float32), np.zeros((n_in, nb), delta.dtype), np.empty(n_in, np.float32)
        acc = out if dtype == "f32" else np.empty((n_in, chunk or nb), np.float32)
        kb.backward_act_grad(seg, n_blocks, w.indices, w.data, g, delta, a_prev, zinfo, 0, np.float32(-0.6),
                             scale, key, thr, chunk or nb, acc, out, gb)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(widened(out), ref, **tolerance(dtype))
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
