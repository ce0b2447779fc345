"""Arithmetic on CSR sparsity patterns of one shape: union average, re-prune to a target nnz,
and the map of one pattern's entries onto another's.

WASAP-SGD needs them (the final merge of the ranks' local models; a gradient computed on an
older topology carried over to the current one), but they are plain pattern math: O(nnz log
nnz), never O(n_in * n_out), no communicator.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hpc_sparse.topology.evolution import set_keep_mask

__all__ = ["remap_positions", "reprune_to_nnz", "union_average"]


def union_average(mats: Sequence[tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of CSR matrices over the union of their patterns (absent entries count as 0).

    Parameters
    ----------
    mats : sequence of (shape, indptr, indices, data)
        P matrices of one shape, sorted indices; data float32.

    Returns
    -------
    indptr (n_in + 1,) int64, indices (nnz,) int64, data (nnz,) float32
        Row-major sorted; ``nnz`` is the size of the union (exact-zero means are kept).
        Sums run in float64 in the order of ``mats``, so the result is deterministic.
    """
    shape = mats[0][0]
    if any(tuple(m[0]) != tuple(shape) for m in mats):
        raise ValueError(f"cannot average matrices of shapes {[tuple(m[0]) for m in mats]}")
    n_in, n_out = shape
    keys, vals = [], []
    for _, indptr, indices, data in mats:
        rows = np.repeat(np.arange(n_in, dtype=np.int64), np.diff(indptr))
        keys.append(rows * n_out + indices.astype(np.int64))
        vals.append(data.astype(np.float64))
    uniq, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    sums = np.bincount(inverse, weights=np.concatenate(vals), minlength=uniq.size)
    rows, cols = np.divmod(uniq, n_out)
    out_indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_in), out=out_indptr[1:])
    return out_indptr, cols, (sums / len(mats)).astype(np.float32)


def reprune_to_nnz(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, target: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove the weakest entries back to about ``target`` with the SET magnitude rule at
    ``zeta' = (nnz - target) / nnz`` (per sign, the ``floor(zeta' * n_sign)`` closest to 0;
    exact zeros always go). Removal only. Returns new (indptr, indices, data)."""
    n = data.size
    zeta = (n - target) / n if n > target else 0.0
    keep = set_keep_mask(data, zeta)
    n_in = indptr.size - 1
    rows = np.repeat(np.arange(n_in), np.diff(indptr))
    out_indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=n_in), out=out_indptr[1:])
    return out_indptr, indices[keep], data[keep]


def remap_positions(n_out: int, old_indptr: np.ndarray, old_indices: np.ndarray, new_indptr: np.ndarray,
                    new_indices: np.ndarray) -> np.ndarray:
    """For every entry of an old CSR pattern, its position in a new pattern of the same shape,
    or -1 where the new pattern lacks it: (old nnz,) int64. Both patterns row-major sorted.
    O(nnz log nnz); used to carry a gradient computed on an older topology over to the current one."""
    def keys(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
        rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
        return rows * n_out + indices.astype(np.int64)

    old, new = keys(old_indptr, old_indices), keys(new_indptr, new_indices)
    if new.size == 0:
        return np.full(old.size, -1, np.int64)
    pos = np.minimum(np.searchsorted(new, old), new.size - 1)
    return np.where(new[pos] == old, pos, -1).astype(np.int64)
