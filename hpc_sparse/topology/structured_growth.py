"""Placing connections under an N:M constraint: random init, SET regrowth and RigL growth.

The rule everywhere: a new connection may go only into an empty slot whose column group (and,
transposable, row group) holds fewer than N entries (:mod:`hpc_sparse.topology.structure`).

Random placement is rejection sampling: uniform distinct slots of the whole layer are proposed
(O(k), never O(n_in * n_out)), put in a random order, and accepted one after the other while
their groups have room. Each accepted slot is therefore uniform among the slots that are valid
at that moment. Rounds repeat until the target count is placed; every decision comes from the
given RNG and the pattern, so all ranks that share the RNG stream agree.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
from numba import njit

from hpc_sparse.topology.sampling import sample_distinct
from hpc_sparse.topology.structure import NMStructure, column_keys, row_keys

__all__ = ["accept_in_order", "capacity", "group_slots", "pattern_coordinates", "random_valid_slots",
           "structured_random_pattern"]

MAX_ROUNDS = 64


def capacity(shape: tuple[int, int], s: NMStructure) -> int:
    """The most entries a layer of ``shape`` can hold under ``s`` (edge blocks zero-padded)."""
    n_in, n_out = shape
    m, n = s.m, s.n
    full_r, rest_r = divmod(n_in, m)
    per_col = full_r * n + min(n, rest_r)
    if not s.transposable:
        return n_out * per_col
    total = 0
    for r, rc in ((m, full_r), (rest_r, 1)):
        for c, cc in ((m, n_out // m), (n_out % m, 1)):
            if r and c and rc and cc:
                total += rc * cc * min(r * n, c * n, r * c)
    return total


@njit(cache=True)
def _greedy(pid_c, cnt_c, pid_r, cnt_r, n, limit, use_rows, out):  # pragma: no cover - numba
    got = 0
    for q in range(pid_c.shape[0]):
        if got >= limit:
            break
        if cnt_c[pid_c[q]] >= n:
            continue
        if use_rows and cnt_r[pid_r[q]] >= n:
            continue
        cnt_c[pid_c[q]] += 1
        if use_rows:
            cnt_r[pid_r[q]] += 1
        out[q] = True
        got += 1
    return got


def _ids(existing: np.ndarray, proposed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of existing group keys and the proposals' indices into them (compact ids): one
    argsort of both key arrays (np.unique's hash and a searchsorted per key were ~5x slower)."""
    keys = np.concatenate([existing, proposed])
    if keys.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(keys)
    sk = keys[order]
    first = np.empty(sk.size, bool)
    first[0] = True
    np.not_equal(sk[1:], sk[:-1], out=first[1:])
    gid = np.empty(keys.size, np.int64)
    gid[order] = np.cumsum(first) - 1
    counts = np.bincount(gid[:existing.size], minlength=int(gid[order[-1]]) + 1).astype(np.int64)
    return gid[existing.size:], counts


def accept_in_order(occ_rows: np.ndarray, occ_cols: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    n_out: int, s: NMStructure, limit: int) -> np.ndarray:
    """Bool mask over the proposals (rows, cols), all empty and distinct, taken in the given
    order while their groups have room, at most ``limit`` of them. ``occ_*``: the occupied slots."""
    pid_c, cnt_c = _ids(column_keys(occ_rows, occ_cols, n_out, s.m), column_keys(rows, cols, n_out, s.m))
    if s.transposable:
        pid_r, cnt_r = _ids(row_keys(occ_rows, occ_cols, n_out, s.m), row_keys(rows, cols, n_out, s.m))
    else:
        pid_r, cnt_r = np.zeros(0, np.int64), np.zeros(0, np.int64)
    out = np.zeros(rows.size, bool)
    _greedy(pid_c, cnt_c, pid_r, cnt_r, np.int64(s.n), np.int64(limit), s.transposable, out)
    return out


