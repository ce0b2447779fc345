"""Communicator helpers and the general collectives: the only place (with the rest of this
package) that imports mpi4py.

Everything takes the communicator as an argument; nothing here holds a module-level
COMM_WORLD. A single process without a launcher is just a communicator of size 1. Each
collective on contiguous numpy buffers comes blocking (``Allreduce``) or, where ranks may
arrive at very different times, *polled* (``Iallreduce``/``Ibcast`` completed by a
:class:`~hpc_sparse.parallel.polling.Poller`, so that an early rank sleeps instead of spinning
a core).
"""

from __future__ import annotations

import os
import sys
import time
import zlib

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from hpc_sparse.errors import UserError
from hpc_sparse.parallel.polling import Poller


def world() -> MPI.Comm:
    """A private duplicate of COMM_WORLD for the run (isolates our messages from libraries)."""
    return MPI.COMM_WORLD.Dup()


def self_comm() -> MPI.Comm:
    """The single-rank communicator, for serial use and tests."""
    return MPI.COMM_SELF


def node_comm(comm: MPI.Comm) -> MPI.Comm:
    """The ranks of ``comm`` that share this node's memory (``Split_type(COMM_TYPE_SHARED)``);
    its rank 0 is the node's first rank. A collective: every rank of ``comm`` must call it,
    whatever its environment (never behind an environment variable that ranks may see
    differently). The node is found by MPI, not by hostname. Free it when done."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED)


def ranks_on_node(comm: MPI.Comm) -> int:
    """How many ranks of ``comm`` share this node's memory. A collective (see :func:`node_comm`)."""
    node = node_comm(comm)
    try:
        return node.Get_size()
    finally:
        node.Free()


def default_threads(on_node: int) -> int:
    """Compute threads per rank: SLURM's cpus-per-task if set, else the cores this process may
    use divided by ``on_node``, the ranks on the node (at least 1), so ranks never oversubscribe."""
    env = os.environ.get("SLURM_CPUS_PER_TASK")
    if env and env.isdigit():
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, on_node))


def allreduce_sum_(comm: MPI.Comm, buf: np.ndarray) -> np.ndarray:
    """In-place buffer Allreduce(SUM) of a contiguous array; returns ``buf``."""
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


def allreduce_sum_polled(comm: MPI.Comm, buf: np.ndarray, what: str, timeout: float | None = None) -> np.ndarray:
    """In-place SUM over all ranks with ``Iallreduce`` + polling (ranks that arrive early
    sleep instead of spinning); raises WasapTimeout naming ``what`` after ``timeout``
    seconds (default: the Poller's). Returns ``buf``."""
    if comm.Get_size() > 1:
        Poller(timeout).wait([comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)], what)
    return buf


def bcast_bytes(comm: MPI.Comm, data: bytes | None, timeout: float | None = None) -> bytes:
    """Broadcast a byte string from rank 0 (length first, then the bytes; buffer-based,
    polled). ``data`` is only read on rank 0."""
    if comm.Get_size() == 1:
        return data or b""
    poller = Poller(timeout)
    root = comm.Get_rank() == 0
    n = np.array([len(data or b"") if root else 0], np.int64)
    poller.wait([comm.Ibcast(n, root=0)], "a length from rank 0")
    buf = np.frombuffer(data or b"", np.uint8).copy() if root else np.empty(int(n[0]), np.uint8)
    poller.wait([comm.Ibcast(buf, root=0)], "bytes from rank 0")
    return buf.tobytes()


def agree_max(comm: MPI.Comm, flags: np.ndarray) -> np.ndarray:
    """Element-wise maximum of an int64 flag vector over all ranks, in place (one Allreduce),
    e.g. 'has any rank been signalled?'."""
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
    return flags


def allgatherv(comm: MPI.Comm, local: np.ndarray) -> np.ndarray:
    """Concatenate every rank's 1-D array, in rank order, on every rank (buffer-based)."""
    if comm.Get_size() == 1:
        return local.copy()
    counts = np.zeros(comm.Get_size(), np.int64)
    comm.Allgather(np.array([local.size], np.int64), counts)
    out = np.empty(int(counts.sum()), local.dtype)
    displs = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=displs[1:])
    comm.Allgatherv(np.ascontiguousarray(local), [out, counts, displs, from_numpy_dtype(local.dtype)])
    return out


def fingerprint(arrays: list[np.ndarray]) -> np.ndarray:
    """Per array ``(size, crc32 of its bytes)`` as int64 (2 * len(arrays),): a cheap identity."""
    out = np.empty(2 * len(arrays), np.int64)
    for i, a in enumerate(arrays):
        out[2 * i] = a.size
        out[2 * i + 1] = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))
    return out


class TopologyMismatch(RuntimeError):
    """Ranks hold different sparsity patterns: a bug or nondeterminism, never to be trained on."""


def check_agreement(comm: MPI.Comm, arrays: list[np.ndarray], names: list[str], what: str = "topology") -> None:
    """Prove that every rank holds identical ``arrays`` (by size and CRC32), with one
    Allreduce(MAX) and one Allreduce(MIN) of 2 int64 per array. Raises TopologyMismatch
    naming the first differing array."""
    if comm.Get_size() == 1:
        return
    local = fingerprint(arrays)
    hi, lo = local.copy(), local.copy()
    comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
    comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
    bad = np.flatnonzero(hi != lo)
    if bad.size:
        name = names[int(bad[0]) // 2]
        raise TopologyMismatch(f"ranks disagree on the {what} of {name} (rank {comm.Get_rank()} has "
                               f"size/crc {local[2 * (bad[0] // 2)]}/{local[2 * (bad[0] // 2) + 1]}); "
                               "this is a bug: the run was stopped before training on diverged replicas")


def abort_on_error(comm: MPI.Comm, exc: BaseException, code: int, quiet: bool = False) -> None:
    """Print the error with this rank's number (unless ``quiet``) and end the whole job (all
    ranks) now with status ``code``.

    Called for any exception that escapes the command on any rank, so that no rank is
    left waiting in a collective. With one rank it just returns (the caller exits).
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    prefix = f"hpc-sparse: rank {rank}/{size}: " if size > 1 else "hpc-sparse: "
    if isinstance(exc, UserError):
        msg = f"{prefix}error: {exc}"
    else:
        msg = f"{prefix}{type(exc).__name__}: {exc}"
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
    if size > 1:
        time.sleep(0.2)  # let the launcher forward this rank's stderr before the abort tears it down
        MPI.COMM_WORLD.Abort(code)


def mpi_vendor() -> str:
    return MPI.Get_library_version().splitlines()[0].strip()


def exit_with_status(status: int) -> None:
    """End this rank with ``status`` (e.g. 75, EXIT_REQUEUE) so that every launcher reports it.

    Call it on every rank, after the checkpoint is committed. Do not ``sys.exit(75)``
    under ``python -m mpi4py``: mpi4py turns a non-zero ``SystemExit`` into
    ``MPI_Abort(75)``, which MPICH's ``mpiexec`` reports as 75 but ``srun --mpi=pmi2``
    reports as 137 (tasks killed), so the job script would not requeue. Instead this
    flushes stdio, calls ``MPI.Finalize()`` and leaves with ``os._exit(status)``: both
    launchers then exit with ``status``. Never returns.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not block the exit
            pass
    try:
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    except Exception:  # noqa: BLE001 - exit with the status whatever MPI says
        pass
    os._exit(status)
