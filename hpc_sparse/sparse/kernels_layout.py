"""Layout kernels: where each column part starts in every CSR row, and the input transpose.

Activations are stored *feature-major*, ``(width, batch)`` C-contiguous, so one neuron's
values over the batch are one contiguous vector that the compute kernels
(:mod:`kernels_forward`, :mod:`kernels_backward`) stream with vector instructions.

A layer's CSR ``W (n_in, n_out)`` has its columns split into parts (see
:mod:`hpc_sparse.sparse.blocking`); :func:`part_pointers` finds, for every row, the first
stored entry of each part. Indices are sorted within rows, so each part's entries of a row
are one contiguous run ``seg[p, i] .. seg[p + 1, i]``.

numba's on-disk cache only notices edits to the file that defines a kernel, so every
kernel here uses only helpers defined in this file and in :mod:`kernels_elementwise`.
"""

from __future__ import annotations

from numba import njit, prange

from hpc_sparse.sparse.kernels_elementwise import stored

_OPTS = dict(cache=True, nogil=True, boundscheck=False)


@njit(parallel=True, **_OPTS)
def part_pointers(indptr, indices, bounds, seg):  # pragma: no cover - numba
    """Fill ``seg (n_parts + 1, n_in)``: ``seg[p, i]`` is the CSR position of row i's first entry
    with column ``>= bounds[p]`` (``bounds (n_parts + 1,)`` ascending, ``bounds[0] = 0``), and
    ``seg[n_parts, i] = indptr[i + 1]``. O(nnz + n_in * n_parts)."""
    n_in = indptr.shape[0] - 1
    n_parts = bounds.shape[0] - 1
    for i in prange(n_in):
        k = indptr[i]
        hi = indptr[i + 1]
        for p in range(n_parts):
            lim = bounds[p]
            while k < hi and indices[k] < lim:
                k += 1
            seg[p, i] = k
        seg[n_parts, i] = hi


@njit(**_OPTS)
def transpose_into(x, out):  # pragma: no cover - numba
    """out[f, b] = x[b, f]: a sample-major float32 batch (B, n) into the feature-major (n, B)
    input buffer (float32, or bfloat16 bits rounded to nearest even), in blocks of 64 features
    (each block's output lines stay in L1 across the batch). Serial: it is a small copy, not
    worth a parallel launch."""
    nb, n = x.shape
    nblk = (n + 63) // 64
    for blk in range(nblk):
        f0 = blk * 64
        f1 = min(n, f0 + 64)
        for b in range(nb):
            xr = x[b]
            for f in range(f0, f1):
                out[f, b] = stored(xr[f], out)
