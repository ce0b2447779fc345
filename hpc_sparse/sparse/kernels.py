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

All kernels fill a caller-owned ``out`` buffer; none allocates O(nnz) or O(n_in*n_out).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)


@njit(parallel=True, **_OPTS)
def spmm_forward(t_indptr, t_rows, t_perm, data, a, bias, out):  # pragma: no cover - numba
    """out[j, :] = bias[j] + sum_k data[t_perm[k]] * a[t_rows[k], :] over column j of W.

    a: (n_in, B) float32; out: (n_out, B) float32.
    """
    n_out, nb = out.shape
    for j in prange(n_out):
        bj = bias[j]
        for b in range(nb):
            out[j, b] = bj
        for k in range(t_indptr[j], t_indptr[j + 1]):
            w = data[t_perm[k]]
            r = t_rows[k]
            for b in range(nb):
                out[j, b] += w * a[r, b]


@njit(parallel=True, **_OPTS)
def spmm_backward(indptr, indices, data, delta, out):  # pragma: no cover - numba
    """out[i, :] = sum_k data[k] * delta[indices[k], :] over row i of W  (out = W @ delta).

    delta: (n_out, B); out: (n_in, B).
    """
    n_in, nb = out.shape
    for i in prange(n_in):
        for b in range(nb):
            out[i, b] = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            w = data[k]
            c = indices[k]
            for b in range(nb):
                out[i, b] += w * delta[c, b]


@njit(parallel=True, **_OPTS)
def sddmm(indptr, indices, a, delta, out):  # pragma: no cover - numba
    """Sampled dense-dense product: out[k] = sum_b a[row(k), b] * delta[indices[k], b].

    The weight gradient at the stored positions only. a: (n_in, B); delta: (n_out, B);
    out: (nnz,) float32.
    """
    n_in = indptr.shape[0] - 1
    nb = a.shape[1]
    for i in prange(n_in):
        for k in range(indptr[i], indptr[i + 1]):
            c = indices[k]
            acc = np.float32(0.0)
            for b in range(nb):
                acc += a[i, b] * delta[c, b]
            out[k] = acc


@njit(parallel=True, **_OPTS)
def sddmm_sgd_update(indptr, indices, a, delta, data, velocity, lr, mu, decay, nesterov):  # pragma: no cover
    """Fused SDDMM gradient + momentum SGD step, without materialising the gradient.

    For each stored k: g = sum_b a[row, b] * delta[col, b] + decay * w  (L2 weight decay);
    v <- mu*v - lr*g;  w <- w + (mu*v - lr*g if nesterov else v).
    ``delta`` must already carry the 1/batch factor of the mean loss.
    """
    n_in = indptr.shape[0] - 1
    nb = a.shape[1]
    for i in prange(n_in):
        for k in range(indptr[i], indptr[i + 1]):
            c = indices[k]
            g = np.float32(0.0)
            for b in range(nb):
                g += a[i, b] * delta[c, b]
            w = data[k]
            g += decay * w
            v = mu * velocity[k] - lr * g
            velocity[k] = v
            data[k] = w + (mu * v - lr * g if nesterov else v)


@njit(**_OPTS)
def dense_sgd_update(grad, data, velocity, lr, mu, decay, nesterov):  # pragma: no cover - numba
    """Momentum SGD on a dense vector (biases), same rule as :func:`sddmm_sgd_update`."""
    for k in range(data.shape[0]):
        w = data[k]
        g = grad[k] + decay * w
        v = mu * velocity[k] - lr * g
        velocity[k] = v
        data[k] = w + (mu * v - lr * g if nesterov else v)


@njit(parallel=True, **_OPTS)
def row_sums(x, out):  # pragma: no cover - numba
    """out[j] = sum_b x[j, b]; x: (n, B). Used for bias gradients."""
    n, nb = x.shape
    for j in prange(n):
        acc = np.float32(0.0)
        for b in range(nb):
            acc += x[j, b]
        out[j] = acc


@njit(cache=True)
def build_transpose(n_out, indptr, indices, t_indptr, t_rows, t_perm):  # pragma: no cover - numba
    """Counting sort of CSR (row-major) entries into column order, O(nnz + n_out).

    Fills t_indptr (n_out+1), t_rows (nnz) and t_perm (nnz, CSR positions). Rows stay
    ascending within each column because rows are visited in order.
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
