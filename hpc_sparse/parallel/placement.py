"""Where the ranks of a job run: hosts, ranks per host and compute threads per host.

One start-up log line shows that a job spans the nodes it was given, e.g.
``2 hosts: node1 (rank 0, 1 thread), node2 (rank 1, 1 thread)``. The host of a rank is
MPI's processor name (the host name with MPICH), the same name MPI groups ranks by.

Buffer-based: each rank contributes a fixed-width record of bytes and an int64, gathered
with ``Allgather``; nothing is pickled. Every rank must call :func:`gather_placement`
(it is a collective).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

__all__ = ["HostPlacement", "gather_placement", "describe_placement"]

_NAME_BYTES = MPI.MAX_PROCESSOR_NAME


@dataclass(frozen=True)
class HostPlacement:
    """The ranks of one host and their compute threads."""

    host: str
    """MPI's processor name of the host."""
    ranks: tuple[int, ...]
    """Ranks (of the communicator passed in) on this host, ascending."""
    threads: tuple[int, ...]
    """Compute threads of each of those ranks, in the order of ``ranks``."""

    @property
    def total_threads(self) -> int:
        """Compute threads the job runs on this host (sum over its ranks)."""
        return sum(self.threads)


def gather_placement(comm: MPI.Comm, threads: int) -> list[HostPlacement]:
    """Every rank's host and thread count, grouped by host in order of each host's lowest rank.

    Parameters
    ----------
    comm : MPI.Comm
        The job's communicator; collective over it.
    threads : int
        Compute threads of the calling rank.

    Returns
    -------
    list of HostPlacement
        The same list on every rank.
    """
    name = MPI.Get_processor_name().encode()[:_NAME_BYTES]
    size = comm.Get_size()
    mine = np.zeros(_NAME_BYTES, np.uint8)
    mine[:len(name)] = np.frombuffer(name, np.uint8)
    names = np.empty((size, _NAME_BYTES), np.uint8)
    counts = np.empty(size, np.int64)
    comm.Allgather(mine, names)
    comm.Allgather(np.array([threads], np.int64), counts)
    by_host: dict[str, list[int]] = {}
    for rank in range(size):
        host = names[rank].tobytes().rstrip(b"\0").decode(errors="replace")
        by_host.setdefault(host, []).append(rank)
    return [HostPlacement(host, tuple(ranks), tuple(int(counts[r]) for r in ranks))
            for host, ranks in by_host.items()]


def _ranges(ranks: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    parts: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts)


def describe_placement(hosts: list[HostPlacement]) -> str:
    """One log line, e.g. ``2 hosts: node1 (rank 0, 1 thread), node2 (rank 1, 1 thread)``.

    The threads are the host's total: the sum over its ranks of each rank's threads."""
    def one(h: HostPlacement) -> str:
        t = h.total_threads
        return (f"{h.host} (rank{'s' if len(h.ranks) > 1 else ''} {_ranges(h.ranks)}, "
                f"{t} thread{'s' if t != 1 else ''})")

    n = len(hosts)
    return f"{n} host{'s' if n != 1 else ''}: " + ", ".join(one(h) for h in hosts)
