"""SET topology evolution: prune the weakest fraction zeta of a layer, regrow as many.

Prune rule (SET; PAPER.md §1, from the paper's code): among the negative weights remove
the ``floor(zeta * n_neg)`` closest to zero (the largest negatives), among the positive
weights the ``floor(zeta * n_pos)`` closest to zero (the smallest positives); exact zeros
are always removed. This is not a global |w| ranking: each sign loses the same fraction.

Regrowth is uniform over the empty slots (SET) or by gradient magnitude (RigL, see
:mod:`hpc_sparse.topology.rigl`). Survivors keep their momentum; new connections start
with zero momentum. All of it is O(nnz) (plus argpartition), never O(n_in * n_out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numba import njit

from hpc_sparse.sparse.linear import SparseLinear
from hpc_sparse.topology.init import init_values
from hpc_sparse.topology.sampling import free_slots_to_positions, merge_rows, sample_distinct
from hpc_sparse.topology.structure import NMStructure
from hpc_sparse.topology.structured_growth import group_slots, pattern_coordinates, random_valid_slots


@dataclass
class Pruned:
    """A layer's pattern after pruning: CSR arrays of the survivors and their momentum."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    velocity: np.ndarray
    shape: tuple[int, int]
    removed: int


def set_keep_mask(data: np.ndarray, zeta: float) -> np.ndarray:
    """Boolean (nnz,) mask of the connections SET keeps at drop fraction ``zeta``."""
    keep = data != 0
    for sign in (-1, 1):
        idx = np.flatnonzero(data < 0) if sign < 0 else np.flatnonzero(data > 0)
        k = int(zeta * idx.size)
        if k == 0:
            continue
        # distance to zero on this side; the k smallest distances go
        dist = -data[idx] if sign < 0 else data[idx]
        drop = idx[np.argpartition(dist, k - 1)[:k]] if k < idx.size else idx
        keep[drop] = False
    return keep


@njit(cache=True)
def _compact_rows(indptr, indices, data, velocity, keep, out_indptr, out_indices, out_data, out_vel):  # pragma: no cover
    n_in = indptr.shape[0] - 1
    p = 0
    out_indptr[0] = 0
    for i in range(n_in):
        for k in range(indptr[i], indptr[i + 1]):
            if keep[k]:
                out_indices[p] = indices[k]
                out_data[p] = data[k]
                out_vel[p] = velocity[k]
                p += 1
        out_indptr[i + 1] = p


def prune_by_mask(layer: SparseLinear, keep: np.ndarray) -> Pruned:
    """Survivors of ``layer`` where ``keep`` (nnz,) is True, momentum aligned (one pass)."""
    w = layer.weight
    n_kept = int(np.count_nonzero(keep))
    indptr = np.empty(w.shape[0] + 1, w.indptr.dtype)
    indices = np.empty(n_kept, w.indices.dtype)
    data = np.empty(n_kept, np.float32)
    vel = np.empty(n_kept, np.float32)
    _compact_rows(w.indptr, w.indices, w.data, layer.w_velocity, keep, indptr, indices, data, vel)
    return Pruned(indptr, indices, data, vel, w.shape, int(w.nnz - n_kept))


def grow(layer: SparseLinear, pruned: Pruned, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """Install ``pruned`` plus new entries at (rows, cols) (row-major sorted, all empty) into ``layer``."""
    n_in, n_out = pruned.shape
    nnz = pruned.indices.size + rows.size
    idt = pruned.indices.dtype
    out_indptr = np.empty(n_in + 1, np.int64)
    out_indices = np.empty(nnz, idt)
    out_data = np.empty(nnz, np.float32)
    out_vel = np.empty(nnz, np.float32)
    merge_rows(pruned.indptr, pruned.indices, pruned.data, pruned.velocity,
               rows.astype(np.int64), cols.astype(idt), values.astype(np.float32), n_in,
               out_indptr, out_indices, out_data, out_vel)
    w = sp.csr_matrix((out_data, out_indices, out_indptr.astype(idt)), shape=(n_in, n_out))
    layer.set_weight(w, out_vel)


def random_empty_positions(rng: np.random.Generator, pruned: Pruned, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct empty slots of ``pruned``, uniform, row-major sorted (rows, cols)."""
    n_in, n_out = pruned.shape
    free = n_in * n_out - pruned.indices.size
    ranks = sample_distinct(rng, free, min(count, free))
    return free_slots_to_positions(pruned.indptr, pruned.indices, n_out, ranks)


def removed_coordinates(layer: SparseLinear, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64 of the entries of ``layer`` that ``keep`` (nnz,) drops."""
    rows, cols = pattern_coordinates(layer.weight)
    gone = ~keep
    return rows[gone], cols[gone]


def structured_empty_positions(rng: np.random.Generator, pruned: Pruned, count: int, structure: NMStructure,
                               removed: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``count`` empty slots of ``pruned`` whose groups have room under ``structure`` (see
    :func:`random_valid_slots`), row-major sorted. ``removed``: the slots just pruned; their
    groups are the fallback candidates. Returns fewer than ``count`` only in the rare case
    :func:`random_valid_slots` describes (then the layer loses that many connections)."""
    occ = pattern_coordinates((pruned.indptr, pruned.indices))

    def fallback() -> tuple[np.ndarray, np.ndarray]:
        return group_slots(removed[0], removed[1], pruned.shape, structure)

    return random_valid_slots(rng, occ[0], occ[1], pruned.shape, structure, count, fallback, strict=False)


def evolve_set(layer: SparseLinear, zeta: float, rng: np.random.Generator, init: str,
               structure: NMStructure | None = None, init_shape: tuple[int, int] | None = None) -> int:
    """One SET step on ``layer`` in place: prune at ``zeta``, regrow as many at random empty
    slots with fresh values from the init distribution. Returns the number replaced.

    ``init_shape``: the (n_in, n_out) whose init distribution the new values come from (the
    layer's configured shape, so that regrowth keeps the initial scale after importance
    pruning has shrunk the layer); None: the layer's current shape.

    With ``structure``, regrowth goes only to empty slots whose N:M groups have room
    (uniform among them, slot after slot); pruning is unchanged."""
    keep = set_keep_mask(layer.weight.data, zeta)
    removed = removed_coordinates(layer, keep) if structure is not None else None
    pruned = prune_by_mask(layer, keep)
    if structure is None:
        rows, cols = random_empty_positions(rng, pruned, pruned.removed)
    else:
        rows, cols = structured_empty_positions(rng, pruned, pruned.removed, structure, removed)  # type: ignore[arg-type]
    n_in, n_out = init_shape or pruned.shape
    grow(layer, pruned, rows, cols, init_values(rng, rows.size, n_in, n_out, init))
    return pruned.removed