def random_valid_slots(rng: np.random.Generator, occ_rows: np.ndarray, occ_cols: np.ndarray,
                       shape: tuple[int, int], s: NMStructure, count: int,
                       fallback: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None, strict: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` empty slots where the constraint has room, placed one after the other uniformly
    among the valid slots (see the module doc); row-major sorted (rows, cols) int64.

    ``occ_rows``/``occ_cols``: the occupied slots (int64, any order; the pattern must satisfy
    ``s``). If :data:`MAX_ROUNDS` rounds of proposals do not place them all, the slots of
    ``fallback()`` (candidate (rows, cols), e.g. the groups SET just pruned; built only when
    needed) are tried in a random
    order; if that still falls short, ValueError (``strict``) or fewer slots are returned (the
    transposable form can, rarely, leave room only in slots that are taken: a greedy fill is
    maximal, not maximum). Work per round: O((nnz + k) log(nnz + k)).
    """
    n_in, n_out = shape
    total = n_in * n_out
    occ_lin = np.sort(occ_rows.astype(np.int64) * n_out + occ_cols.astype(np.int64))
    got_r, got_c = [occ_rows.astype(np.int64)], [occ_cols.astype(np.int64)]
    placed = 0
    rate = 1.0
    for _ in range(MAX_ROUNDS):
        missing = count - placed
        if missing <= 0:
            break
        free = total - occ_lin.size
        k = min(free, max(16, int(missing / max(rate, 1e-3) * 1.2) + 16), max(1, total // 2))
        lin = sample_distinct(rng, total, k)
        pos = np.minimum(np.searchsorted(occ_lin, lin), max(occ_lin.size - 1, 0))
        if occ_lin.size:
            lin = lin[occ_lin[pos] != lin]
        lin = lin[rng.permutation(lin.size)]
        r, c = np.divmod(lin, n_out)
        ok = accept_in_order(np.concatenate(got_r), np.concatenate(got_c), r, c, n_out, s, missing)
        n_ok = int(np.count_nonzero(ok))
        rate = max(n_ok / max(lin.size, 1), 1e-3)
        placed += n_ok
        got_r.append(r[ok])
        got_c.append(c[ok])
        occ_lin = np.sort(np.concatenate([occ_lin, lin[ok]]))
    if placed < count and fallback is not None:
        f_rows, f_cols = fallback()
        lin = np.unique(f_rows.astype(np.int64) * n_out + f_cols.astype(np.int64))
        pos = np.minimum(np.searchsorted(occ_lin, lin), max(occ_lin.size - 1, 0))
        lin = lin[occ_lin[pos] != lin] if occ_lin.size else lin
        lin = lin[rng.permutation(lin.size)]
        r, c = np.divmod(lin, n_out)
        ok = accept_in_order(np.concatenate(got_r), np.concatenate(got_c), r, c, n_out, s, count - placed)
        placed += int(np.count_nonzero(ok))
        got_r.append(r[ok])
        got_c.append(c[ok])
    if placed < count and strict:
        raise ValueError(f"could place only {placed} of {count} connections under {s.name} sparsity in a "
                         f"{n_in}x{n_out} layer (density too close to N/M)")
    rows, cols = np.concatenate(got_r[1:]), np.concatenate(got_c[1:])
    order = np.argsort(rows * n_out + cols, kind="stable")
    return rows[order], cols[order]


def structured_random_pattern(rng: np.random.Generator, shape: tuple[int, int], nnz: int, s: NMStructure
                              ) -> tuple[np.ndarray, np.ndarray]:
    """A random pattern of exactly ``nnz`` entries satisfying ``s``: CSR (indptr (n_in+1,),
    indices (nnz,)) int64, sorted. ValueError if ``nnz`` exceeds :func:`capacity`."""
    n_in, n_out = shape
    cap = capacity(shape, s)
    if nnz > cap:
        raise ValueError(f"{nnz} connections do not fit a {n_in}x{n_out} layer under {s.name} sparsity "
                         f"(at most {cap})")
    empty = np.zeros(0, np.int64)
    rows, cols = random_valid_slots(rng, empty, empty, shape, s, nnz)
    indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_in), out=indptr[1:])
    return indptr, cols


def pattern_coordinates(w: sp.csr_matrix | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64 of a CSR matrix or of (indptr, indices)."""
    indptr, indices = (w.indptr, w.indices) if sp.issparse(w) else w
    rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    return rows, indices.astype(np.int64)


def group_slots(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], s: NMStructure
                ) -> tuple[np.ndarray, np.ndarray]:
    """Every slot of the groups holding (rows, cols): the M-row column group of each, and for
    the transposable form also its M-column row group (at most 2M slots per entry), clipped to
    the layer. The regrowth fallback's candidates: a group that just lost an entry has room."""
    n_in, n_out = shape
    m = s.m
    t = np.arange(m, dtype=np.int64)
    rr = (((rows.astype(np.int64) // m) * m)[:, None] + t[None, :]).ravel()
    cc = np.repeat(cols.astype(np.int64), m)
    if s.transposable:
        rr = np.concatenate([rr, np.repeat(rows.astype(np.int64), m)])
        cc = np.concatenate([cc, (((cols.astype(np.int64) // m) * m)[:, None] + t[None, :]).ravel()])
    ok = (rr < n_in) & (cc < n_out)
    return rr[ok], cc[ok]
