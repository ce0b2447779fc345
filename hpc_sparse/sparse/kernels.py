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
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_OPTS = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)


# When a layer's gathered array (src rows x batch floats) is larger than this, its rows
# cannot stay in the last-level cache and every gather misses: the kernels then issue
# software prefetches for the rows of the entries 8-16 positions ahead (measured ~2x on
# a 95000-wide layer; below the limit prefetching only costs instructions).
_PREFETCH_ABOVE = 8 << 20


@intrinsic
def _prefetch(typingctx, arr, row, col):
    """Prefetch the cache line of arr[row, col] (read, high locality): llvm.prefetch."""
    sig = types.void(arr, row, col)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        j = context.cast(builder, args[2], signature.args[2], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i, j], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", **_OPTS)
def use_prefetch(n_src, nb):  # pragma: no cover - numba
    """Whether gathers from an (n_src, nb) float32 array should be software-prefetched."""
    return n_src * nb * 4 > _PREFETCH_ABOVE


@njit(inline="always", **_OPTS)
def _prefetch_rows(src, rows, k0, k1, nb):  # pragma: no cover - numba
    """Prefetch every cache line of src[rows[k], :] for k in [k0, k1) (clipped to the array)."""
    k1 = min(k1, rows.shape[0])
    for k in range(k0, k1):
        r = rows[k]
        for b in range(0, nb, 16):
            _prefetch(src, r, b)


@njit(inline="always", **_OPTS)
def _w(data, perm, k, use_perm):  # pragma: no cover - numba
    return data[perm[k]] if use_perm else data[k]


@njit(inline="always", **_OPTS)
def gather_accumulate(lo, hi, rows, perm, data, src, o, use_perm, init, b0, b1, pf):  # pragma: no cover - numba
    """o[b0:b1] = init + sum over k in [lo, hi) of w_k * src[rows[k], b0:b1], with
    w_k = data[perm[k]] if use_perm else data[k].

    Eight entries per pass over the batch (then four, then one): the output row is loaded
    and stored once per eight multiply-adds and eight independent rows are in flight.
    With ``pf`` the rows of entries k+8..k+15 are prefetched while k..k+7 are summed.
    """
    for b in range(b0, b1):
        o[b] = init
    k = lo
    while k + 8 <= hi:
        if pf:
            _prefetch_rows(src, rows, k + 8, k + 16, b1)
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
    pf = use_prefetch(a.shape[0], nb)
    for j in prange(n_out):
        gather_accumulate(t_indptr[j], t_indptr[j + 1], t_rows, t_perm, data, a, out[j], True, bias[j], 0, nb, pf)


@njit(parallel=True, **_OPTS)
def spmm_backward(indptr, indices, data, delta, out):  # pragma: no cover - numba
    """out[i, :] = sum_k data[k] * delta[indices[k], :] over row i of W  (out = W @ delta).

    delta: (n_out, B); out: (n_in, B).
    """
    n_in, nb = out.shape
    pf = use_prefetch(delta.shape[0], nb)
    for i in prange(n_in):
        gather_accumulate(indptr[i], indptr[i + 1], indices, indices, data, delta, out[i], False,
                          np.float32(0.0), 0, nb, pf)


@njit(inline="always", **_OPTS)
def sgd_rule(w, v, g, lr, mu, decay, nesterov):  # pragma: no cover - numba
    """(new w, new v) of one momentum-SGD step with coupled L2 (see :class:`optim.SGD`):
    g += decay*w; v = mu*v - lr*g; w += v (Nesterov: w += mu*v - lr*g)."""
    g = g + decay * w
    v = mu * v - lr * g
    step = mu * v - lr * g if nesterov else v
    return w + step, v


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
    pf = use_prefetch(delta.shape[0], nb)
    for i in prange(n_in):
        ai = a[i]
        k = indptr[i]
        hi = indptr[i + 1]
        while k + 4 <= hi:
            if pf:
                _prefetch_rows(delta, indices, k + 8, k + 12, nb)
            g0, g1, g2, g3 = dot4(ai, delta[indices[k]], delta[indices[k + 1]],
                                  delta[indices[k + 2]], delta[indices[k + 3]], 0, nb)
            out[k] = g0
            out[k + 1] = g1
            out[k + 2] = g2
            out[k + 3] = g3
            k += 4
        while k < hi:
            out[k] = dot1(ai, delta[indices[k]], 0, nb)
            k += 1


