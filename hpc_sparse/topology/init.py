"""Erdős–Rényi sparse initialisation (SET, Mocanu et al. 2018) and weight-value distributions."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from numba import njit

from hpc_sparse.topology.sampling import sample_distinct
from hpc_sparse.topology.structure import NMStructure
from hpc_sparse.topology.structured_growth import structured_random_pattern


def er_probability(n_in: int, n_out: int, epsilon: float) -> float:
    """``p = epsilon * (n_in + n_out) / (n_in * n_out)``, capped at 1 (a dense layer)."""
    return min(1.0, epsilon * (n_in + n_out) / (n_in * n_out))


_VALUE_CHUNK = 1 << 20


def init_values(rng: np.random.Generator, n: int, n_in: int, n_out: int, scheme: str) -> np.ndarray:
    """``n`` float32 weight values for a layer of shape (n_in, n_out).

    he_uniform: U(-L, L), L = sqrt(6 / n_in); xavier_uniform: L = sqrt(6 / (n_in + n_out));
    normal: N(0, 1) / 10 (the original SET code). Fan-in is the dense fan-in, as in the
    paper's code. Drawn in chunks of 2**20 straight into the float32 result (the same
    stream and values as one float64 draw cast to float32, without the 8-byte temporary).
    """
    if scheme == "he_uniform":
        lim = math.sqrt(6.0 / n_in)
    elif scheme == "xavier_uniform":
        lim = math.sqrt(6.0 / (n_in + n_out))
    elif scheme != "normal":
        raise ValueError(f"unknown init {scheme!r}")
    out = np.empty(n, np.float32)
    for lo in range(0, n, _VALUE_CHUNK):
        hi = min(n, lo + _VALUE_CHUNK)
        if scheme == "normal":
            out[lo:hi] = rng.standard_normal(hi - lo) / 10.0
        else:
            out[lo:hi] = rng.uniform(-lim, lim, hi - lo)
    return out


@njit(cache=True)
def _linear_to_csr(lin, n_out, indptr, cols):  # pragma: no cover - numba
    """Sorted linear indices row*n_out+col -> CSR indptr (n_in+1) and column indices."""
    indptr[0] = 0
    row = 0
    for k in range(lin.shape[0]):
        r = lin[k] // n_out
        while row < r:
            row += 1
            indptr[row] = k
        cols[k] = lin[k] - r * n_out
    for i in range(row + 1, indptr.shape[0]):
        indptr[i] = lin.shape[0]


def erdos_renyi(rng: np.random.Generator, n_in: int, n_out: int, epsilon: float, scheme: str,
                structure: NMStructure | None = None) -> sp.csr_matrix:
    """A random (n_in, n_out) CSR weight: each entry present with :func:`er_probability`.

    The nnz is drawn from Binomial(n_in*n_out, p) and the positions as that many distinct
    uniform linear indices, which is the same distribution as independent Bernoulli
    entries, in O(nnz) memory. Values from :func:`init_values`. The CSR arrays are built
    directly in the final index dtype (int32 unless the layer needs int64), with sorted
    indices, so :func:`as_canonical_csr` has nothing to convert.

    With ``structure`` (N:M, see :mod:`hpc_sparse.topology.structure`), epsilon still sets the
    nnz (the same Binomial draw, so the same nnz as the unstructured layer of that seed), and
    the positions are a random pattern satisfying the constraint
    (:func:`structured_random_pattern`); ValueError if the Erdős–Rényi density exceeds N/M.
    """
    total = n_in * n_out
    p = er_probability(n_in, n_out, epsilon)
    nnz = total if p >= 1.0 else int(rng.binomial(total, p))
    idt = np.int64 if max(n_in, n_out, nnz) > np.iinfo(np.int32).max else np.int32
    if structure is not None:
        if p > structure.max_density:
            raise ValueError(f"a {n_in}x{n_out} layer at epsilon {epsilon} has density {p:.4g} > "
                             f"{structure.name} allows ({structure.max_density:.4g}); lower epsilon to at most "
                             f"{max_epsilon(n_in, n_out, structure):.4g}")
        indptr64, cols64 = structured_random_pattern(rng, (n_in, n_out), nnz, structure)
        values = init_values(rng, nnz, n_in, n_out, scheme)
        w = sp.csr_matrix((values, cols64.astype(idt), indptr64.astype(idt)), shape=(n_in, n_out), copy=False)
        w.has_sorted_indices = True
        return w
    lin = sample_distinct(rng, total, nnz)
    indptr = np.empty(n_in + 1, idt)
    cols = np.empty(nnz, idt)
    _linear_to_csr(lin, n_out, indptr, cols)
    del lin
    values = init_values(rng, nnz, n_in, n_out, scheme)
    w = sp.csr_matrix((values, cols, indptr), shape=(n_in, n_out), copy=False)
    if w.indices.dtype != idt:  # scipy may pick another index dtype; keep ours
        w.indices, w.indptr = cols, indptr
    w.has_sorted_indices = True
    return w


def max_epsilon(n_in: int, n_out: int, structure: NMStructure) -> float:
    """The largest epsilon whose Erdős–Rényi density of an (n_in, n_out) layer is <= N/M."""
    return structure.max_density * n_in * n_out / (n_in + n_out)
