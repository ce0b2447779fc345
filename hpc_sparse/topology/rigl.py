"""RigL growth (Evci et al. 2020): regrow where the loss gradient of *missing* connections is largest.

The dense gradient of a layer is ``G = a @ delta^T`` (n_in, n_out), with ``a`` (n_in, B)
the layer input and ``delta`` (n_out, B) the gradient of the mean loss w.r.t. its
pre-activation. It is never formed whole: rows are scored in blocks of at most
``block_rows`` (and about 2**24 elements), occupied slots are excluded, and only the
running top-``count`` candidates are kept. Under MPI each rank scores its own batch;
the ranks exchange just these candidate lists and :func:`select_growth` combines them
identically everywhere.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from hpc_sparse.topology.evolution import Pruned

_MAX_BLOCK_ELEMENTS = 1 << 24


def drop_fraction(epoch: int, epochs: int, zeta: float, end_fraction: float) -> float:
    """RigL's cosine-decayed drop fraction after ``epoch`` (0-based):
    ``zeta/2 * (1 + cos(pi * (epoch+1) / T))`` with ``T = end_fraction * epochs``, 0 once
    ``epoch + 1 >= T``."""
    t_end = end_fraction * epochs
    progress = epoch + 1
    if progress >= t_end:
        return 0.0
    return 0.5 * zeta * (1.0 + math.cos(math.pi * progress / t_end))


Exclude = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def candidates(pruned: Pruned, a: np.ndarray, delta: np.ndarray, count: int,
               block_rows: int = 256, exclude: Exclude | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` empty slots with the largest |gradient|, from one rank's batch.

    Returns (linear indices row*n_out+col (int64), gradient values (float32)), unsorted.
    Scratch memory is one block of at most ``block_rows`` x n_out floats. ``exclude(r0, r1)``,
    if given, returns further slots of rows [r0, r1) that may not grow, as (rows - r0, cols)
    (e.g. those whose N:M group is full).
    """
    n_in, n_out = pruned.shape
    rows_per_block = max(1, min(block_rows, _MAX_BLOCK_ELEMENTS // max(n_out, 1)))
    best_lin = np.empty(0, np.int64)
    best_val = np.empty(0, np.float32)
    if count <= 0:
        return best_lin, best_val
    for r0 in range(0, n_in, rows_per_block):
        r1 = min(n_in, r0 + rows_per_block)
        block = a[r0:r1] @ delta.T  # (rows, n_out) float32
        lo, hi = pruned.indptr[r0], pruned.indptr[r1]
        occ_rows = np.repeat(np.arange(r1 - r0), np.diff(pruned.indptr[r0:r1 + 1]))
        score = np.abs(block)
        score[occ_rows, pruned.indices[lo:hi]] = -1.0  # occupied slots never win
        if exclude is not None:
            ex_rows, ex_cols = exclude(r0, r1)
            score[ex_rows, ex_cols] = -1.0
        flat = score.ravel()
        k = min(count, flat.size)
        top = np.argpartition(flat, flat.size - k)[flat.size - k:]
        top = top[flat[top] >= 0]
        best_lin = np.concatenate([best_lin, (top // n_out + r0) * n_out + top % n_out])
        best_val = np.concatenate([best_val, block.ravel()[top]])
        if best_lin.size > 2 * count:
            best_lin, best_val = _top(best_lin, best_val, count)
    return _top(best_lin, best_val, count)


def _top(lin: np.ndarray, val: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``count`` by |val|, ties broken by the smaller linear index (deterministic)."""
    if lin.size <= count:
        return lin, val
    order = np.lexsort((lin, -np.abs(val)))[:count]
    return lin[order], val[order]


def select_growth(lin: np.ndarray, val: np.ndarray, count: int, n_ranks: int = 1) -> np.ndarray:
    """Combine candidate lists (concatenated over ranks) into ``count`` sorted linear indices.

    Values of the same slot from several ranks are summed and divided by ``n_ranks``
    (the mean gradient, with a rank that did not list a slot counting as 0). The result
    depends only on the concatenated input, so every rank that sees the same lists picks
    the same slots.
    """
    if lin.size == 0 or count <= 0:
        return np.empty(0, np.int64)
    return np.sort(rank_candidates(lin, val, n_ranks)[:count])


def rank_candidates(lin: np.ndarray, val: np.ndarray, n_ranks: int = 1) -> np.ndarray:
    """Every distinct slot of the concatenated candidate lists, best first: by decreasing
    |mean gradient| (as in :func:`select_growth`), ties by the smaller linear index."""
    uniq, inv = np.unique(lin, return_inverse=True)
    total = np.zeros(uniq.size, np.float64)
    np.add.at(total, inv, val.astype(np.float64))
    return uniq[np.lexsort((uniq, -np.abs(total / n_ranks)))]
