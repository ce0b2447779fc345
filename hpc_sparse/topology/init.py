"""Erdős–Rényi sparse initialisation (SET, Mocanu et al. 2018) and weight-value distributions."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from hpc_sparse.topology.sampling import sample_distinct


def er_probability(n_in: int, n_out: int, epsilon: float) -> float:
    """``p = epsilon * (n_in + n_out) / (n_in * n_out)``, capped at 1 (a dense layer)."""
    return min(1.0, epsilon * (n_in + n_out) / (n_in * n_out))


def init_values(rng: np.random.Generator, n: int, n_in: int, n_out: int, scheme: str) -> np.ndarray:
    """``n`` float32 weight values for a layer of shape (n_in, n_out).

    he_uniform: U(-L, L), L = sqrt(6 / n_in); xavier_uniform: L = sqrt(6 / (n_in + n_out));
    normal: N(0, 1) / 10 (the original SET code). Fan-in is the dense fan-in, as in the
    paper's code.
    """
    if scheme == "he_uniform":
        lim = math.sqrt(6.0 / n_in)
    elif scheme == "xavier_uniform":
        lim = math.sqrt(6.0 / (n_in + n_out))
    elif scheme == "normal":
        return (rng.standard_normal(n) / 10.0).astype(np.float32)
    else:
        raise ValueError(f"unknown init {scheme!r}")
    return rng.uniform(-lim, lim, n).astype(np.float32)


def erdos_renyi(rng: np.random.Generator, n_in: int, n_out: int, epsilon: float, scheme: str) -> sp.csr_matrix:
    """A random (n_in, n_out) CSR weight: each entry present with :func:`er_probability`.

    The nnz is drawn from Binomial(n_in*n_out, p) and the positions as that many distinct
    uniform linear indices, which is the same distribution as independent Bernoulli
    entries, in O(nnz) memory. Values from :func:`init_values`.
    """
    total = n_in * n_out
    p = er_probability(n_in, n_out, epsilon)
    nnz = total if p >= 1.0 else int(rng.binomial(total, p))
    lin = sample_distinct(rng, total, nnz)
    rows, cols = np.divmod(lin, n_out)
    counts = np.bincount(rows, minlength=n_in)
    indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    idt = np.int64 if max(n_in, n_out, nnz) > np.iinfo(np.int32).max else np.int32
    values = init_values(rng, nnz, n_in, n_out, scheme)
    w = sp.csr_matrix((values, cols.astype(idt), indptr.astype(idt)), shape=(n_in, n_out))
    w.has_sorted_indices = True
    return w
