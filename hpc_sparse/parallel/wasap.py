"""WASAP-SGD messaging: buffer-based, non-blocking point-to-point messages.

Everything here moves flat numpy arrays; what the arrays mean (which layer, weights or
momentum) is decided by :mod:`hpc_sparse.schedules.wasap`. No message is pickled. The
header and the message kinds are in :mod:`hpc_sparse.parallel.wasap_header`. Waiting never
spins inside a blocking MPI call: every wait is a :class:`~hpc_sparse.parallel.polling.Poller`
(see docs/wasap.md, "What the server rank does").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_sparse.parallel.polling import Poller
from hpc_sparse.parallel.wasap_header import (  # noqa: F401 - re-exported for the schedule
    DONE,
    FINAL,
    FLAG_INDICES,
    FLAG_MOMENTUM,
    FLAG_STOP,
    GRAD,
    HOLD,
    MERGE,
    MODEL,
    Header,
    ProtocolError,
    header_len,
)

TAG_REQ_HDR, TAG_REQ_DATA = 701, 702
TAG_REP_HDR, TAG_REP_F, TAG_REP_I = 711, 712, 713
TAG_MERGE_HDR, TAG_MERGE_F, TAG_MERGE_I = 721, 722, 723

@dataclass
class Message:
    """A received message: its source rank, parsed header and payloads (fresh arrays)."""

    source: int
    header: Header
    floats: np.ndarray
    ints: np.ndarray | None


def _bytes(*arrays: np.ndarray | None) -> int:
    return sum(a.nbytes for a in arrays if a is not None)


class _Endpoint:
    def __init__(self, comm: MPI.Comm, n_layers: int, timeout: float | None) -> None:
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.n_layers = n_layers
        self.hlen = header_len(n_layers)
        self.poller = Poller(timeout)
        self.bytes_sent = 0
        self.bytes_received = 0

    def _recv_payloads(self, source: int, header: Header, tag_f: int, tag_i: int) -> Message:
        floats = np.empty(header.float_count(), np.float32)
        n_int = header.index_count()
        ints = np.empty(n_int, np.int64) if n_int else None
        reqs = []
        if floats.size:
            reqs.append(self.comm.Irecv(floats, source=source, tag=tag_f))
        if ints is not None:
            reqs.append(self.comm.Irecv(ints, source=source, tag=tag_i))
        self.poller.wait(reqs, f"the {header.kind_name} payload from rank {source}")
        self.bytes_received += _bytes(floats, ints) + 8 * self.hlen
        return Message(source, header, floats, ints)

    def _isend(self, dest: int, header: np.ndarray, floats: np.ndarray | None, ints: np.ndarray | None,
               tags: tuple[int, int, int]) -> list[MPI.Request]:
        reqs = [self.comm.Isend(header, dest=dest, tag=tags[0])]
        if floats is not None and floats.size:
            reqs.append(self.comm.Isend(floats, dest=dest, tag=tags[1]))
        if ints is not None and ints.size:
            reqs.append(self.comm.Isend(ints, dest=dest, tag=tags[2]))
        self.bytes_sent += _bytes(header, floats, ints)
        return reqs


class ServerEndpoint(_Endpoint):
    """Rank 0's side of the asynchronous phase: receive GRAD/DONE, send MODEL/FINAL.

    One header receive per worker is always posted; :meth:`poll` tests them all (``Testany``)
    without blocking. Replies go out with ``Isend`` and are completed lazily (tested at every
    poll; waited for only before the next reply to the same worker, which by then has taken
    the previous one), so the server returns to its own training at once. The reply buffers
    are fresh arrays owned here until their send completes.
    """

    def __init__(self, comm: MPI.Comm, n_layers: int, timeout: float | None = None) -> None:
        super().__init__(comm, n_layers, timeout)
        if self.rank != 0:
            raise ValueError("the WASAP server is rank 0")
        self.workers = list(range(1, self.size))
        self._hdr = {w: np.empty(self.hlen, np.int64) for w in self.workers}
        self._reqs: dict[int, MPI.Request] = {}
        self._sends: dict[int, tuple[list[MPI.Request], tuple]] = {}
        for w in self.workers:
            self._post(w)

    def _post(self, w: int) -> None:
        self._reqs[w] = self.comm.Irecv(self._hdr[w], source=w, tag=TAG_REQ_HDR)

    @property
    def listening(self) -> int:
        """Workers whose header receive is still posted (those that have not sent DONE)."""
        return len(self._reqs)

    def _reap(self) -> None:
        for w in [w for w, (reqs, _) in self._sends.items() if MPI.Request.Testall(reqs)]:
            del self._sends[w]

    def expect(self, w: int) -> None:
        """Listen to worker ``w`` again (after answering its DONE with HOLD: it will say DONE
        again once the checkpoint is written)."""
        if w not in self._reqs:
            self._post(w)

    def complete_replies(self) -> None:
        """Wait until every reply sent so far has been taken (before a collective)."""
        for w in list(self._sends):
            self.poller.wait(self._sends.pop(w)[0], f"rank {w} to take a reply")

    def poll(self) -> Message | None:
        """A complete message from any worker if one has arrived, else None (never blocks on
        a header; the payload, sent right behind its header, is awaited by polling)."""
        self._reap()
        if not self._reqs:
            return None
        ranks = list(self._reqs)
        index, flag = MPI.Request.Testany([self._reqs[w] for w in ranks])
        if not flag or index == MPI.UNDEFINED:
            return None
        w = ranks[index]
        del self._reqs[w]
        header = Header.unpack(self._hdr[w].copy(), w)
        if header.kind == GRAD:
            msg = self._recv_payloads(w, header, TAG_REQ_DATA, TAG_REQ_DATA)
            self._post(w)
            return msg
        if header.kind == DONE:
            self.bytes_received += 8 * self.hlen
            return Message(w, header, np.empty(0, np.float32), None)
        raise ProtocolError(f"rank 0 got a {header.kind_name} message from rank {w} in the asynchronous "
                            "phase; this is a bug")

    def reply(self, dest: int, header: Header, floats: np.ndarray | None, ints: np.ndarray | None) -> None:
        """Start sending MODEL/FINAL/HOLD to ``dest``; ``floats``/``ints`` must not be changed
        afterwards (pass fresh arrays). Completes the previous reply to ``dest`` first."""
        if dest in self._sends:
            self.poller.wait(self._sends.pop(dest)[0], f"rank {dest} to take the previous reply")
        hdr = header.pack(self.n_layers)
        reqs = self._isend(dest, hdr, floats, ints, (TAG_REP_HDR, TAG_REP_F, TAG_REP_I))
        self._sends[dest] = (reqs, (hdr, floats, ints))

    def cancel(self) -> None:
        """Complete every reply and withdraw the posted header receives (the phase stops here:
        a later run on the same communicator must not have its messages matched by them)."""
        self.complete_replies()
        for w in list(self._reqs):
            req = self._reqs.pop(w)
            req.Cancel()
            req.Wait()

    def close(self) -> None:
        """Complete every reply; check that every worker said DONE."""
        for w in list(self._sends):
            self.poller.wait(self._sends.pop(w)[0], f"rank {w} to take the final model")
        if self._reqs:
            raise ProtocolError(f"ranks {sorted(self._reqs)} did not finish the asynchronous phase; this is a bug")


class WorkerEndpoint(_Endpoint):
    """A worker's side: push a gradient, get the model back (or HOLD); say DONE, get the final
    model (or HOLD).

    :meth:`start_push` returns at once (the reply's header receive is posted before the
    request goes out); the worker may compute its next gradient before :meth:`finish_push`.
    """

    def __init__(self, comm: MPI.Comm, n_layers: int, timeout: float | None = None) -> None:
        super().__init__(comm, n_layers, timeout)
        if self.rank == 0:
            raise ValueError("rank 0 is the WASAP server, not a worker")
        self._pending: tuple | None = None

    def _start(self, header: Header, floats: np.ndarray | None) -> None:
        if self._pending is not None:
            raise ProtocolError("a request is already in flight; call finish_push first")
        hdr_in = np.empty(self.hlen, np.int64)
        rreq = self.comm.Irecv(hdr_in, source=0, tag=TAG_REP_HDR)
        hdr_out = header.pack(self.n_layers)
        sreqs = self._isend(0, hdr_out, floats, None, (TAG_REQ_HDR, TAG_REQ_DATA, TAG_REQ_DATA))
        self._pending = (header, hdr_in, rreq, sreqs, hdr_out, floats)

    def start_push(self, header: Header, grads: np.ndarray) -> None:
        """Start sending GRAD (header + float32 gradient payload; do not change ``grads`` until
        :meth:`finish_push` returns)."""
        if header.kind != GRAD or grads.size != header.float_count():
            raise ProtocolError(f"GRAD payload has {grads.size} floats, header implies {header.float_count()}")
        self._start(header, grads)

    def finish_push(self, timeout: float | None = None) -> Message:
        """Wait for the reply to the request in flight (MODEL, or FINAL after DONE; HOLD),
        at most ``timeout`` seconds (default: the poller's)."""
        if self._pending is None:
            raise ProtocolError("no request in flight")
        header, hdr_in, rreq, sreqs, _, _ = self._pending
        self.poller.wait([rreq], f"the server's reply to {header.kind_name} (step {header.step})", timeout)
        reply = Header.unpack(hdr_in, 0)
        if reply.kind not in (MODEL, FINAL, HOLD):
            raise ProtocolError(f"rank {self.rank} expected MODEL, FINAL or HOLD from rank 0, got {reply.kind_name}")
        msg = self._recv_payloads(0, reply, TAG_REP_F, TAG_REP_I)
        self.poller.wait(sreqs, "the server to take the request")
        self._pending = None
        return msg

    def done(self, step: int, flags: int = 0) -> Message:
        """Send DONE; return the FINAL model (sent once every rank has finished), or HOLD.

        No timeout here: the answer comes when the slowest rank has finished its share, which
        may legitimately take longer than any per-message bound. A rank that fails meanwhile
        ends the job through the engine's abort, so this wait cannot outlive the job."""
        self._start(Header(DONE, step=step, flags=flags), None)
        return self.finish_push(timeout=math.inf)


def gather_to_root(comm: MPI.Comm, header: Header, floats: np.ndarray, ints: np.ndarray,
                   timeout: float | None = None) -> list[Message] | None:
    """Send every rank's MERGE message to rank 0. Returns all P messages in rank order on
    rank 0 (its own included, not copied through MPI) and None elsewhere."""
    n_layers = len(header.shapes)
    poller = Poller(timeout)
    if header.kind != MERGE or floats.size != header.float_count() or ints.size != header.index_count():
        raise ProtocolError("MERGE payload sizes do not match its header; this is a bug")
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != 0:
        reqs = [comm.Isend(header.pack(), dest=0, tag=TAG_MERGE_HDR),
                comm.Isend(floats, dest=0, tag=TAG_MERGE_F), comm.Isend(ints, dest=0, tag=TAG_MERGE_I)]
        poller.wait(reqs, "rank 0 to take this rank's model for the final merge")
        return None
    out = [Message(0, header, floats, ints)]
    hdrs = [np.empty(header_len(n_layers), np.int64) for _ in range(1, size)]
    reqs = [comm.Irecv(h, source=r, tag=TAG_MERGE_HDR) for r, h in zip(range(1, size), hdrs)]
    poller.wait(reqs, "every rank's model for the final merge")
    pending = []
    for r, h in zip(range(1, size), hdrs):
        hd = Header.unpack(h, r)
        if hd.kind != MERGE:
            raise ProtocolError(f"rank 0 expected MERGE from rank {r}, got {hd.kind_name}; this is a bug")
        f = np.empty(hd.float_count(), np.float32)
        i = np.empty(hd.index_count(), np.int64)
        pending += [comm.Irecv(f, source=r, tag=TAG_MERGE_F), comm.Irecv(i, source=r, tag=TAG_MERGE_I)]
        out.append(Message(r, hd, f, i))
    poller.wait(pending, "the models of the final merge")
    return out


def bcast_from_root(comm: MPI.Comm, n_layers: int, header: Header | None, floats: np.ndarray | None,
                    ints: np.ndarray | None, timeout: float | None = None) -> Message:
    """Broadcast rank 0's message (a MERGE, or a FINAL model with momentum and indices; sizes
    first, then arrays) with ``Ibcast`` + polling. Every rank returns the message; rank 0
    gets its own arrays back."""
    poller = Poller(timeout)
    rank = comm.Get_rank()
    hdr = header.pack(n_layers) if rank == 0 else np.empty(header_len(n_layers), np.int64)  # type: ignore[union-attr]
    if comm.Get_size() > 1:
        poller.wait([comm.Ibcast(hdr, root=0)], "the final model's sizes from rank 0")
    hd = Header.unpack(hdr, 0)
    if rank != 0:
        floats = np.empty(hd.float_count(), np.float32)
        ints = np.empty(hd.index_count(), np.int64)
    assert floats is not None and ints is not None
    if floats.size != hd.float_count() or ints.size != hd.index_count():
        raise ProtocolError("final model payload sizes do not match its header; this is a bug")
    if comm.Get_size() > 1:
        poller.wait([comm.Ibcast(floats, root=0), comm.Ibcast(ints, root=0)], "the final model from rank 0")
    return Message(0, hd, floats, ints)
