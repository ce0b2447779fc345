"""Forward kernels: the CSR scatter product fused with bias, activation and dropout.

``z[j, :] = bias[j] + sum_i w_ij * a[i, :]`` is computed row by row of ``W``: every stored
``w_ij`` adds ``w_ij * a[i, c0:c1]`` into output row ``j``. The output columns are cut into
blocks whose rows fit in the last-level cache, and each block into one *part* per thread
(:mod:`hpc_sparse.sparse.blocking`): no two threads write one output row, the random
accesses (one output row per stored weight) hit the cache, and the threads stream the input
rows in order, together, so the second reader of a row finds it in the shared cache.

Every ``z[j, b]`` receives its terms in increasing ``i``, one fused multiply-add each,
whatever the parts, chunks or thread count: the result does not depend on any of them.
No value-changing fast-math flag but FMA contraction is used, so the compiled code
computes exactly what is written here whether numba compiled it just now or loaded it
from its cache (``nsz`` was seen to make those two differ).

Activations (kinds: 0 piecewise-linear, 1 tanh, 2 sigmoid; see :mod:`activations`) and the
counter-based dropout hash live here too: numba's on-disk cache only notices edits to the
file that defines a kernel, so a kernel inlines helpers from its own file only.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, fastmath={"contract"}, boundscheck=False)
_U = np.uint64


@njit(inline="always", **_OPTS)
def _scatter_part(seg, p, indices, data, a, z, c0, c1):  # pragma: no cover - numba
    """For each stored w_ij of column part p: z[j, c0:c1] += w_ij * a[i, c0:c1], rows i ascending.

    Positions are unsigned (``_U``): numba then skips its negative-index wrap-around, which
    otherwise costs more than the arithmetic when a chunk is a single cache line."""
    n_in = a.shape[0]
    n = c1 - c0
    u0 = _U(c0)
    for i in range(n_in):
        k = _U(seg[p, i])
        hi = _U(seg[p + 1, i])
        if k == hi:
            continue
        ai = a[i]
        while k + _U(4) <= hi:
            w0 = data[k]
            w1 = data[k + _U(1)]
            w2 = data[k + _U(2)]
            w3 = data[k + _U(3)]
            z0 = z[_U(indices[k])]
            z1 = z[_U(indices[k + _U(1)])]
            z2 = z[_U(indices[k + _U(2)])]
            z3 = z[_U(indices[k + _U(3)])]
            for t in range(n):
                b = u0 + _U(t)
                x = ai[b]
                z0[b] += w0 * x
                z1[b] += w1 * x
                z2[b] += w2 * x
                z3[b] += w3 * x
            k += _U(4)
        while k < hi:
            w0 = data[k]
            z0 = z[_U(indices[k])]
            for t in range(n):
                b = u0 + _U(t)
                z0[b] += w0 * ai[b]
            k += _U(1)


@njit(inline="always", **_OPTS)
def _fill_bias(z, bias, j0, j1, c0, c1):  # pragma: no cover - numba
    for j in range(j0, j1):
        zr = z[j, c0:c1]
        bj = bias[j]
        for b in range(c1 - c0):
            zr[b] = bj


@njit(inline="always", **_OPTS)
def _apply(kind, slope, z):  # pragma: no cover - numba
    if kind == 0:
        return z if z >= 0 else slope * z
    if kind == 1:
        return np.tanh(z)
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-z))


@njit(inline="always", **_OPTS)
def _keep(key, idx, threshold):  # pragma: no cover - numba
    """True with probability 1 - p: splitmix64 of (key + idx), top 32 bits against p*2^32."""
    x = key + np.uint64(idx) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)) >= threshold


@njit(inline="always", **_OPTS)
def _activate_row(zr, ar, kr, kind, slope, threshold, scale, key, base):  # pragma: no cover - numba
    """ar = f(zr) [* mask * scale] over equal-length row slices; kr records the mask.
    ``base`` is the element index of zr[0] in the (width, B) array (the hash counter), so a
    mask does not depend on how the batch is chunked."""
    n = zr.shape[0]
    if threshold > 0 and kind == 0:  # the common case, kept branch-free so LLVM vectorises it
        for b in range(n):
            x = zr[b]
            y = x if x >= 0 else slope * x
            kp = _keep(key, base + b, threshold)
            kr[b] = 1 if kp else 0
            ar[b] = y * scale if kp else np.float32(0.0)
    elif threshold > 0:
        for b in range(n):
            y = _apply(kind, slope, zr[b])
            kp = _keep(key, base + b, threshold)
            kr[b] = 1 if kp else 0
            ar[b] = y * scale if kp else np.float32(0.0)
    elif kind == 0:
        for b in range(n):
            x = zr[b]
            ar[b] = x if x >= 0 else slope * x
    else:
        for b in range(n):
            ar[b] = _apply(kind, slope, zr[b])


@njit(parallel=True, **_OPTS)
def forward_act(seg, bounds, n_blocks, indices, data, a_in, bias, chunk, z, kind, slope, threshold, scale, key,
                a_out, keep):  # pragma: no cover - numba
    """Forward through a hidden layer: z = a_in^T W + bias, then a_out = f(z) with dropout.

    seg (n_parts + 1, n_in), bounds (n_parts + 1,): ``n_blocks`` column blocks of equal part
    counts (:func:`kernels_layout.part_pointers`). a_in: (n_in, B); z, a_out: (n_out, B)
    float32; keep: (n_out, B) uint8, the dropout mask (written only when ``threshold > 0``;
    ``threshold = p * 2**32``, ``scale = 1 / (1 - p)``). ``chunk``: samples per pass (the
    batch, or fewer for very wide layers).
    """
    n_out, nb = z.shape
    per_block = (bounds.shape[0] - 1) // n_blocks
    for c0 in range(0, nb, chunk):
        c1 = min(nb, c0 + chunk)
        for q in range(n_blocks):
            for t in prange(per_block):
                p = q * per_block + t
                j0 = bounds[p]
                j1 = bounds[p + 1]
                _fill_bias(z, bias, j0, j1, c0, c1)
                _scatter_part(seg, p, indices, data, a_in, z, c0, c1)
                for j in range(j0, j1):  # the part's rows are complete and still in cache
                    _activate_row(z[j, c0:c1], a_out[j, c0:c1], keep[j, c0:c1], kind, slope, threshold, scale,
                                  key, j * nb + c0)


@njit(parallel=True, **_OPTS)
def forward_linear(seg, bounds, n_blocks, indices, data, a_in, bias, chunk, z):  # pragma: no cover - numba
    """z = a_in^T W + bias without activation (the output layer); shapes as :func:`forward_act`."""
    n_out, nb = z.shape
    per_block = (bounds.shape[0] - 1) // n_blocks
    for c0 in range(0, nb, chunk):
        c1 = min(nb, c0 + chunk)
        for q in range(n_blocks):
            for t in prange(per_block):
                p = q * per_block + t
                _fill_bias(z, bias, bounds[p], bounds[p + 1], c0, c1)
                _scatter_part(seg, p, indices, data, a_in, z, c0, c1)

