"""N:M and transposable N:M sparsity constraints on a CSR weight: definition, O(nnz) checker,
repair after importance pruning, and mask diversity (Hubara et al. 2021).

A weight ``W`` is stored as CSR of shape (n_in, n_out): row i is input neuron i, column j is
output neuron j, and ``z = a @ W``.

- **N:M** (``transposable=False``): for every output neuron j and every block of M consecutive
  input indices [kM, kM+M), at most N of ``W[kM:kM+M, j]`` are non-zero. A *column group* is
  such a (k, j) pair.
- **Transposable N:M**: in addition, for every input neuron i and every block of M consecutive
  output indices [lM, lM+M), at most N of ``W[i, lM:lM+M]`` are non-zero (a *row group*). Both
  together say: in every M x M block, each row and each column holds at most N non-zeros, so
  ``W`` is N:M along its input and ``W^T`` along its input too.
- **Padding**: when n_in (or n_out) is not a multiple of M, the last block is zero-padded to M:
  it may hold at most N non-zeros among its real slots, exactly like a full block.

Everything here is O(nnz) or O(nnz log nnz) plus O(n_out) scratch, never O(n_in * n_out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from numba import njit

__all__ = ["NMStructure", "check_structure", "column_keys", "count_violations", "enforce_structure",
           "full_group_slots", "log10_mask_diversity", "row_keys", "square_block_masks", "block_masks",
           "violations"]

# the exact transposable count's DP has C(c + N, N) states; beyond this it is reported as n/a
MAX_DP_STATES = 200_000


@dataclass(frozen=True)
class NMStructure:
    """An N:M constraint (``1 <= n < m``); ``transposable`` adds the row groups (see module doc)."""

    n: int
    m: int
    transposable: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.n < self.m:
            raise ValueError(f"N:M needs 1 <= N < M, got {self.n}:{self.m}")

    @property
    def name(self) -> str:
        return f"{'transposable ' if self.transposable else ''}{self.n}:{self.m}"

    @property
    def max_density(self) -> float:
        """N/M: the largest density a layer of full blocks can have under the constraint."""
        return self.n / self.m


def column_keys(rows: np.ndarray, cols: np.ndarray, n_out: int, m: int) -> np.ndarray:
    """Column-group id ``(row // m) * n_out + col`` of each entry (int64)."""
    return (rows.astype(np.int64) // m) * n_out + cols.astype(np.int64)


def row_keys(rows: np.ndarray, cols: np.ndarray, n_out: int, m: int) -> np.ndarray:
    """Row-group id ``row * ceil(n_out / m) + col // m`` of each entry (int64)."""
    return rows.astype(np.int64) * (-(-n_out // m)) + cols.astype(np.int64) // m


@njit(cache=True)
def _column_group_violations(indptr, indices, m, n, scratch):  # pragma: no cover - numba
    """Column groups with more than n entries: one pass per row block, scratch (n_out,) int64
    counters reset by a second pass over the same entries (O(nnz) in total)."""
    n_in = indptr.shape[0] - 1
    bad = 0
    for k0 in range(0, n_in, m):
        k1 = min(n_in, k0 + m)
        for p in range(indptr[k0], indptr[k1]):
            j = indices[p]
            scratch[j] += 1
            if scratch[j] == n + 1:
                bad += 1
        for p in range(indptr[k0], indptr[k1]):
            scratch[indices[p]] = 0
    return bad


@njit(cache=True)
def _row_group_violations(indptr, indices, m, n):  # pragma: no cover - numba
    """Row groups with more than n entries; rows must hold sorted column indices."""
    bad = 0
    for i in range(indptr.shape[0] - 1):
        cur = -1
        run = 0
        for p in range(indptr[i], indptr[i + 1]):
            b = indices[p] // m
            if b != cur:
                cur = b
                run = 0
            run += 1
            if run == n + 1:
                bad += 1
    return bad


def count_violations(indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int], s: NMStructure
                     ) -> tuple[int, int]:
    """(column groups, row groups) holding more than ``s.n`` entries, in O(nnz) + O(n_out) scratch.

    Parameters: a CSR pattern of ``shape`` (n_in, n_out) with sorted column indices per row.
    The row-group count (violations of N:M on ``W^T``) is computed whatever
    ``s.transposable`` says; plain N:M only requires the first number to be 0.
    """
    scratch = np.zeros(int(shape[1]), np.int64)
    cols = _column_group_violations(indptr, indices, np.int64(s.m), np.int64(s.n), scratch)
    rows = _row_group_violations(indptr, indices, np.int64(s.m), np.int64(s.n))
    return int(cols), int(rows)


def violations(w: sp.csr_matrix, s: NMStructure) -> int:
    """Groups of ``w`` (n_in, n_out) that hold more than ``s.n`` entries under ``s`` (row groups
    count only for the transposable form); 0 means ``w`` satisfies it. O(nnz)."""
    if not w.has_sorted_indices:
        w = w.sorted_indices()
    cols, rows = count_violations(w.indptr, w.indices, w.shape, s)
    return cols + (rows if s.transposable else 0)


def check_structure(w: sp.csr_matrix, s: NMStructure, what: str = "weight") -> None:
    """Raise ValueError naming ``what`` if ``w`` (n_in, n_out) violates ``s``; O(nnz)."""
    if not w.has_sorted_indices:
        w = w.sorted_indices()
    cols, rows = count_violations(w.indptr, w.indices, w.shape, s)
    if cols or (s.transposable and rows):
        detail = f"{cols} (input block, output neuron) groups" + (f" and {rows} (input neuron, output block) "
                                                                  "groups" if s.transposable else "")
        raise ValueError(f"{what} of shape {w.shape} violates {s.name} sparsity: {detail} hold more than {s.n} "
                         "non-zeros")


def _keep_top_per_group(keys: np.ndarray, mag: np.ndarray, lin: np.ndarray, n: int) -> np.ndarray:
    """Bool mask keeping, per group key, the n entries of largest ``mag`` (ties: smaller ``lin``)."""
    order = np.lexsort((lin, -mag, keys))
    sk = keys[order]
    start = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1]
    rank = np.arange(sk.size) - np.repeat(start, np.diff(np.r_[start, sk.size]))
    keep = np.empty(keys.size, bool)
    keep[order] = rank < n
    return keep


def enforce_structure(w: sp.csr_matrix, velocity: np.ndarray, s: NMStructure
                      ) -> tuple[sp.csr_matrix, np.ndarray, int]:
    """Re-establish ``s`` on ``w`` by dropping, in every over-full group, the smallest-magnitude
    excess (ties: the larger row-major position goes first); column groups first, then (if
    transposable) row groups of the survivors. Dropping only lowers counts, so both hold after.

    Used after importance pruning, whose removed neurons shift indices and so block
    membership. Deterministic; O(nnz log nnz). Returns (weight, velocity aligned to it,
    number dropped); ``w`` itself is returned unchanged when nothing violates.
    """
    if not w.has_sorted_indices:
        raise ValueError("enforce_structure needs sorted column indices")
    n_in, n_out = w.shape
    rows = np.repeat(np.arange(n_in, dtype=np.int64), np.diff(w.indptr))
    cols = w.indices.astype(np.int64)
    lin = rows * n_out + cols
    mag = np.abs(w.data.astype(np.float64))
    keep = _keep_top_per_group(column_keys(rows, cols, n_out, s.m), mag, lin, s.n)
    if s.transposable:
        idx = np.flatnonzero(keep)
        keep[idx] = _keep_top_per_group(row_keys(rows[idx], cols[idx], n_out, s.m), mag[idx], lin[idx], s.n)
    dropped = int(keep.size - np.count_nonzero(keep))
    if dropped == 0:
        return w, velocity, 0
    indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=n_in), out=indptr[1:])
    idt = w.indices.dtype
    out = sp.csr_matrix((w.data[keep], w.indices[keep], indptr.astype(idt)), shape=w.shape)
    return out, velocity[keep], dropped


