"""Model math against dense numpy references and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.sparse import SGD, SparseLinear, dropout_key, hidden_activations
from hpc_sparse.sparse import activations as act
from hpc_sparse.sparse import kernels
from hpc_sparse.sparse.loss import softmax_xent, softmax_xent_reference

from helpers import dense_forward, dense_loss, random_csr, tiny_mlp


@pytest.fixture
def rng():
    return np.random.default_rng(123)


@pytest.mark.parametrize("idx", [np.int32, np.int64])
def test_layer_kernels_match_dense(rng, idx):
    w = random_csr(rng, 30, 20, 0.2, idx)
    w = sp.vstack([w[:3], sp.csr_matrix((1, 20), dtype=np.float32), w[4:]], format="csr")  # an empty row
    w.indices, w.indptr = w.indices.astype(idx), w.indptr.astype(idx)
    layer = SparseLinear(w, rng.standard_normal(20).astype(np.float32))
    dense = layer.weight.toarray()
    a = rng.standard_normal((30, 5)).astype(np.float32)
    out = np.empty((20, 5), np.float32)
    layer.forward(a, out)
    np.testing.assert_allclose(out, dense.T @ a + layer.bias[:, None], rtol=1e-5, atol=1e-5)

    delta = rng.standard_normal((20, 5)).astype(np.float32)
    back = np.empty((30, 5), np.float32)
    kernels.spmm_backward(layer.weight.indptr, layer.weight.indices, layer.weight.data, delta, back)
    np.testing.assert_allclose(back, dense @ delta, rtol=1e-5, atol=1e-5)

    g = np.empty(layer.nnz, np.float32)
    layer.weight_grad(a, delta, g)
    full = a @ delta.T  # dense gradient (n_in, n_out)
    coo = layer.weight.tocoo()
    np.testing.assert_allclose(g, full[coo.row, coo.col], rtol=1e-5, atol=1e-5)


def test_transpose_index_is_column_order(rng):
    layer = SparseLinear(random_csr(rng, 17, 11, 0.3))
    csc = layer.weight.tocsc()
    np.testing.assert_array_equal(layer.t_indptr, csc.indptr)
    np.testing.assert_array_equal(layer.t_rows, csc.indices)
    np.testing.assert_array_equal(layer.weight.data[layer.t_perm], csc.data)


def test_fused_update_matches_reference(rng):
    layer = SparseLinear(random_csr(rng, 25, 15, 0.25))
    a = rng.standard_normal((25, 4)).astype(np.float32)
    delta = rng.standard_normal((15, 4)).astype(np.float32)
    layer.w_velocity[:] = rng.standard_normal(layer.nnz).astype(np.float32)
    w0, v0 = layer.weight.data.copy(), layer.w_velocity.copy()
    g = np.empty(layer.nnz, np.float32)
    layer.weight_grad(a, delta, g)
    for nesterov in (False, True):
        data, vel = w0.copy(), v0.copy()
        kernels.sddmm_sgd_update(layer.weight.indptr, layer.weight.indices, a, delta, data, vel,
                                 np.float32(0.1), np.float32(0.9), np.float32(0.01), nesterov)
        g_l2 = g + 0.01 * w0
        v_ref = 0.9 * v0 - 0.1 * g_l2
        step = 0.9 * v_ref - 0.1 * g_l2 if nesterov else v_ref
        np.testing.assert_allclose(vel, v_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(data, w0 + step, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["allrelu", "relu", "leaky_relu", "tanh", "sigmoid"])
def test_network_gradients_match_finite_differences(rng, name):
    model = tiny_mlp(activation=name)
    x = rng.standard_normal((6, 12)).astype(np.float32)
    y = rng.integers(0, 4, 6).astype(np.int32)
    loss, gw, gb = model.gradients(x, y)
    assert loss == pytest.approx(dense_loss(model, x, y), rel=1e-5)
    weights = [l.weight.toarray().astype(np.float64) for l in model.layers]
    biases = [l.bias.astype(np.float64) for l in model.layers]
    eps = 1e-6
    for l, layer in enumerate(model.layers):
        coo = layer.weight.tocoo()
        for k in range(0, layer.nnz, max(1, layer.nnz // 5)):
            i, j = coo.row[k], coo.col[k]
            wp = [w.copy() for w in weights]
            wm = [w.copy() for w in weights]
            wp[l][i, j] += eps
            wm[l][i, j] -= eps
            fd = (dense_loss(model, x, y, wp, biases) - dense_loss(model, x, y, wm, biases)) / (2 * eps)
            assert gw[l][k] == pytest.approx(fd, abs=2e-4), (l, i, j)
        for j in range(0, layer.shape[1], 3):
            bp = [b.copy() for b in biases]
            bm = [b.copy() for b in biases]
            bp[l][j] += eps
            bm[l][j] -= eps
            fd = (dense_loss(model, x, y, weights, bp) - dense_loss(model, x, y, weights, bm)) / (2 * eps)
            assert gb[l][j] == pytest.approx(fd, abs=2e-4)


def test_gradients_match_dense_backprop(rng):
    """Full dense backprop reference (numpy), every stored entry."""
    model = tiny_mlp(widths=(20, 16, 12, 5), epsilon=4)
    x = rng.standard_normal((9, 20)).astype(np.float32)
    y = rng.integers(0, 5, 9).astype(np.int32)
    _, gw, gb = model.gradients(x, y)
    ws = [l.weight.toarray().astype(np.float64) for l in model.layers]
    zs, a_s = [], [x.astype(np.float64)]
    for l, layer in enumerate(model.layers):
        z = a_s[-1] @ ws[l] + layer.bias
        zs.append(z)
        if l < len(ws) - 1:
            a_s.append(model.activations[l](z))
    p = np.exp(zs[-1] - zs[-1].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(9), y] -= 1
    delta = p / 9
    for l in range(len(ws) - 1, -1, -1):
        dense_g = a_s[l].T @ delta
        coo = model.layers[l].weight.tocoo()
        np.testing.assert_allclose(gw[l], dense_g[coo.row, coo.col], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gb[l], delta.sum(0), rtol=1e-4, atol=1e-6)
        if l:
            delta = (delta @ ws[l].T) * model.activations[l - 1].derivative(zs[l - 1])


def test_all_relu_slopes_alternate():
    acts = hidden_activations("allrelu", 0.6, 3)
    assert [a.slope for a in acts] == [-0.6, 0.6, -0.6]
    z = np.array([-2.0, 0.0, 3.0], np.float32)
    np.testing.assert_allclose(acts[0](z), [1.2, 0.0, 3.0])
    np.testing.assert_allclose(acts[1](z), [-1.2, 0.0, 3.0])


def test_softmax_xent_matches_reference(rng):
    logits = (rng.standard_normal((7, 11)) * 5).astype(np.float32)
    labels = rng.integers(0, 7, 11).astype(np.int32)
    delta = np.empty_like(logits)
    losses = np.empty(11)
    correct = np.empty(11, np.uint8)
    softmax_xent(logits, labels, delta, losses, correct)
    ref_l, ref_d = softmax_xent_reference(logits, labels)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-6)
    np.testing.assert_allclose(delta, ref_d, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(correct, logits.argmax(0) == labels)


def test_dropout_mask_rate_scale_and_determinism():
    z = np.ones((200, 64), np.float32)
    a1, a2 = np.empty_like(z), np.empty_like(z)
    k1, k2 = np.empty(z.shape, np.uint8), np.empty(z.shape, np.uint8)
    key = dropout_key(7, 3, 0, 0)
    thr = np.uint64(int(0.3 * 2**32))
    act.activate_dropout(z, 0, np.float32(0.0), thr, np.float32(1 / 0.7), key, a1, k1)
    act.activate_dropout(z, 0, np.float32(0.0), thr, np.float32(1 / 0.7), key, a2, k2)
    np.testing.assert_array_equal(a1, a2)
    assert abs(k1.mean() - 0.7) < 0.02
    np.testing.assert_allclose(a1[k1 == 1], 1 / 0.7, rtol=1e-6)
    assert np.all(a1[k1 == 0] == 0)
    # seed, step, rank and layer each change the key (every pair differs, not just neighbours)
    keys = [int(dropout_key(*c)) for c in [(7, 3, 0, 0), (7, 4, 0, 0), (7, 3, 1, 0), (7, 3, 0, 1), (8, 3, 0, 0)]]
    assert len(set(keys)) == len(keys), keys


def test_dropout_gradient_uses_the_same_mask(rng):
    model = tiny_mlp(dropout=0.4)
    x = rng.standard_normal((5, 12)).astype(np.float32)
    y = rng.integers(0, 4, 5).astype(np.int32)
    key = dropout_key(1, 2, 0, 0)
    loss, gw, _ = model.gradients(x, y, key)
    # finite differences through the same (deterministic) mask
    layer = model.layers[0]
    for k in (0, layer.nnz // 2):
        old = layer.weight.data[k]
        layer.weight.data[k] = old + 1e-3
        lp, _, _ = model.gradients(x, y, key)
        layer.weight.data[k] = old - 1e-3
        lm, _, _ = model.gradients(x, y, key)
        layer.weight.data[k] = old
        assert gw[0][k] == pytest.approx((lp - lm) / 2e-3, abs=5e-3)


def test_train_step_decreases_loss_and_keeps_csr_float32(rng):
    model = tiny_mlp(widths=(12, 30, 4), epsilon=5)
    x = rng.standard_normal((32, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    sgd = SGD(lr=0.1, momentum=0.9)
    first = model.train_step(x, y, sgd, None).loss_sum
    for _ in range(30):
        last = model.train_step(x, y, sgd, None).loss_sum
    assert last < 0.5 * first
    for layer in model.layers:
        assert layer.weight.format == "csr" and layer.weight.data.dtype == np.float32
        assert layer.weight.indices.dtype == np.int32
        assert layer.w_velocity.shape == (layer.nnz,)


def test_predict_matches_dense_forward(rng):
    model = tiny_mlp()
    x = rng.standard_normal((8, 12)).astype(np.float32)
    np.testing.assert_allclose(model.predict_logits(x), dense_forward(model, x), rtol=1e-4, atol=1e-5)


def test_sha256_changes_with_any_value(rng):
    model = tiny_mlp()
    h = model.sha256()
    assert h == model.sha256()
    model.layers[1].bias[0] += 1e-6
    assert model.sha256() != h
