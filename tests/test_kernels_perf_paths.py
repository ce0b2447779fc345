"""The optimised kernels against dense numpy references, on the paths the performance work
added: eight/four/one-entry unrolling (rows with 0..40 entries), int32 and int64 indices,
empty rows and columns, single-sample and odd batches, fused forward+activation+dropout,
fused backward+SDDMM+momentum+bias-gradient, software prefetch for large gathers,
thread-count independence, and no dense
allocation on a layer far too wide to hold densely. Fast, small shapes (except the last
test, which builds a 200k x 200k layer sparsely in a few seconds)."""

from __future__ import annotations


import numba
import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.sparse import SGD, SparseLinear, SparseMLP, dropout_key, hidden_activations
from hpc_sparse.sparse import activations as act
from hpc_sparse.sparse import kernels
from hpc_sparse.sparse.activations import Activation
from hpc_sparse.topology import erdos_renyi
from hpc_sparse.topology.sampling import free_slots_to_positions, sample_distinct

IDX = [np.int32, np.int64]
BATCHES = [1, 7, 37]


def ragged_csr(rng: np.random.Generator, n_in: int, n_out: int, idx) -> sp.csr_matrix:
    """Rows with 0..min(40, n_out) entries (exercise every unroll remainder), some empty rows
    and, by leaving the last columns unused, empty columns."""
    used_cols = max(1, n_out - 3)
    rows, cols = [], []
    for i in range(n_in):
        k = 0 if i % 5 == 2 else int(rng.integers(0, min(40, used_cols) + 1))
        c = np.sort(rng.choice(used_cols, size=k, replace=False))
        rows.append(np.full(k, i))
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    w = sp.csr_matrix((rng.uniform(-1, 1, r.size).astype(np.float32), (r, c)), shape=(n_in, n_out))
    w.sort_indices()
    w.indices = w.indices.astype(idx)
    w.indptr = w.indptr.astype(idx)
    return w


