"""Model math against dense numpy references and finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_sparse.sparse import SGD, dropout_key, hidden_activations
from hpc_sparse.sparse.loss import softmax_xent, softmax_xent_reference

from helpers import dense_forward, dense_loss, tiny_mlp


@pytest.fixture
def rng():
    return np.random.default_rng(123)


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
