"""Forward kernels: the CSR scatter product fused with bias, activation and dropout.

``z[j, :] = bias[j] + sum_i w_ij * a[i, :]`` is computed row by row of ``W``: every stored
``w_ij`` adds ``w_ij * a[i, c0:c1]`` into output row ``j``. The output columns are cut into
blocks whose rows fit in the last-level cache, and each block into one *part* per thread
(:mod:`hpc_sparse.sparse.blocking`): no two threads write one output row, the random
accesses (one output row per stored weight) hit the cache, and the threads stream the input
rows in order, together, so the second reader of a row finds it in the shared cache.

z is accumulated in float32 in a block-sized scratch (``acc``, rows relative to the block,
columns relative to the chunk) that stays in the cache; once a part's rows are complete they
are activated into ``a_out`` (float32 or bfloat16, see :mod:`kernels_elementwise`) and z
leaves behind only what the backward pass needs (``zinfo``: its sign bits, or for tanh and
sigmoid its values). The dropout mask is a hash, recomputed by the backward pass.

Every ``z[j, b]`` receives its terms in increasing ``i``, one fused multiply-add each,
whatever the parts, chunks or thread count: the result does not depend on any of them.
No value-changing fast-math flag but FMA contraction is used, so the compiled code
computes exactly what is written here whether numba compiled it just now or loaded it
from its cache (``nsz`` was seen to make those two differ).

Kernels inline helpers from this file and from :mod:`kernels_elementwise` only.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hpc_sparse.sparse.kernels_elementwise import activate, keep, load, put_z, stored

_OPTS = dict(cache=True, nogil=True, fastmath={"contract"}, boundscheck=False)
_U = np.uint64


@njit(inline="always", **_OPTS)
def _scatter_part(seg, p, indices, data, a, acc, r0, ac0, c0, c1):  # pragma: no cover - numba
    """For each stored w_ij of column part p: acc[j - r0, ac0:ac0 + n] += w_ij * a[i, c0:c1],
    rows i ascending (n = c1 - c0).

    Positions are unsigned (``_U``): numba then skips its negative-index wrap-around, which
    otherwise costs more than the arithmetic when a chunk is a single cache line."""
    n_in = a.shape[0]
    n = c1 - c0
    u0 = _U(c0)
    ua = _U(ac0)
    ur = _U(r0)
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
            z0 = acc[_U(indices[k]) - ur]
            z1 = acc[_U(indices[k + _U(1)]) - ur]
            z2 = acc[_U(indices[k + _U(2)]) - ur]
            z3 = acc[_U(indices[k + _U(3)]) - ur]
            for t in range(n):
                b = _U(t)
                x = load(ai[u0 + b])
                z0[ua + b] += w0 * x
                z1[ua + b] += w1 * x
                z2[ua + b] += w2 * x
                z3[ua + b] += w3 * x
            k += _U(4)
        while k < hi:
            w0 = data[k]
            z0 = acc[_U(indices[k]) - ur]
            for t in range(n):
                b = _U(t)
                z0[ua + b] += w0 * load(ai[u0 + b])
            k += _U(1)


@njit(inline="always", **_OPTS)
def _fill_bias(acc, bias, j0, j1, r0, ac0, n):  # pragma: no cover - numba
    for j in range(j0, j1):
        zr = acc[j - r0]
        bj = bias[j]
        for b in range(n):
            zr[ac0 + b] = bj


@njit(inline="always", **_OPTS)
def _activate_row(zr, ar, kind, slope, threshold, scale, key, base):  # pragma: no cover - numba
    """ar = f(zr) [* mask * scale] over equal-length row slices. ``base`` is the element index
    of zr[0] in the (width, B) array (the hash counter), so a mask does not depend on how the
    batch is chunked."""
    n = zr.shape[0]
    zero = np.float32(0.0)
    if threshold > 0 and kind == 0:  # the common case, kept branch-free so LLVM vectorises it
        for b in range(n):
            x = zr[b]
            y = x if x >= 0 else slope * x
            ar[b] = stored(y * scale if keep(key, base + b, threshold) else zero, ar)
    elif threshold > 0:
        for b in range(n):
            y = activate(kind, slope, zr[b])
            ar[b] = stored(y * scale if keep(key, base + b, threshold) else zero, ar)
    elif kind == 0:
        for b in range(n):
            x = zr[b]
            ar[b] = stored(x if x >= 0 else slope * x, ar)
    else:
        for b in range(n):
            ar[b] = stored(activate(kind, slope, zr[b]), ar)


@njit(parallel=True, **_OPTS)
def forward_act(seg, bounds, n_blocks, indices, data, a_in, bias, chunk, acc, kind, slope, threshold, scale, key,
                a_out, zinfo):  # pragma: no cover - numba
    """Forward through a hidden layer: z = a_in^T W + bias, then a_out = f(z) with dropout.

    seg (n_parts + 1, n_in), bounds (n_parts + 1,): ``n_blocks`` column blocks of equal part
    counts (:func:`kernels_layout.part_pointers`). a_in (n_in, B) and a_out (n_out, B): float32
    or bfloat16 bits (uint16), each its own. acc: float32 scratch of at least (rows of the
    largest block, chunk). zinfo: what the backward pass needs of z, (n_out, ceil(B / 8))
    uint8 sign bits for kind 0, else (n_out, B) values (:mod:`kernels_elementwise`).
    ``threshold = p * 2**32`` (0: no dropout), ``scale = 1 / (1 - p)``; ``chunk``: samples per
    pass (the batch, or fewer for very wide layers).
    """
    n_out, nb = a_out.shape
    per_block = (bounds.shape[0] - 1) // n_blocks
    for c0 in range(0, nb, chunk):
        c1 = min(nb, c0 + chunk)
        for q in range(n_blocks):
            r0 = bounds[q * per_block]
            for t in prange(per_block):
                p = q * per_block + t
                j0 = bounds[p]
                j1 = bounds[p + 1]
                _fill_bias(acc, bias, j0, j1, r0, 0, c1 - c0)
                _scatter_part(seg, p, indices, data, a_in, acc, r0, 0, c0, c1)
                for j in range(j0, j1):  # the part's rows are complete and still in cache
                    zr = acc[j - r0, :c1 - c0]
                    _activate_row(zr, a_out[j, c0:c1], kind, slope, threshold, scale, key, j * nb + c0)
                    put_z(zinfo, j, c0, zr)


@njit(parallel=True, **_OPTS)
def forward_linear(seg, bounds, n_blocks, indices, data, a_in, bias, chunk, z):  # pragma: no cover - numba
    """z = a_in^T W + bias without activation (the output layer): z (n_out, B) float32 is its
    own accumulator; other shapes as :func:`forward_act`."""
    n_out, nb = z.shape
    per_block = (bounds.shape[0] - 1) // n_blocks
    for c0 in range(0, nb, chunk):
        c1 = min(nb, c0 + chunk)
        for q in range(n_blocks):
            for t in prange(per_block):
                p = q * per_block + t
                _fill_bias(z, bias, bounds[p], bounds[p + 1], 0, c0, c1 - c0)
                _scatter_part(seg, p, indices, data, a_in, z, 0, c0, c0, c1)
