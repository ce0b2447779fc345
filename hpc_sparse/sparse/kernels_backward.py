"""Backward kernels: gradient into the layer below, SDDMM weight gradient and the SGD step, fused.

Row i of ``W (n_in, n_out)`` meets the gathered rows ``delta[j, :]`` of its stored entries
in two products, so each gathered row is loaded once and used twice:

* ``out[i, :] = (W @ delta)[i, :] * f'(z[i, :]) * mask[i, :] * scale``: the gradient w.r.t. the
  pre-activation of the layer below (with W *before* its update). ``f'`` comes from what the
  forward pass kept of z (sign bits, or the values for tanh and sigmoid) and the dropout mask
  is recomputed from its hash (:mod:`kernels_elementwise`); the sum over j is accumulated in
  float32 (``acc``: ``out`` itself when it is float32, else a float32 scratch) and stored
  once, in the activation dtype, after the last column block;
* ``g_ij = a_prev[i, :] . delta[j, :]``: the weight gradient at the stored positions only,
  consumed at once by the SGD step (no gradient array) or written out (``gradients()``).

The gathered side (``delta``, ``n_out`` rows) is processed one column block at a time
(:mod:`hpc_sparse.sparse.blocking`) so its rows stay in cache, and, for very wide layers, one
batch chunk at a time. With several chunks the SGD step is spread over them: the velocity
collects ``-lr * g`` chunk by chunk (Nesterov, which needs the whole gradient, collects it in
a scratch vector instead) and the weight is written after the last chunk. Threads own whole
rows, so results do not depend on the thread count.

The SGD rule (also for biases, :func:`dense_sgd_update`)::

    v <- (mu * v - lr * decay * w) - lr * g
    w <- w + v                                   (Nesterov: w + mu * v - (lr * g + lr * decay * w))

Fast-math is limited to reassociation (vectorised dot products) and FMA contraction: with
``nsz`` as well, numba's freshly compiled code and the code it loads from its cache were
seen to round differently. Kernels inline helpers from this file and from
:mod:`kernels_elementwise` only (numba's cache only notices edits to the defining file).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hpc_sparse.sparse.kernels_elementwise import derivative, keep, load, stored, z_negative, z_value

_OPTS = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"}, boundscheck=False)
_U = np.uint64


@njit(inline="always", **_OPTS)
def sgd_step(w, v, g, lr, mu, lrd, nesterov):  # pragma: no cover - numba
    """(new w, new v) for gradient g; ``lrd = lr * decay`` (coupled L2)."""
    v = (mu * v - lrd * w) - lr * g
    if nesterov:
        return w + (mu * v - (lr * g + lrd * w)), v
    return w + v, v


@njit(**_OPTS)
def dense_sgd_update(grad, data, velocity, lr, mu, decay, nesterov):  # pragma: no cover - numba
    """The SGD rule on dense vectors in place (biases; WASAP's server update). All (n,) float32."""
    lrd = lr * decay
    for k in range(data.shape[0]):
        data[k], velocity[k] = sgd_step(data[k], velocity[k], grad[k], lr, mu, lrd, nesterov)


@njit(parallel=True, **_OPTS)
def row_sums(x, out):  # pragma: no cover - numba
    """out[j] = sum_b x[j, b]; x: (n, B). The output layer's bias gradient."""
    n, nb = x.shape
    for j in prange(n):
        acc = np.float32(0.0)
        for b in range(nb):
            acc += x[j, b]
        out[j] = acc


@njit(inline="always", **_OPTS)
def _finish_delta_row(o, out, zinfo, i, c0, kind, slope, scale, key, threshold):  # pragma: no cover - numba
    """out[i, c0:c0 + n] = o * f'(z[i, c0:c0 + n]) [* mask * scale], stored in out's dtype, for
    the float32 row slice o (n samples; out's own row slice when out is float32); returns the
    float32 sum of the values before they are stored (the bias gradient part).
    ``threshold > 0``: dropout, the mask recomputed from its hash with the forward pass's key.
    Two passes over the row, each simple enough for LLVM to vectorise: f'(z) into o in place
    (from a sign bit: a multiply by 1 or slope), then the mask and the store. Slices, not
    offsets: an index LLVM cannot prove non-negative keeps numba's wrap-around test in the loop."""
    n = o.shape[0]
    if kind != 0:
        for t in range(n):
            o[t] = o[t] * derivative(kind, slope, z_value(zinfo, i, c0 + t))
    else:
        _times_slope_where_negative(o, zinfo, i, c0, slope)
    s = np.float32(0.0)
    zero = np.float32(0.0)
    base = i * out.shape[1] + c0
    if out.itemsize == o.itemsize:  # float32: o is out's row slice itself, finished in place
        if threshold > 0:
            for t in range(n):
                g = o[t] * scale if keep(key, base + t, threshold) else zero
                o[t] = g
                s += g
        else:
            for t in range(n):
                s += o[t]
    else:
        orow = out[i, c0:c0 + n]
        if threshold > 0:
            for t in range(n):
                g = o[t] * scale if keep(key, base + t, threshold) else zero
                orow[t] = stored(g, out)
                s += g
        else:
            for t in range(n):
                g = o[t]
                orow[t] = stored(g, out)
                s += g
    return s


@njit(inline="always", **_OPTS)
def _times_slope_where_negative(o, zinfo, i, c0, slope):  # pragma: no cover - numba
    """o[t] *= slope where z[i, c0 + t] < 0, from the sign bits (a whole byte at a time while
    the samples are aligned to bytes)."""
    n = o.shape[0]
    t = 0
    if c0 % 8 == 0:  # a counted loop: LLVM vectorises this form, not a while loop
        zb = zinfo[i, c0 // 8:]
        for g in range(n // 8):
            byte = np.uint32(zb[g])
            for u in range(8):
                x = o[8 * g + u]
                o[8 * g + u] = x * slope if (byte >> np.uint32(u)) & np.uint32(1) else x
        t = n // 8 * 8
    while t < n:
        if z_negative(zinfo, i, c0 + t):
            o[t] = o[t] * slope
        t += 1


@njit(inline="always", **_OPTS)
def _consume(k, w, g, first, last, update, gacc, data, velocity, lr, mu, lrd, nesterov):  # pragma: no cover
    """Use entry k's gradient part g (this chunk's samples)."""
    if not update:  # gradients(): gacc is the output
        gacc[k] = g if first else gacc[k] + g
    elif first and last:  # the whole batch in one chunk
        data[k], velocity[k] = sgd_step(w, velocity[k], g, lr, mu, lrd, nesterov)
    elif nesterov:  # several chunks: collect the whole gradient in the scratch vector first
        gt = g if first else gacc[k] + g
        if last:
            data[k], velocity[k] = sgd_step(w, velocity[k], gt, lr, mu, lrd, nesterov)
        else:
            gacc[k] = gt
    else:  # several chunks, plain momentum: the velocity collects -lr * g
        v = (mu * velocity[k] - lrd * w) if first else velocity[k]
        v = v - lr * g
        velocity[k] = v
        if last:
            data[k] = w + v


@njit(inline="always", **_OPTS)
def _row(i, k, hi, indices, data, velocity, gacc, delta, a_prev, acc, ac0, c0, c1, with_out, first, last, update,
         lr, mu, lrd, nesterov):  # pragma: no cover - numba
    """Entries k..hi of row i over samples c0..c1: acc[i, ac0:] += w * delta[j] (if with_out) and
    each entry's gradient part a_prev[i] . delta[j], consumed by :func:`_consume`. delta and
    a_prev are float32 or bfloat16 bits, acc float32. Positions are unsigned (``_U``) so that
    numba skips its negative-index wrap-around."""
    n = c1 - c0
    u0 = _U(c0)
    ua = _U(ac0)
    k = _U(k)
    hi = _U(hi)
    ai = a_prev[i]
    o = acc[i if with_out else 0]
    while k + _U(4) <= hi:
        w0 = data[k]
        w1 = data[k + _U(1)]
        w2 = data[k + _U(2)]
        w3 = data[k + _U(3)]
        d0 = delta[_U(indices[k])]
        d1 = delta[_U(indices[k + _U(1)])]
        d2 = delta[_U(indices[k + _U(2)])]
        d3 = delta[_U(indices[k + _U(3)])]
        g0 = np.float32(0.0)
        g1 = np.float32(0.0)
        g2 = np.float32(0.0)
        g3 = np.float32(0.0)
        for t in range(n):
            b = u0 + _U(t)
            x0 = load(d0[b])
            x1 = load(d1[b])
            x2 = load(d2[b])
            x3 = load(d3[b])
            if with_out:
                ob = ua + _U(t)
                o[ob] = (((o[ob] + w0 * x0) + w1 * x1) + w2 * x2) + w3 * x3
            x = load(ai[b])
            g0 += x * x0
            g1 += x * x1
            g2 += x * x2
            g3 += x * x3
        _consume(k, w0, g0, first, last, update, gacc, data, velocity, lr, mu, lrd, nesterov)
        _consume(k + _U(1), w1, g1, first, last, update, gacc, data, velocity, lr, mu, lrd, nesterov)
        _consume(k + _U(2), w2, g2, first, last, update, gacc, data, velocity, lr, mu, lrd, nesterov)
        _consume(k + _U(3), w3, g3, first, last, update, gacc, data, velocity, lr, mu, lrd, nesterov)
        k += _U(4)
    while k < hi:
        w0 = data[k]
        d0 = delta[_U(indices[k])]
        g0 = np.float32(0.0)
        for t in range(n):
            b = u0 + _U(t)
            x0 = load(d0[b])
            if with_out:
                o[ua + _U(t)] += w0 * x0
            g0 += load(ai[b]) * x0
        _consume(k, w0, g0, first, last, update, gacc, data, velocity, lr, mu, lrd, nesterov)
        k += _U(1)


@njit(inline="always", **_OPTS)
def _block_row(i, q, n_blocks, seg, indices, data, velocity, gacc, delta, a_prev, zinfo, kind, slope, scale, key,
               threshold, acc, ac0, out, gbias, c0, c1, first, last, with_out, update, lr, mu, lrd,
               nesterov):  # pragma: no cover - numba
    """Row i's entries in column block q; zero its accumulator before the first block, apply
    the activation derivative, store ``out`` and collect the bias gradient after the last."""
    stride = (seg.shape[0] - 1) // n_blocks
    if with_out and q == 0:
        o = acc[i]
        for b in range(c1 - c0):
            o[ac0 + b] = 0.0
    k = seg[q * stride, i]
    hi = seg[(q + 1) * stride, i]
    if k < hi:
        _row(i, k, hi, indices, data, velocity, gacc, delta, a_prev, acc, ac0, c0, c1, with_out, first, last,
             update, lr, mu, lrd, nesterov)
    if with_out and q == n_blocks - 1:
        s = _finish_delta_row(acc[i, ac0:ac0 + c1 - c0], out, zinfo, i, c0, kind, slope, scale, key, threshold)
        gbias[i] = s if first else gbias[i] + s


@njit(parallel=True, **_OPTS)
def backward_act_sgd(seg, n_blocks, indices, data, velocity, gacc, delta, a_prev, zinfo, kind, slope, scale, key,
                     threshold, lr, mu, decay, nesterov, chunk, acc, out, gbias):  # pragma: no cover - numba
    """Backward to the layer below + SDDMM + SGD step of a hidden-input layer.

    seg (n_parts + 1, n_in) with ``n_blocks`` column blocks of equal part counts; delta:
    (n_out, B) dL/dz of this layer with the 1/batch factor; a_prev, out: (n_in, B); delta,
    a_prev and out each float32 or bfloat16 bits. zinfo: what the forward pass kept of the
    layer below's z (:func:`kernels_elementwise.put_z`); ``key``, ``threshold`` and ``scale``
    its dropout (threshold 0: none). acc: float32 accumulator of the sums over the column
    blocks: ``out`` itself when that is float32, else (n_in, B) or (n_in, chunk). out
    receives dL/dz of the layer below, gbias (n_in,) its bias gradient. gacc (nnz,) is scratch
    for Nesterov over several chunks (else unused, may be empty).
    """
    n_in, nb = a_prev.shape
    lrd = lr * decay
    n_chunks = (nb + chunk - 1) // chunk
    for ci in range(n_chunks):
        c0 = ci * chunk
        c1 = min(nb, c0 + chunk)
        ac0 = c0 if acc.shape[1] == nb else 0
        for q in range(n_blocks):
            for i in prange(n_in):
                _block_row(i, q, n_blocks, seg, indices, data, velocity, gacc, delta, a_prev, zinfo, kind, slope,
                           scale, key, threshold, acc, ac0, out, gbias, c0, c1, ci == 0, ci == n_chunks - 1, True,
                           True, lr, mu, lrd, nesterov)


@njit(parallel=True, **_OPTS)
def sddmm_sgd(seg, n_blocks, indices, data, velocity, gacc, delta, a_prev, lr, mu, decay, nesterov,
              chunk):  # pragma: no cover - numba
    """SDDMM + SGD step of the first layer (no gradient into the input). Shapes as
    :func:`backward_act_sgd`."""
    n_in, nb = a_prev.shape
    lrd = lr * decay
    n_chunks = (nb + chunk - 1) // chunk
    unused = np.empty((1, 1), np.float32)
    for ci in range(n_chunks):
        c0 = ci * chunk
        c1 = min(nb, c0 + chunk)
        for q in range(n_blocks):
            for i in prange(n_in):
                _block_row(i, q, n_blocks, seg, indices, data, velocity, gacc, delta, a_prev, unused, 0, lr, lr,
                           np.uint64(0), np.uint64(0), unused, 0, unused, gacc, c0, c1, ci == 0, ci == n_chunks - 1,
                           False, True, lr, mu, lrd, nesterov)


@njit(parallel=True, **_OPTS)
def backward_act_grad(seg, n_blocks, indices, data, grads, delta, a_prev, zinfo, kind, slope, scale, key, threshold,
                      chunk, acc, out, gbias):  # pragma: no cover - numba
    """As :func:`backward_act_sgd` but writes the weight gradient into grads (nnz,) instead of
    stepping (``SparseMLP.gradients``)."""
    n_in, nb = a_prev.shape
    zero = np.float32(0.0)
    n_chunks = (nb + chunk - 1) // chunk
    for ci in range(n_chunks):
        c0 = ci * chunk
        c1 = min(nb, c0 + chunk)
        ac0 = c0 if acc.shape[1] == nb else 0
        for q in range(n_blocks):
            for i in prange(n_in):
                _block_row(i, q, n_blocks, seg, indices, data, grads, grads, delta, a_prev, zinfo, kind, slope,
                           scale, key, threshold, acc, ac0, out, gbias, c0, c1, ci == 0, ci == n_chunks - 1, True,
                           False, zero, zero, zero, False)


@njit(parallel=True, **_OPTS)
def sddmm_grad(seg, n_blocks, indices, data, grads, delta, a_prev, chunk):  # pragma: no cover - numba
    """The first layer's weight gradient into grads (nnz,); shapes as :func:`backward_act_sgd`."""
    n_in, nb = a_prev.shape
    zero = np.float32(0.0)
    n_chunks = (nb + chunk - 1) // chunk
    unused = np.empty((1, 1), np.float32)
    for ci in range(n_chunks):
        c0 = ci * chunk
        c1 = min(nb, c0 + chunk)
        for q in range(n_blocks):
            for i in prange(n_in):
                _block_row(i, q, n_blocks, seg, indices, data, grads, grads, delta, a_prev, unused, 0, zero, zero,
                           np.uint64(0), np.uint64(0), unused, 0, unused, grads, c0, c1, ci == 0,
                           ci == n_chunks - 1, False, False, zero, zero, zero, False)
