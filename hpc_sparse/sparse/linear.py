"""``SparseLinear``: one layer ``z = a @ W + b`` with ``W`` a scipy CSR matrix at all times."""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

from hpc_sparse.sparse.blocking import part_bounds
from hpc_sparse.sparse.kernels_layout import part_pointers

_INT32_MAX = np.iinfo(np.int32).max


def index_dtype(n_in: int, n_out: int, nnz: int) -> type:
    """int32 unless a shape or the nnz needs int64."""
    return np.int64 if max(n_in, n_out, nnz) > _INT32_MAX else np.int32


def as_canonical_csr(w: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """A CSR copy with float32 data, sorted unique indices and the smallest safe index dtype.

    Always copies, so the result never shares memory with ``w`` (scipy may return views
    from format conversions; writing through one corrupts the source).
    """
    w = sp.csr_matrix(w, copy=True)
    w.sum_duplicates()
    w.sort_indices()
    idt = index_dtype(w.shape[0], w.shape[1], w.nnz)
    out = sp.csr_matrix(
        (np.ascontiguousarray(w.data, dtype=np.float32),
         np.ascontiguousarray(w.indices, dtype=idt),
         np.ascontiguousarray(w.indptr, dtype=idt)),
        shape=w.shape, copy=False)
    # scipy may down-cast index arrays in the constructor; force the dtype we chose.
    out.indices = np.ascontiguousarray(w.indices, dtype=idt)
    out.indptr = np.ascontiguousarray(w.indptr, dtype=idt)
    out.has_sorted_indices = True
    return out


class SparseLinear:
    """A truly sparse fully-connected layer: ``z = a @ weight + bias`` for a batch ``a`` of
    shape (B, n_in).

    The kernels also need, per row, where each column part starts (:meth:`part_index`, one
    index per block count in use: the forward and backward passes may block differently); it
    is derived from the CSR index on first use and dropped when the topology changes.

    Attributes
    ----------
    weight : scipy.sparse.csr_matrix, shape (n_in, n_out)
        float32 data; int32 indices (int64 only if the layer needs it).
    bias : ndarray (n_out,) float32
    w_velocity : ndarray (nnz,) float32
        Momentum of each stored weight, aligned with ``weight.data``.
    b_velocity : ndarray (n_out,) float32
    """

    def __init__(self, weight: sp.spmatrix, bias: np.ndarray | None = None,
                 w_velocity: np.ndarray | None = None, b_velocity: np.ndarray | None = None) -> None:
        n_out = weight.shape[1]
        self.bias = np.zeros(n_out, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.b_velocity = (np.zeros(n_out, np.float32) if b_velocity is None
                           else np.ascontiguousarray(b_velocity, np.float32))
        self.set_weight(weight, w_velocity)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def nnz(self) -> int:
        return int(self.weight.nnz)

    def set_weight(self, weight: sp.spmatrix, w_velocity: np.ndarray | None = None) -> None:
        """Install a new topology (and values) plus its aligned momentum; rebuild the transpose."""
        self.weight = as_canonical_csr(weight)
        nnz = self.weight.nnz
        if w_velocity is None:
            self.w_velocity = np.zeros(nnz, np.float32)
        else:
            if w_velocity.shape != (nnz,):
                raise ValueError(f"momentum has shape {w_velocity.shape}, expected ({nnz},)")
            self.w_velocity = np.ascontiguousarray(w_velocity, np.float32).copy()
        if self.bias.shape[0] != self.weight.shape[1]:
            raise ValueError(f"bias has {self.bias.shape[0]} entries for {self.weight.shape[1]} outputs")
        self._parts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def part_index(self, n_blocks: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """Column parts for the kernels: ``n_blocks`` column blocks balanced by nnz, each split
        into ``threads`` parts (:func:`blocking.part_bounds`).

        Returns ``bounds (n_parts + 1,)`` int64 and ``seg (n_parts + 1, n_in)``, where row i's
        entries in part p are ``seg[p, i] .. seg[p + 1, i]``; cached until :meth:`set_weight`
        (the two most recently used block counts). O(nnz + n_in * n_parts) to build.
        """
        key = (n_blocks, threads)
        found = self._parts.pop(key, None)
        if found is None:
            w = self.weight
            counts = np.bincount(w.indices, minlength=w.shape[1])
            bounds = part_bounds(counts, n_blocks, threads)
            seg = np.empty((bounds.size, w.shape[0]), w.indices.dtype)
            part_pointers(w.indptr, w.indices, bounds, seg)
            found = (bounds, seg)
            while len(self._parts) >= 2:
                self._parts.pop(next(iter(self._parts)))
        self._parts[key] = found  # most recently used last
        return found

    def fingerprint(self, h: "hashlib._Hash") -> None:
        """Feed the canonical byte form into ``h``: shape, indptr and indices as little-endian
        int64, then data and bias as little-endian float32."""
        w = self.weight
        h.update(np.asarray(w.shape, "<i8").tobytes())
        h.update(np.ascontiguousarray(w.indptr, "<i8").tobytes())
        h.update(np.ascontiguousarray(w.indices, "<i8").tobytes())
        h.update(np.ascontiguousarray(w.data, "<f4").tobytes())
        h.update(np.ascontiguousarray(self.bias, "<f4").tobytes())
