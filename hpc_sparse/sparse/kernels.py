"""Private numba kernels over raw CSR arrays.

Layout convention: activations are stored *feature-major*, ``(width, batch)`` C-contiguous,
so that one neuron's values over the batch are one contiguous vector. Every kernel then
works on contiguous length-``batch`` vectors, which LLVM vectorises, and each thread owns
whole output rows, so results do not depend on the thread count (no reductions across
threads).

A weight matrix ``W`` has shape ``(n_in, n_out)`` and is held in CSR
(``indptr``, ``indices``, ``data``). The forward product needs ``W^T``'s rows, i.e. the
CSC view of ``W``: ``t_indptr`` (n_out + 1), ``t_rows`` (nnz) and ``t_perm`` (nnz), where
``t_perm[k]`` is the CSR position of the k-th entry in column order. It is rebuilt only
when the topology changes (:func:`build_transpose`).

Performance notes (measured with ``tools/bench_step.py``):

* The inner loop is always the contiguous batch vector. Stored entries are consumed
  four at a time (``_U = 4``), so the output row is loaded and stored once per four
  multiply-adds instead of once per multiply-add, and the four gathered rows are
  independent loads the CPU overlaps.
* The SDDMM dot products of four entries share one pass over the batch (four vector
  accumulators), which LLVM vectorises under ``fastmath`` (reassociation).
* Index arrays may be int32 or int64 (numba compiles one specialisation per dtype).

* The forward product is fused with bias, activation and dropout per output neuron
  (:func:`spmm_forward_act`), and the backward CSR pass with the activation derivative,
  dropout mask, SDDMM gradient, momentum update and the lower layer's bias gradient
  (:func:`spmm_backward_act_sgd`): each gathered ``delta`` row feeds both products.

The activation kernels live here too (re-exported by :mod:`activations`): numba's on-disk
cache only notices edits to the file defining a function, so kernels must not inline
helpers from another module.

All kernels fill a caller-owned ``out`` buffer; none allocates O(nnz) or O(n_in*n_out).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)


# Gathered rows (src[rows[k], b0:b1]) of one pass should stay in the last-level cache:
# when a layer's gathered array is larger than this, the batch is processed in column
# chunks (multiples of 16 floats). The chunking depends only on the shapes, never on the
# thread count, so results stay independent of the number of threads.
_CACHE_BUDGET = 12 << 20


@njit(inline="always", **_OPTS)
def batch_chunk(n_src, nb):  # pragma: no cover - numba
    """Batch columns per pass so that ``n_src`` gathered rows fit :data:`_CACHE_BUDGET`."""
    if n_src * nb * 4 <= _CACHE_BUDGET:
        return nb
    c = (_CACHE_BUDGET // (n_src * 4)) // 16 * 16
    if c < 16:
        c = 16
    return min(c, nb)


@njit(inline="always", **_OPTS)
def _w(data, perm, k, use_perm):  # pragma: no cover - numba
    return data[perm[k]] if use_perm else data[k]


@njit(inline="always", **_OPTS)
def gather_accumulate(lo, hi, rows, perm, data, src, o, use_perm, init, b0, b1):  # pragma: no cover - numba
    """o[b0:b1] = init + sum over k in [lo, hi) of w_k * src[rows[k], b0:b1], with
    w_k = data[perm[k]] if use_perm else data[k].

    Eight entries per pass over the batch (then four, then one): the output row is loaded
    and stored once per eight multiply-adds and eight independent rows are in flight.
    """
    for b in range(b0, b1):
        o[b] = init
    k = lo
    while k + 8 <= hi:
        w0 = _w(data, perm, k, use_perm)
        w1 = _w(data, perm, k + 1, use_perm)
        w2 = _w(data, perm, k + 2, use_perm)
        w3 = _w(data, perm, k + 3, use_perm)
        w4 = _w(data, perm, k + 4, use_perm)
        w5 = _w(data, perm, k + 5, use_perm)
        w6 = _w(data, perm, k + 6, use_perm)
        w7 = _w(data, perm, k + 7, use_perm)
        s0 = src[rows[k]]
        s1 = src[rows[k + 1]]
        s2 = src[rows[k + 2]]
        s3 = src[rows[k + 3]]
        s4 = src[rows[k + 4]]
        s5 = src[rows[k + 5]]
        s6 = src[rows[k + 6]]
        s7 = src[rows[k + 7]]
        for b in range(b0, b1):
            o[b] += ((w0 * s0[b] + w1 * s1[b]) + (w2 * s2[b] + w3 * s3[b])) + \
                    ((w4 * s4[b] + w5 * s5[b]) + (w6 * s6[b] + w7 * s7[b]))
        k += 8
    if k + 4 <= hi:
        w0 = _w(data, perm, k, use_perm)
        w1 = _w(data, perm, k + 1, use_perm)
        w2 = _w(data, perm, k + 2, use_perm)
        w3 = _w(data, perm, k + 3, use_perm)
        s0 = src[rows[k]]
        s1 = src[rows[k + 1]]
        s2 = src[rows[k + 2]]
        s3 = src[rows[k + 3]]
        for b in range(b0, b1):
            o[b] += (w0 * s0[b] + w1 * s1[b]) + (w2 * s2[b] + w3 * s3[b])
        k += 4
    while k < hi:
        w0 = _w(data, perm, k, use_perm)
        s0 = src[rows[k]]
        for b in range(b0, b1):
            o[b] += w0 * s0[b]
        k += 1


@njit(parallel=True, **_OPTS)
def spmm_forward(t_indptr, t_rows, t_perm, data, a, bias, out):  # pragma: no cover - numba
    """out[j, :] = bias[j] + sum_k data[t_perm[k]] * a[t_rows[k], :] over column j of W.

    a: (n_in, B) float32; out: (n_out, B) float32.
    """
    n_out, nb = out.shape
    chunk = batch_chunk(a.shape[0], nb)
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        for j in prange(n_out):
            gather_accumulate(t_indptr[j], t_indptr[j + 1], t_rows, t_perm, data, a, out[j], True, bias[j], b0, b1)


@njit(parallel=True, **_OPTS)
def spmm_backward(indptr, indices, data, delta, out):  # pragma: no cover - numba
    """out[i, :] = sum_k data[k] * delta[indices[k], :] over row i of W  (out = W @ delta).

    delta: (n_out, B); out: (n_in, B).
    """
    n_in, nb = out.shape
    chunk = batch_chunk(delta.shape[0], nb)
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        for i in prange(n_in):
            gather_accumulate(indptr[i], indptr[i + 1], indices, indices, data, delta, out[i], False,
                              np.float32(0.0), b0, b1)


@njit(inline="always", **_OPTS)
def sgd_rule(w, v, g, lr, mu, decay, nesterov):  # pragma: no cover - numba
    """(new w, new v) of one momentum-SGD step with coupled L2 (see :class:`optim.SGD`):
    g += decay*w; v = mu*v - lr*g; w += v (Nesterov: w += mu*v - lr*g)."""
    g = g + decay * w
    v = mu * v - lr * g
    step = mu * v - lr * g if nesterov else v
    return w + step, v


@njit(inline="always", **_OPTS)
def sgd_partial(w, v, g_part, lr, mu, decay, first, last):  # pragma: no cover - numba
    """:func:`sgd_rule` (without Nesterov) for a gradient that arrives in parts (batch
    chunks): the first part starts v = mu*v - lr*decay*w, every part subtracts lr*g_part,
    the last applies w += v. w is unchanged until the last part."""
    if first:
        v = mu * v - lr * (decay * w)
    v = v - lr * g_part
    if last:
        w = w + v
    return w, v


@njit(inline="always", **_OPTS)
def dot4(ai, d0, d1, d2, d3, b0, b1):  # pragma: no cover - numba
    """Four dot products over [b0, b1) of ``ai`` with d0..d3 in one pass (float32)."""
    g0 = np.float32(0.0)
    g1 = np.float32(0.0)
    g2 = np.float32(0.0)
    g3 = np.float32(0.0)
    for b in range(b0, b1):
        x = ai[b]
        g0 += x * d0[b]
        g1 += x * d1[b]
        g2 += x * d2[b]
        g3 += x * d3[b]
    return g0, g1, g2, g3


@njit(inline="always", **_OPTS)
def dot1(ai, d0, b0, b1):  # pragma: no cover - numba
    g0 = np.float32(0.0)
    for b in range(b0, b1):
        g0 += ai[b] * d0[b]
    return g0


@njit(parallel=True, **_OPTS)
def sddmm(indptr, indices, a, delta, out):  # pragma: no cover - numba
    """Sampled dense-dense product: out[k] = sum_b a[row(k), b] * delta[indices[k], b].

    The weight gradient at the stored positions only. a: (n_in, B); delta: (n_out, B);
    out: (nnz,) float32.
    """
    n_in = indptr.shape[0] - 1
    nb = a.shape[1]
    chunk = batch_chunk(delta.shape[0], nb)
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        first = b0 == 0
        for i in prange(n_in):
            ai = a[i]
            k = indptr[i]
            hi = indptr[i + 1]
            while k + 4 <= hi:
                g0, g1, g2, g3 = dot4(ai, delta[indices[k]], delta[indices[k + 1]],
                                      delta[indices[k + 2]], delta[indices[k + 3]], b0, b1)
                if first:
                    out[k] = g0
                    out[k + 1] = g1
                    out[k + 2] = g2
                    out[k + 3] = g3
                else:
                    out[k] += g0
                    out[k + 1] += g1
                    out[k + 2] += g2
                    out[k + 3] += g3
                k += 4
            while k < hi:
                g0 = dot1(ai, delta[indices[k]], b0, b1)
                if first:
                    out[k] = g0
                else:
                    out[k] += g0
                k += 1


@njit(inline="always", **_OPTS)
def _update(data, velocity, k, w, g, lr, mu, decay, nesterov, single, first, last):  # pragma: no cover
    if single:
        data[k], velocity[k] = sgd_rule(w, velocity[k], g, lr, mu, decay, nesterov)
    else:
        data[k], velocity[k] = sgd_partial(w, velocity[k], g, lr, mu, decay, first, last)


@njit(parallel=True, **_OPTS)
def sddmm_sgd_update(indptr, indices, a, delta, data, velocity, lr, mu, decay, nesterov):  # pragma: no cover
    """Fused SDDMM gradient + momentum SGD step, without materialising the gradient.

    For each stored k: g = sum_b a[row, b] * delta[col, b] + decay * w;
    v <- mu*v - lr*g;  w <- w + (mu*v - lr*g if nesterov else v)  (:func:`sgd_rule`).
    ``delta`` must already carry the 1/batch factor of the mean loss. For a large
    ``delta`` the batch is processed in chunks and the gradient arrives in parts
    (:func:`sgd_partial`; Nesterov always uses one pass).
    """
    n_in = indptr.shape[0] - 1
    nb = a.shape[1]
    chunk = nb if nesterov else batch_chunk(delta.shape[0], nb)
    single = chunk >= nb
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        first = b0 == 0
        last = b1 == nb
        for i in prange(n_in):
            ai = a[i]
            k = indptr[i]
            hi = indptr[i + 1]
            while k + 4 <= hi:
                g0, g1, g2, g3 = dot4(ai, delta[indices[k]], delta[indices[k + 1]],
                                      delta[indices[k + 2]], delta[indices[k + 3]], b0, b1)
                _update(data, velocity, k, data[k], g0, lr, mu, decay, nesterov, single, first, last)
                _update(data, velocity, k + 1, data[k + 1], g1, lr, mu, decay, nesterov, single, first, last)
                _update(data, velocity, k + 2, data[k + 2], g2, lr, mu, decay, nesterov, single, first, last)
                _update(data, velocity, k + 3, data[k + 3], g3, lr, mu, decay, nesterov, single, first, last)
                k += 4
            while k < hi:
                g = dot1(ai, delta[indices[k]], b0, b1)
                _update(data, velocity, k, data[k], g, lr, mu, decay, nesterov, single, first, last)
                k += 1


@njit(**_OPTS)
def dense_sgd_update(grad, data, velocity, lr, mu, decay, nesterov):  # pragma: no cover - numba
    """Momentum SGD on a dense vector (biases), same rule as :func:`sddmm_sgd_update`."""
    for k in range(data.shape[0]):
        data[k], velocity[k] = sgd_rule(data[k], velocity[k], grad[k], lr, mu, decay, nesterov)


@njit(parallel=True, **_OPTS)
def row_sums(x, out):  # pragma: no cover - numba
    """out[j] = sum_b x[j, b]; x: (n, B). Used for bias gradients."""
    n, nb = x.shape
    for j in prange(n):
        acc = np.float32(0.0)
        for b in range(nb):
            acc += x[j, b]
        out[j] = acc


# --------------------------------------------------------------------------------------
# Activations (kinds: 0 piecewise-linear, 1 tanh, 2 sigmoid; see activations.py), dropout
# from a counter-based hash, and the kernels fused with them.


@njit(inline="always", **_OPTS)
def _apply(kind, slope, z):  # pragma: no cover - numba
    if kind == 0:
        return z if z >= 0 else slope * z
    if kind == 1:
        return np.tanh(z)
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-z))


@njit(inline="always", **_OPTS)
def _deriv(kind, slope, z):  # pragma: no cover - numba
    if kind == 0:
        return np.float32(1.0) if z >= 0 else slope
    if kind == 1:
        t = np.tanh(z)
        return np.float32(1.0) - t * t
    s = np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
    return s * (np.float32(1.0) - s)


@njit(inline="always", **_OPTS)
def _keep(key, idx, threshold):  # pragma: no cover - numba
    """True with probability 1 - p: splitmix64 of (key + idx), top 32 bits against p*2^32."""
    x = key + np.uint64(idx) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)) >= threshold


@njit(inline="always", **_OPTS)
def _activate_row(zr, ar, kr, kind, slope, threshold, scale, key, base, b0, b1):  # pragma: no cover - numba
    """One neuron's batch vector over [b0, b1): ar = f(zr) [* mask * scale]; kr records
    the mask. ``base`` is the element index of zr[0] in the (width, B) array (the hash
    counter), so the mask does not depend on the chunking."""
    if threshold > 0 and kind == 0:  # the common case, kept branch-free so LLVM vectorises it
        for b in range(b0, b1):
            x = zr[b]
            y = x if x >= 0 else slope * x
            kp = _keep(key, base + b, threshold)
            kr[b] = 1 if kp else 0
            ar[b] = y * scale if kp else np.float32(0.0)
    elif threshold > 0:
        for b in range(b0, b1):
            y = _apply(kind, slope, zr[b])
            kp = _keep(key, base + b, threshold)
            kr[b] = 1 if kp else 0
            ar[b] = y * scale if kp else np.float32(0.0)
    elif kind == 0:
        for b in range(b0, b1):
            z = zr[b]
            ar[b] = z if z >= 0 else slope * z
    else:
        for b in range(b0, b1):
            ar[b] = _apply(kind, slope, zr[b])


@njit(parallel=True, **_OPTS)
def activate_dropout(z, kind, slope, threshold, scale, key, a, keep):  # pragma: no cover
    """a = f(z) * mask * scale, in place per element; keep (uint8) records the mask.

    ``threshold = p * 2**32`` (0 disables dropout), ``scale = 1/(1-p)``.
    z, a: (width, B) float32; keep: (width, B) uint8 (untouched without dropout).
    """
    n, nb = z.shape
    for j in prange(n):
        _activate_row(z[j], a[j], keep[j], kind, slope, threshold, scale, key, j * nb, 0, nb)


@njit(parallel=True, **_OPTS)
def activate(z, kind, slope, a):  # pragma: no cover - numba
    """a = f(z) without dropout (evaluation). z, a: (width, B)."""
    n, nb = z.shape
    for j in prange(n):
        zr = z[j]
        ar = a[j]
        if kind == 0:
            for b in range(nb):
                x = zr[b]
                ar[b] = x if x >= 0 else slope * x
        else:
            for b in range(nb):
                ar[b] = _apply(kind, slope, zr[b])


@njit(parallel=True, **_OPTS)
def spmm_forward_act(t_indptr, t_rows, t_perm, data, a_in, bias, z, kind, slope, threshold, scale, key,
                     a_out, keep):  # pragma: no cover - numba
    """Forward through a layer and its activation (+ dropout), fused per output neuron.

    z[j, :] = bias[j] + sum_k data[t_perm[k]] * a_in[t_rows[k], :] over column j of W
    (CSC index, see :mod:`hpc_sparse.sparse.kernels`), then a_out[j, :] = f(z[j, :]) with
    the same dropout as :func:`activate_dropout` (``threshold`` 0 disables it), while the
    row is still in L1. a_in: (n_in, B); z, a_out: (n_out, B) float32; keep (n_out, B) uint8.
    """
    n_out, nb = z.shape
    chunk = batch_chunk(a_in.shape[0], nb)
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        for j in prange(n_out):
            zr = z[j]
            gather_accumulate(t_indptr[j], t_indptr[j + 1], t_rows, t_perm, data, a_in, zr, True, bias[j], b0, b1)
            _activate_row(zr, a_out[j], keep[j], kind, slope, threshold, scale, key, j * nb, b0, b1)


@njit(inline="always", **_OPTS)
def _finish_delta_row(o, zr, kr, kind, slope, scale, use_keep, b0, b1):  # pragma: no cover - numba
    """o[b0:b1] *= f'(zr) [* mask * scale], in place; returns the sum (bias gradient part)."""
    s = np.float32(0.0)
    if kind == 0 and use_keep:
        for b in range(b0, b1):
            d = np.float32(1.0) if zr[b] >= 0 else slope
            g = o[b] * d * scale if kr[b] else np.float32(0.0)
            o[b] = g
            s += g
    elif kind == 0:
        for b in range(b0, b1):
            g = o[b] if zr[b] >= 0 else o[b] * slope
            o[b] = g
            s += g
    else:
        for b in range(b0, b1):
            g = o[b] * _deriv(kind, slope, zr[b])
            if use_keep:
                g = g * scale if kr[b] else np.float32(0.0)
            o[b] = g
            s += g
    return s


