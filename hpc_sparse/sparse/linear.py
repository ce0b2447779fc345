"""``SparseLinear``: one layer ``z = a @ W + b`` with ``W`` a scipy CSR matrix at all times."""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

from hpc_sparse.sparse import kernels

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
    """A truly sparse fully-connected layer.

    Attributes
    ----------
    weight : scipy.sparse.csr_matrix, shape (n_in, n_out)
        float32 data; int32 indices (int64 only if the layer needs it).
    bias : ndarray (n_out,) float32
    w_velocity : ndarray (nnz,) float32
        Momentum of each stored weight, aligned with ``weight.data``.
    b_velocity : ndarray (n_out,) float32
    t_indptr, t_rows, t_perm : ndarrays
        Column-order (CSC) index of ``weight`` for the forward kernel; see
        :mod:`hpc_sparse.sparse.kernels`. Rebuilt by :meth:`set_weight` only.
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
        idt = self.weight.indices.dtype
        n_out = self.weight.shape[1]
        self.t_indptr = np.empty(n_out + 1, idt)
        self.t_rows = np.empty(nnz, idt)
        self.t_perm = np.empty(nnz, idt)
        kernels.build_transpose(n_out, self.weight.indptr, self.weight.indices,
                                self.t_indptr, self.t_rows, self.t_perm)

    def forward(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out = (a^T @ W + b)^T``: a (n_in, B) float32 -> out (n_out, B) float32."""
        w = self.weight
        kernels.spmm_forward(self.t_indptr, self.t_rows, self.t_perm, w.data, a, self.bias, out)
        return out

    def weight_grad(self, a: np.ndarray, delta: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Gradient at the stored positions only (SDDMM). a (n_in, B), delta (n_out, B) -> out (nnz,)."""
        kernels.sddmm(self.weight.indptr, self.weight.indices, a, delta, out)
        return out

    def fingerprint(self, h: "hashlib._Hash") -> None:
        """Feed the canonical byte form into ``h``: shape, indptr and indices as little-endian
        int64, then data and bias as little-endian float32."""
        w = self.weight
        h.update(np.asarray(w.shape, "<i8").tobytes())
        h.update(np.ascontiguousarray(w.indptr, "<i8").tobytes())
        h.update(np.ascontiguousarray(w.indices, "<i8").tobytes())
        h.update(np.ascontiguousarray(w.data, "<f4").tobytes())
        h.update(np.ascontiguousarray(self.bias, "<f4").tobytes())
