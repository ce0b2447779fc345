"""Uniform sampling of distinct positions in a sparse matrix in O(k), never O(n_in * n_out)."""

from __future__ import annotations

import numpy as np
from numba import njit


def sample_distinct(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    """``k`` distinct integers drawn uniformly from ``[0, population)``, sorted ascending (int64).

    Memory and time are O(k) (O(population) only when k > population / 2, where
    population < 2k): rejection of duplicates, or sampling the complement.
    """
    if k < 0 or k > population:
        raise ValueError(f"cannot draw {k} distinct values from {population}")
    if k == population:
        return np.arange(population, dtype=np.int64)
    if k > population // 2:
        drop = sample_distinct(rng, population, population - k)
        keep = np.ones(population, bool)
        keep[drop] = False
        return np.flatnonzero(keep).astype(np.int64)
    got = np.empty(0, np.int64)
    while got.size < k:
        extra = int((k - got.size) * 1.1) + 16
        got = np.union1d(got, rng.integers(0, population, size=extra, dtype=np.int64))
    if got.size > k:  # drop a uniformly random surplus: the survivors stay a uniform k-subset
        got = np.sort(rng.choice(got, size=k, replace=False))
    return got


def free_slots_to_positions(indptr: np.ndarray, indices: np.ndarray, n_out: int,
                            ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ranks among the *empty* slots (row-major order) of a CSR pattern to (rows, cols).

    ``indptr``/``indices`` describe the occupied slots (sorted within rows). The t-th free
    column of a row is ``t + m`` where ``m`` counts occupied columns ``c_q`` (q-th in the
    row) with ``c_q - q <= t``; that count is a binary search on a non-decreasing key,
    done for all ranks at once. Sorted ``ranks`` give row-major sorted positions.
    """
    n_in = indptr.shape[0] - 1
    indptr64 = indptr.astype(np.int64)
    free_before = np.arange(n_in + 1, dtype=np.int64) * n_out - indptr64
    rows = np.searchsorted(free_before, ranks, side="right") - 1
    t = ranks - free_before[rows]
    row_of = np.repeat(np.arange(n_in, dtype=np.int64), np.diff(indptr64))
    pos_in_row = np.arange(indices.shape[0], dtype=np.int64) - indptr64[row_of]
    key = row_of * (n_out + 1) + (indices.astype(np.int64) - pos_in_row)
    m = np.searchsorted(key, rows * (n_out + 1) + t, side="right") - indptr64[rows]
    return rows, t + m


@njit(cache=True)
def merge_rows(indptr, indices, data, velocity, new_rows, new_cols, new_data, n_in,
               out_indptr, out_indices, out_data, out_velocity):  # pragma: no cover - numba
    """Merge new entries (sorted row-major, not present in the pattern) into a CSR pattern.

    New entries get zero velocity. Output arrays are sized nnz + len(new_rows).
    """
    p = 0
    q = 0
    nq = new_rows.shape[0]
    out_indptr[0] = 0
    for i in range(n_in):
        k = indptr[i]
        end = indptr[i + 1]
        while k < end or (q < nq and new_rows[q] == i):
            take_new = q < nq and new_rows[q] == i and (k >= end or new_cols[q] < indices[k])
            if take_new:
                out_indices[p] = new_cols[q]
                out_data[p] = new_data[q]
                out_velocity[p] = 0.0
                q += 1
            else:
                out_indices[p] = indices[k]
                out_data[p] = data[k]
                out_velocity[p] = velocity[k]
                k += 1
            p += 1
        out_indptr[i + 1] = p