def full_group_slots(indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int], s: NMStructure,
                     r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """Every slot in rows [r0, r1) whose group is already full (``n`` entries): (rows - r0, cols).

    RigL uses it to score such slots out before ranking, so that its candidates can be grown.
    Reads the entries of the row blocks overlapping [r0, r1) only.
    """
    n_in, n_out = shape
    m, n = s.m, s.n
    b0, b1 = (r0 // m) * m, min(n_in, -(-r1 // m) * m)
    lo, hi = int(indptr[b0]), int(indptr[b1])
    rows = np.repeat(np.arange(b0, b1, dtype=np.int64), np.diff(indptr[b0:b1 + 1]))
    cols = indices[lo:hi].astype(np.int64)
    keys, counts = np.unique(column_keys(rows, cols, n_out, m), return_counts=True)
    full = keys[counts >= n]
    fk, fj = np.divmod(full, n_out)
    out_r = (fk[:, None] * m + np.arange(m)[None, :]).ravel()
    out_c = np.repeat(fj, m)
    if s.transposable:
        sel = (rows >= r0) & (rows < r1)
        nb = -(-n_out // m)
        keys, counts = np.unique(row_keys(rows[sel], cols[sel], n_out, m), return_counts=True)
        fi, fl = np.divmod(keys[counts >= n], nb)
        out_r = np.concatenate([out_r, np.repeat(fi, m)])
        out_c = np.concatenate([out_c, (fl[:, None] * m + np.arange(m)[None, :]).ravel()])
    ok = (out_r >= r0) & (out_r < r1) & (out_c < n_out)
    return out_r[ok] - r0, out_c[ok]


@lru_cache(maxsize=256)
def block_masks(rows: int, cols: int, n: int) -> int | None:
    """Exact number of 0/1 matrices of shape (rows, cols) whose lines along the shorter side each
    hold exactly ``min(n, length of the longer side)`` ones and whose lines along the longer side
    hold at most ``n``; None if the DP would need more than :data:`MAX_DP_STATES` states.

    For a square M x M block this is the number of M x M 0/1 matrices with exactly N ones in
    every row and every column (at most N per column and exactly N per row force exactly N
    per column), the per-block count of transposable N:M masks. DP over the rows; the state is
    how many columns already hold 0, 1, ..., n ones.
    """
    if rows > cols:
        rows, cols = cols, rows
    a = min(n, cols)
    if math.comb(cols + n, n) > MAX_DP_STATES:
        return None
    states: dict[tuple[int, ...], int] = {tuple([cols] + [0] * n): 1}
    for _ in range(rows):
        nxt: dict[tuple[int, ...], int] = {}
        for st, ways in states.items():
            for take, mult in _choices(st, a, n):
                new = list(st)
                for j, x in enumerate(take):
                    new[j] -= x
                    new[j + 1] += x
                key = tuple(new)
                nxt[key] = nxt.get(key, 0) + ways * mult
        states = nxt
    return sum(states.values())


def _choices(state: tuple[int, ...], a: int, n: int):  # noqa: ANN202 - a generator of (take, multiplicity)
    """Ways to put ``a`` ones of one row into columns that hold fewer than ``n``: how many from
    each class j < n (columns holding j ones), with the product of binomials."""
    def rec(j: int, left: int):  # noqa: ANN202
        if j == n:
            if left == 0:
                yield (), 1
            return
        for x in range(min(left, state[j]) + 1):
            for rest, mult in rec(j + 1, left - x):
                yield (x, *rest), mult * math.comb(state[j], x)
    return rec(0, a)


def square_block_masks(m: int, n: int) -> int | None:
    """The number of M x M 0/1 matrices with exactly N ones per row and per column (or None)."""
    return block_masks(m, m, n)


def _sizes(width: int, m: int) -> list[tuple[int, int]]:
    """(block length, how many blocks of that length) along a dimension of ``width``."""
    full, rest = divmod(width, m)
    return [(m, full)] + ([(rest, 1)] if rest else [])


def log10_mask_diversity(shape: tuple[int, int], s: NMStructure) -> float | None:
    """log10 of the number of masks the constraint allows on a layer of ``shape`` (n_in, n_out):
    Hubara et al.'s mask diversity, computed for masks that fill every block to the constraint.

    - N:M: per output neuron and input block of r real rows, C(r, min(N, r)) masks; for full
      blocks ``log10 MD = n_out * ceil(n_in / M) * log10 C(M, N)``.
    - Transposable N:M: per M x M block, :func:`block_masks` (exact, e.g. 90 for 2:4, M! for
      1:M); edge blocks of r x c real slots use the same count for their shape. None (n/a)
      when that DP is too large (see :data:`MAX_DP_STATES`).
    """
    n_in, n_out = shape
    total = 0.0
    if not s.transposable:
        for r, count in _sizes(n_in, s.m):
            total += count * n_out * math.log10(math.comb(r, min(s.n, r)))
        return total
    for r, rc in _sizes(n_in, s.m):
        for c, cc in _sizes(n_out, s.m):
            masks = block_masks(r, c, s.n)
            if masks is None:
                return None
            total += rc * cc * math.log10(masks)
    return total
