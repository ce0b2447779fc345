"""Uniform sampling of distinct positions in a sparse matrix in O(k), never O(n_in * n_out)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _dedup_sorted(x):  # pragma: no cover - numba
    """Remove repeats from sorted ``x`` in place; returns the number of distinct values."""
    n = x.shape[0]
    if n == 0:
        return 0
    m = 1
    for i in range(1, n):
        if x[i] != x[m - 1]:
            x[m] = x[i]
            m += 1
    return m


@njit(cache=True)
def _compact(x, keep):  # pragma: no cover - numba
    """Move the entries of ``x`` where ``keep`` is True to its front, in order; returns their count."""
    m = 0
    for i in range(x.shape[0]):
        if keep[i]:
            x[m] = x[i]
            m += 1
    return m


def sample_distinct(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    """``k`` distinct integers drawn uniformly from ``[0, population)``, sorted ascending (int64).

    Memory and time are O(k) (O(population) only when k > population / 2, where
    population < 2k): rejection of duplicates, or sampling the complement.

    Draws ``int(1.1 * missing) + 16`` integers at a time, keeps the distinct ones, and
    finally drops a uniformly random surplus with ``rng.choice`` (the survivors stay a
    uniform k-subset). Sorting and de-duplication happen in place (about 9 bytes per
    value; ``np.union1d`` needed three copies and was ~15x slower); the drop marks the
    chosen positions in a bool mask and compacts in place. The RNG calls and the result
    are exactly those of the straightforward ``union1d`` / ``np.sort(rng.choice(got, k))``
    formulation.
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
        draws = rng.integers(0, population, size=extra, dtype=np.int64)
        if got.size:
            draws = np.concatenate((got, draws))
        del got
        draws.sort()
        got = draws[:_dedup_sorted(draws)]
        del draws
    if got.size > k:
        # rng.choice(n) draws the same positions as rng.choice(got) (same RNG calls);
        # got is sorted and distinct, so keeping the chosen positions in order equals
        # np.sort(got[idx])
        idx = rng.choice(got.size, size=k, replace=False)
        keep = np.zeros(got.size, bool)
        keep[idx] = True
        del idx
        got = got[:_compact(got, keep)]
    return got


@njit(cache=True)
def _free_slots_kernel(indptr, indices, n_out, ranks, rows, cols):  # pragma: no cover - numba
    n_in = indptr.shape[0] - 1
    for q in range(ranks.shape[0]):
        r = ranks[q]
        # row: the last i with free_before[i] = i*n_out - indptr[i] <= r (non-decreasing in i)
        lo, hi = 0, n_in
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if np.int64(mid) * n_out - indptr[mid] <= r:
                lo = mid
            else:
                hi = mid - 1
        i = lo
        t = r - (np.int64(i) * n_out - indptr[i])
        # m = #occupied columns c_p (p-th in the row) with c_p - p <= t (non-decreasing key)
        a, b = indptr[i], indptr[i + 1]
        base = a
        while a < b:
            mid = (a + b) // 2
            if indices[mid] - (mid - base) <= t:
                a = mid + 1
            else:
                b = mid
        rows[q] = i
        cols[q] = t + (a - base)


def free_slots_to_positions(indptr: np.ndarray, indices: np.ndarray, n_out: int,
                            ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ranks among the *empty* slots (row-major order) of a CSR pattern to (rows, cols).

    ``indptr``/``indices`` describe the occupied slots (sorted within rows). The t-th free
    column of a row is ``t + m`` where ``m`` counts occupied columns ``c_q`` (q-th in the
    row) with ``c_q - q <= t``; that count is a binary search on a non-decreasing key.
    Per rank: a binary search for the row, then one inside the row; O(len(ranks) log nnz)
    time and no O(nnz) scratch. Sorted ``ranks`` give row-major sorted positions (int64).
    """
    ranks = np.ascontiguousarray(ranks, np.int64)
    rows = np.empty(ranks.shape[0], np.int64)
    cols = np.empty(ranks.shape[0], np.int64)
    if ranks.shape[0] > 1 and bool(np.all(ranks[1:] >= ranks[:-1])):
        _free_slots_walk(indptr, indices, np.int64(n_out), ranks, rows, cols)
    else:
        _free_slots_kernel(indptr, indices, np.int64(n_out), ranks, rows, cols)
    return rows, cols


@njit(cache=True)
def _free_slots_walk(indptr, indices, n_out, ranks, rows, cols):  # pragma: no cover - numba
    """:func:`_free_slots_kernel` for ascending ranks: one merge-like walk over rows and
    their occupied columns, O(n_in + nnz + len(ranks)), no binary searches."""
    n_in = indptr.shape[0] - 1
    i = 0
    base = indptr[0]
    p = base
    for q in range(ranks.shape[0]):
        r = ranks[q]
        while i < n_in - 1 and np.int64(i + 1) * n_out - indptr[i + 1] <= r:
            i += 1
            base = indptr[i]
            p = base
        t = r - (np.int64(i) * n_out - indptr[i])
        end = indptr[i + 1]
        while p < end and indices[p] - (p - base) <= t:
            p += 1
        rows[q] = i
        cols[q] = t + (p - base)


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
