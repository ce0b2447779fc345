"""Converting an unstructured CSR weight to N:M or transposable N:M sparsity (pure math).

A weight ``W`` is CSR of shape (n_in, n_out): row i is input neuron i, column j is output
neuron j (``z = a @ W``). With blocks of M consecutive indices (a last, shorter block counts
as zero-padded to M):

- **N:M**: for every output neuron j and input block k, at most N of ``W[kM:kM+M, j]`` are
  non-zero. A *group* is one (k, j) pair.
- **Transposable N:M**: in every M x M block (input block k, output block l), each row and
  each column holds at most N non-zeros (Hubara et al. 2021), so W and W^T are both N:M.

Every function returns a boolean ``keep`` mask aligned with ``w.data`` (CSR order), so the
caller can drop the same entries from any array aligned with it (the momentum). Work is
O(nnz log nnz) over the stored entries only: no dense n_in x n_out array is ever formed, and
empty blocks cost nothing.

Methods:
- :func:`nm_keep`: the N largest magnitudes of every group (optimal for N:M).
- :func:`transposable_greedy_keep`: the paper's fast 2-approximation. Visit a block's entries
  by decreasing magnitude and keep one if its row and its column in the block both still have
  room. Each kept entry can block at most two entries of an optimal mask, each no larger
  than itself, hence retained magnitude >= optimum / 2.
- :func:`transposable_exact_keep`: the maximum retained magnitude, as a linear program (see
  its docstring for why the LP optimum is integral).

Ties in magnitude are broken by CSR position (lower input index, then lower output index,
is kept first), so the greedy methods are deterministic.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

__all__ = ["apply_keep", "block_ids", "entry_rows", "nm_keep", "retained_l1_fraction",
           "transposable_exact_keep", "transposable_greedy_keep"]

# variables per LP of the exact method: blocks are independent, so they are solved in batches,
# which HiGHS finishes sooner than one LP over all of them (the simplex is superlinear)
EXACT_MAX_VARIABLES = 20_000


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 1 <= n < m):
        raise ValueError(f"N:M needs integers 1 <= N < M, got {n}:{m}")


def entry_rows(w: sp.csr_matrix) -> np.ndarray:
    """Row (input) index of every stored entry, in CSR order: int64 (nnz,)."""
    return np.repeat(np.arange(w.shape[0], dtype=np.int64), np.diff(w.indptr))


def block_ids(w: sp.csr_matrix, m: int, transposable: bool) -> np.ndarray:
    """Group id of every stored entry, int64 (nnz,): ``(row // m) * n_out + col`` for N:M (one
    group per output neuron and input block), ``(row // m) * ceil(n_out / m) + col // m`` for
    the transposable form (one id per M x M block)."""
    rows = entry_rows(w)
    cols = w.indices.astype(np.int64)
    if transposable:
        return (rows // m) * (-(-w.shape[1] // m)) + cols // m
    return (rows // m) * w.shape[1] + cols


def _order(w: sp.csr_matrix, blocks: np.ndarray) -> np.ndarray:
    """Entry positions sorted by block, then decreasing magnitude, then CSR position."""
    pos = np.arange(w.nnz, dtype=np.int64)
    return np.lexsort((pos, -np.abs(w.data.astype(np.float64)), blocks))


def nm_keep(w: sp.csr_matrix, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest magnitudes of every (input block, output neuron) group.

    Returns bool (nnz,) aligned with ``w.data``. O(nnz log nnz)."""
    _check_nm(n, m)
    keep = np.zeros(w.nnz, dtype=bool)
    if w.nnz == 0:
        return keep
    blocks = block_ids(w, m, transposable=False)
    order = _order(w, blocks)
    sorted_blocks = blocks[order]
    starts = np.flatnonzero(np.r_[True, sorted_blocks[1:] != sorted_blocks[:-1]])
    first_of_block = np.repeat(starts, np.diff(np.r_[starts, order.size]))
    rank_in_block = np.arange(order.size) - first_of_block
    keep[order[rank_in_block < n]] = True
    return keep


@njit(cache=True)
def _greedy_kernel(order, blocks, rows, cols, n, m, keep):  # pragma: no cover - numba
    """Walk entries sorted by (block, |w| descending); keep an entry while its row and its
    column inside the block both hold fewer than n kept entries."""
    row_used = np.zeros(m, np.int64)
    col_used = np.zeros(m, np.int64)
    current = -1
    for t in range(order.shape[0]):
        p = order[t]
        if blocks[p] != current:
            current = blocks[p]
            row_used[:] = 0
            col_used[:] = 0
        r = rows[p] % m
        c = cols[p] % m
        if row_used[r] < n and col_used[c] < n:
            keep[p] = True
            row_used[r] += 1
            col_used[c] += 1


def transposable_greedy_keep(w: sp.csr_matrix, n: int, m: int) -> np.ndarray:
    """The paper's greedy 2-approximation of the transposable N:M mask of largest retained L1.

    Returns bool (nnz,) aligned with ``w.data``. O(nnz log nnz) (one sort, one O(nnz) pass)."""
    _check_nm(n, m)
    keep = np.zeros(w.nnz, dtype=bool)
    if w.nnz == 0:
        return keep
    blocks = block_ids(w, m, transposable=True)
    _greedy_kernel(_order(w, blocks), blocks, entry_rows(w), w.indices.astype(np.int64), n, m, keep)
    return keep


def _slot_ids(w: sp.csr_matrix, m: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry: its (block, row-in-block) and (block, column-in-block) ids, int64 (nnz,)."""
    rows = entry_rows(w)
    cols = w.indices.astype(np.int64)
    return blocks * m + rows % m, blocks * m + cols % m


def _overloaded(ids: np.ndarray, n: int) -> np.ndarray:
    """Per entry: True if its id occurs more than n times."""
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return counts[inverse] > n


def _solve_batch(weights: np.ndarray, constraints: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """max sum(weights * x), 0 <= x <= 1, s.t. for every ``(members, ids)`` in ``constraints``
    and every id, the x of the entries ``members`` carrying that id sum to <= n. Returns the
    0/1 optimum as bool (k,)."""
    k = weights.size
    mats = []
    for members, ids in constraints:
        uniq, inverse = np.unique(ids, return_inverse=True)
        mats.append(sp.csr_matrix((np.ones(members.size), (inverse, members)), shape=(uniq.size, k)))
    a = sp.vstack(mats, format="csr")
    res = linprog(-weights, A_ub=a, b_ub=np.full(a.shape[0], float(n)), bounds=(0.0, 1.0), method="highs-ds")
    if res.status == 0 and np.all(np.abs(res.x - np.round(res.x)) < 1e-7):
        return res.x > 0.5
    # not expected (a simplex vertex of a totally unimodular system is integral); stay exact anyway
    res = milp(-weights, constraints=LinearConstraint(a, -np.inf, float(n)), integrality=np.ones(k),
               bounds=Bounds(0.0, 1.0))
    if res.status != 0:
        raise RuntimeError(f"the exact transposable N:M solver failed: {res.message}")
    return res.x > 0.5


def transposable_exact_keep(w: sp.csr_matrix, n: int, m: int,
                            max_variables: int = EXACT_MAX_VARIABLES) -> np.ndarray:
    """The transposable N:M mask of largest retained L1, exactly.

    Each M x M block is a bipartite graph (its M rows and M columns are the nodes, its stored
    entries the edges, weighted by |w|); a transposable mask is a subgraph in which every node
    has degree <= N, and the best one is a maximum-weight degree-constrained subgraph (a
    b-matching; equivalently a min-cost flow source -> row -> column -> sink with capacities
    N, 1, N). As an LP, max sum |w_e| x_e s.t. sum over a row's or column's edges <= N,
    0 <= x <= 1: the constraint matrix is the node-edge incidence matrix of a bipartite graph,
    which is totally unimodular, so every vertex of the polytope is 0/1 and HiGHS' dual
    simplex (which ends at a vertex) returns an integral optimum. Integrality is checked; if a
    solution were fractional the same problem is solved as a MILP.

    Only blocks where some row or column holds more than N entries need solving (elsewhere
    everything is kept), and only their overloaded rows/columns need a constraint (the others
    hold at most N entries, so x <= 1 already bounds them). Those blocks are solved together,
    in LPs of at most ``max_variables`` entries (whole blocks each).

    Returns bool (nnz,) aligned with ``w.data``. Ties between optimal masks go to whichever
    optimum HiGHS returns (deterministic for the same input).
    """
    _check_nm(n, m)
    keep = np.ones(w.nnz, dtype=bool)
    if w.nnz == 0:
        return keep
    blocks = block_ids(w, m, transposable=True)
    row_slot, col_slot = _slot_ids(w, m, blocks)
    row_over, col_over = _overloaded(row_slot, n), _overloaded(col_slot, n)
    hard_blocks = np.unique(blocks[row_over | col_over])
    if hard_blocks.size == 0:
        return keep
    entries = np.flatnonzero(np.isin(blocks, hard_blocks))
    entries = entries[np.argsort(blocks[entries], kind="stable")]  # each block's entries together
    eb = blocks[entries]
    block_start = np.flatnonzero(np.r_[True, eb[1:] != eb[:-1]])
    # a block goes to the batch its first entry falls in: whole blocks per LP, each LP at most
    # max_variables + M*M entries
    batch = np.repeat(block_start // max(1, max_variables), np.diff(np.r_[block_start, entries.size]))
    cuts = np.flatnonzero(np.r_[True, batch[1:] != batch[:-1], True])
    mags = np.abs(w.data.astype(np.float64))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        sel = entries[lo:hi]
        local = np.arange(sel.size)
        constraints = [(local[over[sel]], slot[sel][over[sel]])
                       for over, slot in ((row_over, row_slot), (col_over, col_slot)) if over[sel].any()]
        keep[sel] = _solve_batch(mags[sel], constraints, n)
    return keep


def apply_keep(w: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """A new CSR holding the entries of ``w`` where ``keep`` is True (order kept, copies)."""
    rows = entry_rows(w)
    indptr = np.zeros(w.shape[0] + 1, dtype=w.indptr.dtype)
    np.cumsum(np.bincount(rows[keep], minlength=w.shape[0]), out=indptr[1:])
    out = sp.csr_matrix(w.shape, dtype=w.dtype)
    out.data, out.indices, out.indptr = w.data[keep].copy(), w.indices[keep].copy(), indptr
    return out


def retained_l1_fraction(w: sp.csr_matrix, keep: np.ndarray) -> float:
    """sum |w| over kept entries / sum |w| over all (1.0 for an all-zero layer)."""
    mags = np.abs(w.data.astype(np.float64))
    total = mags.sum()
    return float(mags[keep].sum() / total) if total > 0 else 1.0