def transpose_index(w: sp.csr_matrix):
    idt = w.indices.dtype
    t_indptr = np.empty(w.shape[1] + 1, idt)
    t_rows = np.empty(w.nnz, idt)
    t_perm = np.empty(w.nnz, idt)
    kernels.build_transpose(w.shape[1], w.indptr, w.indices, t_indptr, t_rows, t_perm)
    return t_indptr, t_rows, t_perm


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# ------------------------------------------------------------------ plain products
@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nb", BATCHES)
def test_forward_backward_sddmm_match_dense(rng, idx, nb):
    w = ragged_csr(rng, 45, 50, idx)
    dense = w.toarray().astype(np.float64)
    assert np.any(dense.sum(axis=1) == 0) and np.any(np.abs(dense).sum(axis=0) == 0)
    t_indptr, t_rows, t_perm = transpose_index(w)
    assert t_rows.dtype == idx
    a, delta, bias = f32(rng, 45, nb), f32(rng, 50, nb), f32(rng, 50)

    out = np.full((50, nb), np.nan, np.float32)
    kernels.spmm_forward(t_indptr, t_rows, t_perm, w.data, a, bias, out)
    np.testing.assert_allclose(out, dense.T @ a + bias[:, None], rtol=1e-4, atol=1e-4)

    back = np.full((45, nb), np.nan, np.float32)
    kernels.spmm_backward(w.indptr, w.indices, w.data, delta, back)
    np.testing.assert_allclose(back, dense @ delta, rtol=1e-4, atol=1e-4)

    g = np.full(w.nnz, np.nan, np.float32)
    kernels.sddmm(w.indptr, w.indices, a, delta, g)
    coo = w.tocoo()
    full = a.astype(np.float64) @ delta.T.astype(np.float64)
    np.testing.assert_allclose(g, full[coo.row, coo.col], rtol=1e-4, atol=1e-4)

    sums = np.empty(50, np.float32)
    kernels.row_sums(delta, sums)
    np.testing.assert_allclose(sums, delta.sum(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sddmm_sgd_update_matches_dense(rng, idx, nesterov):
    w = ragged_csr(rng, 30, 44, idx)
    a, delta = f32(rng, 30, 5), f32(rng, 44, 5)
    v0 = f32(rng, w.nnz)
    data, vel = w.data.copy(), v0.copy()
    lr, mu, dec = np.float32(0.1), np.float32(0.9), np.float32(0.01)
    kernels.sddmm_sgd_update(w.indptr, w.indices, a, delta, data, vel, lr, mu, dec, nesterov)
    coo = w.tocoo()
    g = (a.astype(np.float64) @ delta.T)[coo.row, coo.col] + 0.01 * w.data
    v_ref = 0.9 * v0 - 0.1 * g
    np.testing.assert_allclose(vel, v_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data, w.data + (0.9 * v_ref - 0.1 * g if nesterov else v_ref), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------- fused paths
def _dense_act(kind, slope):
    return Activation(kind, slope)


@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nb", BATCHES)
@pytest.mark.parametrize("kind,slope", [(0, -0.6), (0, 0.0), (1, 0.0), (2, 0.0)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_act_matches_dense(rng, idx, nb, kind, slope, p):
    w = ragged_csr(rng, 33, 41, idx)
    t_indptr, t_rows, t_perm = transpose_index(w)
    a, bias = f32(rng, 33, nb), f32(rng, 41)
    z = np.empty((41, nb), np.float32)
    out = np.empty((41, nb), np.float32)
    keep = np.zeros((41, nb), np.uint8)
    thr = np.uint64(int(p * 2 ** 32))
    scale = np.float32(1 / (1 - p))
    key = dropout_key(3, 4, 0, 1)
    act.spmm_forward_act(t_indptr, t_rows, t_perm, w.data, a, bias, z, kind, np.float32(slope), thr, scale,
                         key, out, keep)
    z_ref = w.toarray().astype(np.float64).T @ a + bias[:, None]
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    f = _dense_act(kind, np.float32(slope))
    if p == 0:
        np.testing.assert_allclose(out, f(z), rtol=1e-5, atol=1e-6)
    else:
        # same mask as the unfused kernel (a pure function of key and element index)
        a2, k2 = np.empty_like(out), np.empty_like(keep)
        act.activate_dropout(z, kind, np.float32(slope), thr, scale, key, a2, k2)
        np.testing.assert_array_equal(keep, k2)
        np.testing.assert_allclose(out, f(z) * keep * scale, rtol=1e-5, atol=1e-6)
        if out.size > 200:
            assert 0.55 < keep.mean() < 0.85


@pytest.mark.parametrize("idx", IDX)
@pytest.mark.parametrize("nb", BATCHES)
@pytest.mark.parametrize("kind,slope", [(0, -0.6), (0, 0.6), (1, 0.0), (2, 0.0)])
@pytest.mark.parametrize("use_keep", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_backward_act_sgd_matches_dense(rng, idx, nb, kind, slope, use_keep, nesterov):
    n_in, n_out = 36, 43
    w = ragged_csr(rng, n_in, n_out, idx)
    dense = w.toarray().astype(np.float64)
    delta, a_prev, z = f32(rng, n_out, nb), f32(rng, n_in, nb), f32(rng, n_in, nb)
    keep = (rng.random((n_in, nb)) > 0.3).astype(np.uint8)
    v0 = f32(rng, w.nnz)
    data, vel = w.data.copy(), v0.copy()
    out = np.full((n_in, nb), np.nan, np.float32)
    gb = np.full(n_in, np.nan, np.float32)
    scale = np.float32(1 / 0.7)
    lr, mu, dec = np.float32(0.05), np.float32(0.9), np.float32(1e-3)
    act.spmm_backward_act_sgd(w.indptr, w.indices, data, vel, delta, a_prev, z, keep, kind, np.float32(slope),
                              scale, use_keep, lr, mu, dec, nesterov, out, gb)
    f = Activation(kind, np.float32(slope))
    ref = (dense @ delta) * f.derivative(z.astype(np.float64))
    if use_keep:
        ref = ref * keep * float(scale)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, ref.sum(axis=1), rtol=1e-4, atol=1e-4)
    coo = w.tocoo()
    g = (a_prev.astype(np.float64) @ delta.T)[coo.row, coo.col] + 1e-3 * w.data
    v_ref = 0.9 * v0 - 0.05 * g
    np.testing.assert_allclose(vel, v_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data, w.data + (0.9 * v_ref - 0.05 * g if nesterov else v_ref), rtol=1e-4, atol=1e-5)
    # the unfused backward agrees too
    out2 = np.empty_like(out)
    act.spmm_backward_act(w.indptr, w.indices, w.data, delta, z, keep, kind, np.float32(slope), scale, use_keep, out2)
    np.testing.assert_allclose(out2, ref, rtol=1e-4, atol=1e-4)


def test_dense_sgd_update_rule(rng):
    g, w, v = f32(rng, 9), f32(rng, 9), f32(rng, 9)
    w2, v2 = w.copy(), v.copy()
    kernels.dense_sgd_update(g, w2, v2, np.float32(0.1), np.float32(0.5), np.float32(0.01), False)
    vr = 0.5 * v - 0.1 * (g + 0.01 * w)
    np.testing.assert_allclose(v2, vr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w2, w + vr, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- whole model
def _model(idx, seed=0, widths=(20, 64, 48, 5), dropout=0.3):
    rng = np.random.default_rng(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layer = SparseLinear(erdos_renyi(rng, a, b, 4.0, "he_uniform"), rng.uniform(-0.1, 0.1, b).astype(np.float32))
        if idx is np.int64:  # what scipy/SparseLinear hand out for layers needing int64
            wt = layer.weight
            wt.indices = wt.indices.astype(np.int64)
            wt.indptr = wt.indptr.astype(np.int64)
            layer.t_indptr, layer.t_rows, layer.t_perm = transpose_index(wt)
        layers.append(layer)
    return SparseMLP(layers, hidden_activations("allrelu", 0.6, len(widths) - 2), dropout)


def _train(model, steps=3, nb=9, seed=1):
    rng = np.random.default_rng(seed)
    sgd = SGD(0.05, 0.9, weight_decay=1e-4)
    losses = []
    for s in range(steps):
        x = rng.standard_normal((nb, model.widths[0])).astype(np.float32)
        y = rng.integers(0, model.widths[-1], nb)
        losses.append(model.train_step(x, y, sgd, dropout_key(0, s, 0, 0)).loss_sum)
    return losses


def test_int64_model_equals_int32_model():
    m32, m64 = _model(np.int32), _model(np.int64)
    assert m64.layers[0].weight.indices.dtype == np.int64 and m64.layers[0].t_perm.dtype == np.int64
    l32, l64 = _train(m32), _train(m64)
    assert l32 == l64
    for a, b in zip(m32.layers, m64.layers):
        np.testing.assert_array_equal(a.weight.data, b.weight.data)
        np.testing.assert_array_equal(a.w_velocity, b.w_velocity)


@pytest.mark.parametrize("nb", [1, 13])
def test_train_step_matches_dense_reference(nb):
    """One fused SGD step (no dropout) equals gradients() + the SGD rule applied densely."""
    m, ref = _model(np.int32, dropout=0.0), _model(np.int32, dropout=0.0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((nb, 20)).astype(np.float32)
    y = rng.integers(0, 5, nb)
    loss, gw, gb = ref.gradients(x, y)
    m.train_step(x, y, SGD(0.1, 0.0, weight_decay=0.0), None)
    for l, (a, b) in enumerate(zip(m.layers, ref.layers)):
        np.testing.assert_allclose(a.weight.data, b.weight.data - 0.1 * gw[l], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.bias, b.bias - 0.1 * gb[l], rtol=1e-5, atol=1e-6)


def test_thread_count_does_not_change_results():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    before = numba.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            numba.set_num_threads(t)
            m = _model(np.int32, widths=(30, 300, 200, 6))
            losses = _train(m, steps=3, nb=17)
            out.append((losses, m.sha256(), m.predict_logits(np.ones((3, 30), np.float32))))
        assert out[0][0] == out[1][0]
        assert out[0][1] == out[1][1]
        np.testing.assert_array_equal(out[0][2], out[1][2])
    finally:
        numba.set_num_threads(before)


# --------------------------------------------------- construction stays identical
def _reference_sample_distinct(rng, population, k):
    """The straightforward formulation the optimised sampler must reproduce exactly."""
    if k == population:
        return np.arange(population, dtype=np.int64)
    if k > population // 2:
        drop = _reference_sample_distinct(rng, population, population - k)
        keep = np.ones(population, bool)
        keep[drop] = False
        return np.flatnonzero(keep).astype(np.int64)
    got = np.empty(0, np.int64)
    while got.size < k:
        extra = int((k - got.size) * 1.1) + 16
        got = np.union1d(got, rng.integers(0, population, size=extra, dtype=np.int64))
    if got.size > k:
        got = np.sort(rng.choice(got, size=k, replace=False))
    return got


@pytest.mark.parametrize("population,k", [(10, 10), (10, 7), (100, 30), (10 ** 7, 10 ** 4), (1000, 499),
                                          (1000, 501), (50, 0), (20000, 19000)])
def test_sample_distinct_equals_reference(population, k):
    a = sample_distinct(np.random.default_rng([population, k]), population, k)
    b = _reference_sample_distinct(np.random.default_rng([population, k]), population, k)
    np.testing.assert_array_equal(a, b)


def test_free_slots_equals_searchsorted_reference(rng):
    w = ragged_csr(rng, 25, 60, np.int32)
    n_out = 60
    free = 25 * 60 - w.nnz
    ranks = np.sort(rng.choice(free, 300, replace=False)).astype(np.int64)
    rows, cols = free_slots_to_positions(w.indptr, w.indices, n_out, ranks)
    dense = w.toarray() != 0
    empty = np.flatnonzero(~dense.ravel())
    np.testing.assert_array_equal(rows * n_out + cols, empty[ranks])


# ------------------------------------------------ no dense n_in x n_out allocation
_HUGE_LAYER = """
import sys, tracemalloc
import numpy as np
from hpc_sparse.sparse import SGD, SparseLinear, SparseMLP, dropout_key, hidden_activations
from hpc_sparse.topology import erdos_renyi

def step(widths, batch):
    rng = np.random.default_rng(0)
    layers = [SparseLinear(erdos_renyi(rng, a, b, 20.0, "he_uniform")) for a, b in zip(widths[:-1], widths[1:])]
    model = SparseMLP(layers, hidden_activations("allrelu", 0.6, 2), 0.3)
    x = rng.standard_normal((batch, widths[0])).astype(np.float32)
    r = model.train_step(x, rng.integers(0, 10, batch), SGD(0.01, 0.9), dropout_key(0, 0, 0, 0))
    return model, r

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)

step((64, 100, 100, 10), 8)  # load (or compile: LLVM's own peak) the kernels first, not measured
# restart the peak-RSS count here (Linux: clear_refs 5 resets VmHWM to the current RSS), so
# the peak measured below is this step's, whatever compiling the kernels took before
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
rss0 = status_kib("VmRSS") * 1024
tracemalloc.start()
model, r = step((64, 200_000, 200_000, 10), 8)
traced_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
rss_growth = status_kib("VmHWM") * 1024 - rss0
print(traced_peak, rss_growth, model.layers[1].shape[0], model.layers[1].shape[1], model.layers[1].nnz,
      int(np.isfinite(r.loss_sum)))
"""


def test_no_dense_allocation_on_a_200k_by_200k_layer():
    """A 200,000 x 200,000 layer (160 GB dense) at epsilon 20: build and train a step at
    batch 8; numpy's traced peak and the process's peak-RSS growth stay far below 2 GB.

    Measured in a fresh process, with the kernel peak count restarted after the kernels are
    loaded or compiled: a peak RSS is a lifetime figure, so in the test runner's process (which
    other tests, or LLVM compiling the kernels, already grew) the growth could read 0."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _HUGE_LAYER], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HPC_SPARSE_THREADS": "1", "NUMBA_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    traced_peak, rss_growth, n_in, n_out, nnz, finite = (int(v) for v in proc.stdout.split())
    assert finite and (n_in, n_out) == (200_000, 200_000) and nnz < 10_000_000
    assert traced_peak < 2 * 2 ** 30, traced_peak
    # the layers' own arrays (CSR, momentum, transposed index: ~20 B per nnz, 8 M nnz) must show
    assert 0.05 * 2 ** 30 < rss_growth < 2 * 2 ** 30, rss_growth


# --------------------------------------------------------- software-prefetch paths
def test_prefetch_paths_match_dense(rng):
    """Gathered arrays above the prefetch limit (30000 x 128 floats = 15 MB) take the
    software-prefetch path; every kernel still matches the dense reference and the
    dropout mask is the unfused kernel's."""
    wide, nb = 30_000, 128
    assert kernels.use_prefetch(wide, nb) and not kernels.use_prefetch(1000, nb)
    # forward: gathered a_in has `wide` rows
    w = sp.random(wide, 40, density=0.002, format="csr", random_state=rng, dtype=np.float32)
    w.sort_indices()
    t_indptr, t_rows, t_perm = transpose_index(w)
    a, bias = f32(rng, wide, nb), f32(rng, 40)
    z, out, keep = np.empty((40, nb), np.float32), np.empty((40, nb), np.float32), np.empty((40, nb), np.uint8)
    thr, scale, key = np.uint64(int(0.3 * 2 ** 32)), np.float32(1 / 0.7), dropout_key(1, 2, 3, 4)
    act.spmm_forward_act(t_indptr, t_rows, t_perm, w.data, a, bias, z, 0, np.float32(-0.6), thr, scale, key, out, keep)
    np.testing.assert_allclose(z, w.toarray().astype(np.float64).T @ a + bias[:, None], rtol=1e-4, atol=1e-4)
    a2, k2 = np.empty_like(out), np.empty_like(keep)
    act.activate_dropout(z, 0, np.float32(-0.6), thr, scale, key, a2, k2)
    np.testing.assert_array_equal(keep, k2)
    np.testing.assert_array_equal(out, a2)
    # backward / SDDMM: gathered delta has `wide` rows
    w = sp.random(50, wide, density=0.002, format="csr", random_state=rng, dtype=np.float32)
    w.sort_indices()
    dense = w.toarray().astype(np.float64)
    coo = w.tocoo()
    delta, a_prev, zp = f32(rng, wide, nb), f32(rng, 50, nb), f32(rng, 50, nb)
    keepp = (rng.random((50, nb)) > 0.3).astype(np.uint8)
    g_ref = (a_prev.astype(np.float64) @ delta.T)[coo.row, coo.col]
    g = np.empty(w.nnz, np.float32)
    kernels.sddmm(w.indptr, w.indices, a_prev, delta, g)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-3)
    back = np.empty((50, nb), np.float32)
    kernels.spmm_backward(w.indptr, w.indices, w.data, delta, back)
    np.testing.assert_allclose(back, dense @ delta, rtol=1e-4, atol=1e-4)
    lr, mu, dec = np.float32(0.01), np.float32(0.9), np.float32(1e-3)
    v0 = f32(rng, w.nnz)
    for nesterov in (False, True):
        v_ref = 0.9 * v0 - 0.01 * (g_ref + 1e-3 * w.data)
        w_ref = w.data + (0.9 * v_ref - 0.01 * (g_ref + 1e-3 * w.data) if nesterov else v_ref)
        d1, v1 = w.data.copy(), v0.copy()
        kernels.sddmm_sgd_update(w.indptr, w.indices, a_prev, delta, d1, v1, lr, mu, dec, nesterov)
        np.testing.assert_allclose(v1, v_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d1, w_ref, rtol=1e-4, atol=1e-5)
        d2, v2 = w.data.copy(), v0.copy()
        o, gb = np.empty((50, nb), np.float32), np.empty(50, np.float32)
        act.spmm_backward_act_sgd(w.indptr, w.indices, d2, v2, delta, a_prev, zp, keepp, 0, np.float32(0.6),
                                  scale, True, lr, mu, dec, nesterov, o, gb)
        ref = (dense @ delta) * np.where(zp >= 0, 1.0, 0.6) * keepp * float(scale)
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gb, ref.sum(axis=1), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(v2, v_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d2, w_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 5), (7, 130), (100, 3072)])
def test_transpose_into(rng, shape):
    x = f32(rng, *shape)
    out = np.empty(shape[::-1], np.float32)
    kernels.transpose_into(x, out)
    np.testing.assert_array_equal(out, x.T)