@njit(parallel=True, **_OPTS)
def sddmm_sgd_update(indptr, indices, a, delta, data, velocity, lr, mu, decay, nesterov):  # pragma: no cover
    """Fused SDDMM gradient + momentum SGD step, without materialising the gradient.

    For each stored k: g = sum_b a[row, b] * delta[col, b] + decay * w;
    v <- mu*v - lr*g;  w <- w + (mu*v - lr*g if nesterov else v)  (:func:`sgd_rule`).
    ``delta`` must already carry the 1/batch factor of the mean loss.
    """
    n_in = indptr.shape[0] - 1
    nb = a.shape[1]
    pf = use_prefetch(delta.shape[0], nb)
    for i in prange(n_in):
        ai = a[i]
        k = indptr[i]
        hi = indptr[i + 1]
        while k + 4 <= hi:
            if pf:
                _prefetch_rows(delta, indices, k + 8, k + 12, nb)
            g0, g1, g2, g3 = dot4(ai, delta[indices[k]], delta[indices[k + 1]],
                                  delta[indices[k + 2]], delta[indices[k + 3]], 0, nb)
            data[k], velocity[k] = sgd_rule(data[k], velocity[k], g0, lr, mu, decay, nesterov)
            data[k + 1], velocity[k + 1] = sgd_rule(data[k + 1], velocity[k + 1], g1, lr, mu, decay, nesterov)
            data[k + 2], velocity[k + 2] = sgd_rule(data[k + 2], velocity[k + 2], g2, lr, mu, decay, nesterov)
            data[k + 3], velocity[k + 3] = sgd_rule(data[k + 3], velocity[k + 3], g3, lr, mu, decay, nesterov)
            k += 4
        while k < hi:
            g = dot1(ai, delta[indices[k]], 0, nb)
            data[k], velocity[k] = sgd_rule(data[k], velocity[k], g, lr, mu, decay, nesterov)
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


@njit(**_OPTS)
def transpose_into(x, out):  # pragma: no cover - numba
    """out[f, b] = x[b, f]: a sample-major batch (B, n) into the feature-major (n, B) input
    buffer, in blocks of 64 features (each block's output lines stay in L1 across the
    batch). Serial: it is a small copy, not worth a parallel launch."""
    nb, n = x.shape
    nblk = (n + 63) // 64
    for blk in range(nblk):
        f0 = blk * 64
        f1 = min(n, f0 + 64)
        for b in range(nb):
            xr = x[b]
            for f in range(f0, f1):
                out[f, b] = xr[f]


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
    counter)."""
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
    pf = use_prefetch(a_in.shape[0], nb)
    for j in prange(n_out):
        zr = z[j]
        gather_accumulate(t_indptr[j], t_indptr[j + 1], t_rows, t_perm, data, a_in, zr, True, bias[j], 0, nb, pf)
        _activate_row(zr, a_out[j], keep[j], kind, slope, threshold, scale, key, j * nb, 0, nb)


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
    pf = use_prefetch(delta.shape[0], nb)
    for i in prange(n_in):
        o = out[i]
        gather_accumulate(indptr[i], indptr[i + 1], indices, indices, data, delta, o, False,
                          np.float32(0.0), 0, nb, pf)
        _finish_delta_row(o, z[i], keep[i], kind, slope, scale, use_keep, 0, nb)


@njit(parallel=True, **_OPTS)
def spmm_backward_act_sgd(indptr, indices, data, velocity, delta, a_prev, z, keep, kind, slope, scale, use_keep,
                          lr, mu, decay, nesterov, out, gbias_prev):  # pragma: no cover - numba
    """Backward to the layer below, SDDMM gradient and momentum-SGD update, in one CSR pass.

    Row i of W (n_in, n_out) meets the same gathered rows ``delta[indices[k], :]`` in both
    products, so each is loaded once and used twice:

    * out[i, :] = (W @ delta)[i, :] * f'(z[i, :]) * mask * scale, with W *before* the update
      (each w_k is read before it is overwritten, and only row i's thread touches it);
    * g_k = a_prev[i, :] . delta[indices[k], :]; then the rule of
      :func:`sddmm_sgd_update` on data[k], velocity[k];
    * gbias_prev[i] = sum_b out[i, b], the bias gradient of the layer below.

    delta: (n_out, B) with the 1/batch factor; a_prev, z, keep, out: (n_in, B).
    """
    n_in, nb = out.shape
    pf = use_prefetch(delta.shape[0], nb)
    for i in prange(n_in):
        ai = a_prev[i]
        o = out[i]
        k = indptr[i]
        hi = indptr[i + 1]
        for b in range(nb):
            o[b] = 0.0
        while k + 4 <= hi:
            if pf:
                _prefetch_rows(delta, indices, k + 8, k + 12, nb)
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
            for b in range(nb):
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
            data[k], velocity[k] = sgd_rule(w0, velocity[k], g0, lr, mu, decay, nesterov)
            data[k + 1], velocity[k + 1] = sgd_rule(w1, velocity[k + 1], g1, lr, mu, decay, nesterov)
            data[k + 2], velocity[k + 2] = sgd_rule(w2, velocity[k + 2], g2, lr, mu, decay, nesterov)
            data[k + 3], velocity[k + 3] = sgd_rule(w3, velocity[k + 3], g3, lr, mu, decay, nesterov)
            k += 4
        while k < hi:
            w0 = data[k]
            d0 = delta[indices[k]]
            g0 = np.float32(0.0)
            for b in range(nb):
                x0 = d0[b]
                o[b] += w0 * x0
                g0 += ai[b] * x0
            data[k], velocity[k] = sgd_rule(w0, velocity[k], g0, lr, mu, decay, nesterov)
            k += 1
        gbias_prev[i] = _finish_delta_row(o, z[i], keep[i], kind, slope, scale, use_keep, 0, nb)


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