@njit(parallel=True, **_OPTS)
def spmm_backward_act(indptr, indices, data, delta, z, keep, kind, slope, scale, use_keep, out):  # pragma: no cover
    """Backward through a layer and the activation below it, fused.

    out[i, :] = (W @ delta)[i, :] * f'(z[i, :]) * mask[i, :] * scale, where W is (n_in, n_out)
    in CSR, delta (n_out, B) is dL/dz of this layer, z (n_in, B) the pre-activation of the
    layer below and keep its dropout mask (ignored unless ``use_keep``).
    """
    n_in, nb = out.shape
    chunk = batch_chunk(delta.shape[0], nb)
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        for i in prange(n_in):
            o = out[i]
            gather_accumulate(indptr[i], indptr[i + 1], indices, indices, data, delta, o, False,
                              np.float32(0.0), b0, b1)
            _finish_delta_row(o, z[i], keep[i], kind, slope, scale, use_keep, b0, b1)


@njit(parallel=True, **_OPTS)
def spmm_backward_act_sgd(indptr, indices, data, velocity, delta, a_prev, z, keep, kind, slope, scale, use_keep,
                          lr, mu, decay, nesterov, out, gbias_prev):  # pragma: no cover - numba
    """Backward to the layer below, SDDMM gradient and momentum-SGD update, in one CSR pass.

    Row i of W (n_in, n_out) meets the same gathered rows ``delta[indices[k], :]`` in both
    products, so each is loaded once and used twice:

    * out[i, :] = (W @ delta)[i, :] * f'(z[i, :]) * mask * scale, with W *before* the update
      (each w_k is read before it is overwritten, and only row i's thread touches it);
    * g_k = a_prev[i, :] . delta[indices[k], :]; then the rule of
      :func:`sddmm_sgd_update` on data[k], velocity[k] (in parts when the batch is
      chunked; W changes only in the last chunk, after its backward use);
    * gbias_prev[i] = sum_b out[i, b], the bias gradient of the layer below.

    delta: (n_out, B) with the 1/batch factor; a_prev, z, keep, out: (n_in, B).
    """
    n_in, nb = out.shape
    chunk = nb if nesterov else batch_chunk(delta.shape[0], nb)
    single = chunk >= nb
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        first = b0 == 0
        last = b1 == nb
        for i in prange(n_in):
            ai = a_prev[i]
            o = out[i]
            k = indptr[i]
            hi = indptr[i + 1]
            for b in range(b0, b1):
                o[b] = 0.0
            while k + 4 <= hi:
                w0 = data[k]
                w1 = data[k + 1]
                w2 = data[k + 2]
                w3 = data[k + 3]
                d0 = delta[indices[k]]
                d1 = delta[indices[k + 1]]
                d2 = delta[indices[k + 2]]
                d3 = delta[indices[k + 3]]
                g0 = np.float32(0.0)
                g1 = np.float32(0.0)
                g2 = np.float32(0.0)
                g3 = np.float32(0.0)
                for b in range(b0, b1):
                    x0 = d0[b]
                    x1 = d1[b]
                    x2 = d2[b]
                    x3 = d3[b]
                    o[b] += (w0 * x0 + w1 * x1) + (w2 * x2 + w3 * x3)
                    x = ai[b]
                    g0 += x * x0
                    g1 += x * x1
                    g2 += x * x2
                    g3 += x * x3
                _update(data, velocity, k, w0, g0, lr, mu, decay, nesterov, single, first, last)
                _update(data, velocity, k + 1, w1, g1, lr, mu, decay, nesterov, single, first, last)
                _update(data, velocity, k + 2, w2, g2, lr, mu, decay, nesterov, single, first, last)
                _update(data, velocity, k + 3, w3, g3, lr, mu, decay, nesterov, single, first, last)
                k += 4
            while k < hi:
                w0 = data[k]
                d0 = delta[indices[k]]
                g0 = np.float32(0.0)
                for b in range(b0, b1):
                    x0 = d0[b]
                    o[b] += w0 * x0
                    g0 += ai[b] * x0
                _update(data, velocity, k, w0, g0, lr, mu, decay, nesterov, single, first, last)
                k += 1
            s = _finish_delta_row(o, z[i], keep[i], kind, slope, scale, use_keep, b0, b1)
            gbias_prev[i] = s if first else gbias_prev[i] + s


@njit(cache=True)
def build_transpose(n_out, indptr, indices, t_indptr, t_rows, t_perm):  # pragma: no cover - numba
    """Counting sort of CSR (row-major) entries into column order, O(nnz + n_out).

    Fills t_indptr (n_out+1), t_rows (nnz) and t_perm (nnz, CSR positions). Rows stay
    ascending within each column because rows are visited in order. Scratch: n_out ints.
    """
    n_in = indptr.shape[0] - 1
    for j in range(n_out + 1):
        t_indptr[j] = 0
    for k in range(indptr[n_in]):
        t_indptr[indices[k] + 1] += 1
    for j in range(n_out):
        t_indptr[j + 1] += t_indptr[j]
    fill = t_indptr[:-1].copy()
    for i in range(n_in):
        for k in range(indptr[i], indptr[i + 1]):
            c = indices[k]
            p = fill[c]
            t_rows[p] = i
            t_perm[p] = k
            fill[c] = p + 1
