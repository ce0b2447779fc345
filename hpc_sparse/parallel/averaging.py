"""Replica averaging: one in-place buffer Allreduce over the concatenated parameter arrays.

The trainer hands over flat float32 arrays (each layer's CSR ``data``, its momentum, the
bias and its momentum). With identical topologies on every rank no index is exchanged:
the cost is O(nnz) bytes per sync.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI


class ReplicaAverager:
    """Averages lists of float32 arrays across ``comm`` in place, and counts the cost.

    Attributes
    ----------
    bytes_per_sync : int
        Payload of the last sync (bytes of float32 reduced per rank).
    comm_seconds : float
        Total wall time spent inside the Allreduce (including waiting for slower ranks).
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.size = comm.Get_size()
        self._buf = np.empty(0, np.float32)
        self.bytes_per_sync = 0
        self.comm_seconds = 0.0

    def average_(self, arrays: list[np.ndarray]) -> None:
        """Replace every array by its mean over the ranks (float32, sum then scale by 1/P)."""
        if self.size == 1:
            return
        total = sum(a.size for a in arrays)
        if self._buf.size != total:
            self._buf = np.empty(total, np.float32)
        buf = self._buf
        pos = 0
        for a in arrays:
            buf[pos:pos + a.size] = a
            pos += a.size
        t0 = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.comm_seconds += time.perf_counter() - t0
        buf *= np.float32(1.0 / self.size)
        pos = 0
        for a in arrays:
            a[...] = buf[pos:pos + a.size]
            pos += a.size
        self.bytes_per_sync = buf.nbytes
