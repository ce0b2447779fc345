"""One process builds a shared file (the dataset cache) while the others wait, then all use it.

Who builds: rank 0 if the cache folder is on a file system that every rank sees (found
with a probe file, below); otherwise also the first rank of each node whose ranks do not
see rank 0's folder. A node is what ``Split_type(COMM_TYPE_SHARED)`` says, never a
hostname. The waiting ranks sleep in a non-blocking barrier instead of spinning (MPICH's
blocking calls spin, which would take the cores the builder needs).

Shared or not is decided by a probe, not by guessing from mount types: rank 0 writes a
file with a random token into the cache folder, and every rank checks that it reads that
token at the same path. A network file system that is slow to show the probe makes a node
build its own copy: wasteful, never wrong, because an entry is published by an atomic
rename and a second builder keeps the first one's entry.

The callable returned by :func:`coordinator` fits ``hpc_sparse.data.load_dataset``'s
``coordinate`` argument; this module does not import the data package.
"""

from __future__ import annotations

import secrets
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from hpc_sparse.errors import UserError
from hpc_sparse.parallel.comm import node_comm

OK, WRITE_FAILED, USER_ERROR, FAILED = 0, 1, 2, 3


def wait_quietly(comm: MPI.Comm, longest_sleep: float = 0.1) -> None:
    """A barrier that sleeps between polls (a builder may take minutes)."""
    req = comm.Ibarrier()
    pause = 0.001
    while not req.Test():
        time.sleep(pause)
        pause = min(longest_sleep, pause * 2)


def _probe(comm: MPI.Comm, folder: Path, digest: str) -> tuple[bool, Path | None]:
    """(does this rank use rank 0's folder for the same entry and see its probe file there,
    the probe file rank 0 must remove once every rank has looked: None on other ranks)."""
    token, mine = secrets.token_hex(8), None
    if comm.Get_rank() == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            mine = folder / f".probe-{token}"
            mine.write_text(token)
        except OSError:
            mine = None  # a folder rank 0 cannot write: nobody counts as sharing it; the builders report why
    r0_folder, r0_digest, r0_token, r0_ok = comm.bcast((str(folder), digest, token, mine is not None), root=0)
    if not (r0_ok and r0_folder == str(folder) and r0_digest == digest):
        return False, mine
    try:
        return (folder / f".probe-{r0_token}").read_text() == r0_token, mine
    except OSError:
        return False, mine


def _sum(comm: MPI.Comm, value: int, op: MPI.Op = MPI.SUM) -> int:
    buf = np.array([value], np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=op)
    return int(buf[0])


def build_once_per_node(comm: MPI.Comm, folder: Path, digest: str, is_valid: Callable[[], bool],
                        build: Callable[[], str | None]) -> tuple[str, str | None]:
    """Collectively make sure every rank can use the entry ``digest`` in ``folder``.

    ``is_valid()`` tells whether this rank sees a usable entry; ``build()`` builds it and
    returns None, or a message if the cache could not be written (the callers then load
    without it). Returns (who built it, "" if nobody had to; the write error or None).

    A UserError on a builder (a bad source file) is raised on every rank with the builder's
    message (``every_rank``, one line); any other exception there ends the job (the
    builder raises it, the others a RuntimeError naming the builder)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return ("", None) if is_valid() else ("built by this process", build())
    if _sum(comm, int(is_valid()), MPI.MIN):
        return "", None
    node = node_comm(comm)
    try:
        leader = node.Get_rank() == 0
    finally:
        node.Free()
    shares, probe = _probe(comm, folder, digest)
    builder = rank == 0 or (leader and not shares)
    all_share = bool(_sum(comm, int(shares), MPI.MIN))
    n_nodes, n_builders = _sum(comm, int(leader)), _sum(comm, int(builder))
    if probe is not None:  # every rank has looked at it (the sums above)
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    status, message, error = OK, "", None
    if builder:
        try:
            if not is_valid():  # another job may have built it meanwhile
                failed = build()
                if failed is not None:
                    status, message = WRITE_FAILED, failed
        except UserError as exc:
            status, message = USER_ERROR, str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, then re-raised here
            status, message, error = FAILED, f"{type(exc).__name__}: {exc}", exc
    wait_quietly(comm)
    worst = _sum(comm, status, MPI.MAX)
    if worst != OK:
        who = _sum(comm, rank if status == worst else size, MPI.MIN)
        message = comm.bcast(message if rank == who else None, root=who)
        if worst == USER_ERROR:
            raise UserError(message, every_rank=True)
        if worst == FAILED:
            if error is not None:
                raise error
            raise RuntimeError(f"rank {who} failed to build the data cache in '{folder}': {message}")
    if n_builders == 1:
        seen = "every rank sees its folder" if all_share else "some ranks do not see its folder"
        how = f"built by rank 0 for all {size} ranks ({n_nodes} node(s); {seen})"
    else:
        how = (f"built by {n_builders} ranks, the first of each node that does not see rank 0's folder "
               f"({n_nodes} nodes, {size} ranks)")
    return how, (message or None) if worst == WRITE_FAILED else None


def coordinator(comm: MPI.Comm) -> Callable[..., Any]:
    """The ``coordinate`` argument of ``load_dataset`` for the ranks of ``comm``."""
    return partial(build_once_per_node, comm)
