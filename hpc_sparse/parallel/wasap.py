"""WASAP-SGD messaging: buffer-based, non-blocking point-to-point messages and polling waits.

Everything here moves flat numpy arrays; what the arrays mean (which layer, weights or
momentum) is decided by :mod:`hpc_sparse.train_wasap`. No message is pickled.

Every message starts with a fixed-size int64 **header** (:class:`Header`, length
``10 + 3 * n_layers``, constant for a run) sent on its own tag, followed by at most two
payload messages whose lengths the header implies:

========  ====================  ==============================================================
kind      direction             payloads
========  ====================  ==============================================================
GRAD      worker -> server      float32: per layer ``dW`` (nnz_l) then ``db`` (n_out_l)
DONE      worker -> server      none (the worker finished its asynchronous epochs)
MODEL     server -> worker      float32: per layer ``W.data``, ``b``; then, with
                                FLAG_MOMENTUM, per layer ``W momentum``, ``b momentum``.
                                int64 (FLAG_INDICES only): per layer ``indptr``, ``indices``
FINAL     server -> worker      as MODEL, always with indices and momentum
MERGE     any rank -> 0, and    float32 ``W.data``, ``b`` per layer; int64 ``indptr``,
          0 -> all (Ibcast)     ``indices`` per layer
========  ====================  ==============================================================

Waiting never spins inside a blocking MPI call: :class:`Poller` tests the requests and sleeps
with an exponential back-off (20 us up to 1 ms) between tests, and raises :class:`WasapTimeout`
naming what it waited for after ``timeout`` seconds (MPICH's blocking receive busy-polls a core,
which cost the paper's idle parameter server most of a core; PAPER.md §4, DESIGN.md §4).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

MAGIC = 0x57415341  # "WASA"
GRAD, DONE, MODEL, FINAL, MERGE = 1, 2, 3, 4, 5
KIND_NAMES = {GRAD: "GRAD", DONE: "DONE", MODEL: "MODEL", FINAL: "FINAL", MERGE: "MERGE"}
FLAG_INDICES = 1  # int64 index payload follows (topology changed since the receiver's last pull)
FLAG_MOMENTUM = 2  # float payload also carries the momentum buffers

_FIXED = 10
TAG_REQ_HDR, TAG_REQ_DATA = 701, 702
TAG_REP_HDR, TAG_REP_F, TAG_REP_I = 711, 712, 713
TAG_MERGE_HDR, TAG_MERGE_F, TAG_MERGE_I = 721, 722, 723

DEFAULT_TIMEOUT = 3600.0
"""Seconds a rank waits for one message before giving up; the environment variable
``HPC_SPARSE_WASAP_TIMEOUT`` overrides it (read when a :class:`Poller` is made)."""


def default_timeout() -> float:
    """``HPC_SPARSE_WASAP_TIMEOUT`` if set, else :data:`DEFAULT_TIMEOUT` (seconds)."""
    return float(os.environ.get("HPC_SPARSE_WASAP_TIMEOUT", "") or DEFAULT_TIMEOUT)


class WasapTimeout(RuntimeError):
    """A peer did not answer in time: it probably failed; the job must end."""


class ProtocolError(RuntimeError):
    """A malformed or unexpected message: a bug, never to be trained on."""


def header_len(n_layers: int) -> int:
    """Length (int64 entries) of every header of a run with ``n_layers`` weight layers."""
    return _FIXED + 3 * n_layers


@dataclass
class Header:
    """The fixed-size int64 header in front of every WASAP message.

    Layout (int64): ``[MAGIC, kind, step, version, flags, item, loss_sum (float64 bits),
    correct, count, n_layers, (nnz, n_in, n_out) per layer]``.

    Attributes
    ----------
    kind : int
        GRAD, DONE, MODEL, FINAL or MERGE.
    step : int
        The sender's step counter (GRAD), or the server's accepted-update count (MODEL).
    version : int
        Topology version the payload lives on.
    flags : int
        FLAG_INDICES | FLAG_MOMENTUM.
    item : int
        GRAD: the batch's index in the worker's sequence of asynchronous batches. MODEL: the
        worker's batch limit (it stops before this index; lowered when the server takes over
        the tail of a slow worker's batches).
    loss_sum, correct, count : float, int, int
        GRAD: the batch's summed loss, hits (-1 if unknown) and samples.
    shapes : list of (nnz, n_in, n_out)
        One triple per weight layer.
    """

    kind: int
    step: int = 0
    version: int = 0
    flags: int = 0
    item: int = 0
    loss_sum: float = 0.0
    correct: int = -1
    count: int = 0
    shapes: list[tuple[int, int, int]] = field(default_factory=list)

    def pack(self, n_layers: int | None = None) -> np.ndarray:
        """The header as a new int64 array of ``header_len(n_layers)`` (the layer count of a
        run is fixed; DONE headers carry no shapes, their layer slots are zero)."""
        n = len(self.shapes) if n_layers is None else n_layers
        if len(self.shapes) not in (0, n):
            raise ValueError(f"header has {len(self.shapes)} layer shapes, the run has {n} layers")
        buf = np.zeros(header_len(n), np.int64)
        loss_bits = struct.unpack("<q", struct.pack("<d", float(self.loss_sum)))[0]
        buf[:_FIXED] = [MAGIC, self.kind, self.step, self.version, self.flags, self.item, loss_bits,
                        self.correct, self.count, n]
        if self.shapes:
            buf[_FIXED:] = np.asarray(self.shapes, np.int64).ravel()
        return buf

    @classmethod
    def unpack(cls, buf: np.ndarray, source: int | None = None) -> "Header":
        """Parse and check a received header; raises ProtocolError on a malformed one."""
        who = f" from rank {source}" if source is not None else ""
        if buf.dtype != np.int64 or buf.ndim != 1 or buf.size < _FIXED or int(buf[0]) != MAGIC:
            raise ProtocolError(f"malformed WASAP header{who} (magic {buf[:1]!r}); this is a bug")
        n = int(buf[9])
        if buf.size != header_len(n) or int(buf[1]) not in KIND_NAMES:
            raise ProtocolError(f"malformed WASAP header{who}: kind {int(buf[1])}, {n} layers in "
                                f"{buf.size} entries; this is a bug")
        shapes = [tuple(int(v) for v in buf[_FIXED + 3 * l:_FIXED + 3 * l + 3]) for l in range(n)]
        if any(s < 0 for t in shapes for s in t):
            raise ProtocolError(f"WASAP header{who} has negative sizes {shapes}; this is a bug")
        loss = struct.unpack("<d", struct.pack("<q", int(buf[6])))[0]
        kind = int(buf[1])
        return cls(kind, int(buf[2]), int(buf[3]), int(buf[4]), int(buf[5]), loss, int(buf[7]), int(buf[8]),
                   [] if kind == DONE else shapes)  # type: ignore[arg-type]

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, str(self.kind))

    def float_count(self) -> int:
        """float32 entries of this message's float payload."""
        per = sum(nnz + n_out for nnz, _, n_out in self.shapes)
        if self.kind == GRAD:
            return per
        if self.kind in (MODEL, FINAL):
            return per * (2 if self.flags & FLAG_MOMENTUM else 1)
        if self.kind == MERGE:
            return per
        return 0

    def index_count(self) -> int:
        """int64 entries of this message's index payload (0: none is sent)."""
        if self.kind == MERGE or (self.kind in (MODEL, FINAL) and self.flags & FLAG_INDICES):
            return sum(n_in + 1 + nnz for nnz, n_in, _ in self.shapes)
        return 0


class Poller:
    """Waits on MPI requests by testing and sleeping (exponential back-off), with a timeout.

    Attributes
    ----------
    wait_seconds : float
        Total wall time spent waiting in :meth:`wait` (communication and idle time).
    """

    def __init__(self, timeout: float | None = None, min_sleep: float = 2e-5, max_sleep: float = 1e-3) -> None:
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.min_sleep, self.max_sleep = min_sleep, max_sleep
        self.wait_seconds = 0.0

    def wait(self, reqs: list[MPI.Request], what: str) -> None:
        """Complete every request of ``reqs``; raise WasapTimeout naming ``what`` on timeout."""
        t0 = time.perf_counter()
        sleep = self.min_sleep
        try:
            while not MPI.Request.Testall(reqs):
                now = time.perf_counter()
                if now - t0 > self.timeout:
                    for r in reqs:
                        if r != MPI.REQUEST_NULL:
                            try:
                                r.Cancel()
                            except MPI.Exception:  # pragma: no cover - best effort
                                pass
                    raise WasapTimeout(f"waited {self.timeout:g} s for {what}; a peer rank has probably failed "
                                       "or hangs; fix: check the other ranks' errors (or raise "
                                       "HPC_SPARSE_WASAP_TIMEOUT if one epoch legitimately takes longer)")
                time.sleep(sleep)
                sleep = min(2 * sleep, self.max_sleep)
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def idle(self, sleep: float) -> float:
        """Sleep ``sleep`` seconds (counted as waiting); returns the next back-off interval."""
        t0 = time.perf_counter()
        time.sleep(sleep)
        self.wait_seconds += time.perf_counter() - t0
        return min(2 * sleep, self.max_sleep)


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

    def reply(self, dest: int, header: Header, floats: np.ndarray, ints: np.ndarray | None) -> None:
        """Start sending MODEL/FINAL to ``dest``; ``floats``/``ints`` must not be changed
        afterwards (pass fresh arrays). Completes the previous reply to ``dest`` first."""
        if dest in self._sends:
            self.poller.wait(self._sends.pop(dest)[0], f"rank {dest} to take the previous reply")
        hdr = header.pack(self.n_layers)
        reqs = self._isend(dest, hdr, floats, ints, (TAG_REP_HDR, TAG_REP_F, TAG_REP_I))
        self._sends[dest] = (reqs, (hdr, floats, ints))

    def close(self) -> None:
        """Complete every reply; check that every worker said DONE."""
        for w in list(self._sends):
            self.poller.wait(self._sends.pop(w)[0], f"rank {w} to take the final model")
        if self._reqs:
            raise ProtocolError(f"ranks {sorted(self._reqs)} did not finish the asynchronous phase; this is a bug")


class WorkerEndpoint(_Endpoint):
    """A worker's side: push a gradient, get the model back; say DONE, get the final model.

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

    def finish_push(self) -> Message:
        """Wait for the reply to the request in flight (MODEL, or FINAL after DONE)."""
        if self._pending is None:
            raise ProtocolError("no request in flight")
        header, hdr_in, rreq, sreqs, _, _ = self._pending
        self.poller.wait([rreq], f"the server's reply to {header.kind_name} (step {header.step})")
        reply = Header.unpack(hdr_in, 0)
        if reply.kind not in (MODEL, FINAL):
            raise ProtocolError(f"rank {self.rank} expected MODEL or FINAL from rank 0, got {reply.kind_name}")
        msg = self._recv_payloads(0, reply, TAG_REP_F, TAG_REP_I)
        self.poller.wait(sreqs, "the server to take the request")
        self._pending = None
        return msg

    def push(self, header: Header, grads: np.ndarray) -> Message:
        """Send GRAD and return the server's MODEL reply."""
        self.start_push(header, grads)
        return self.finish_push()

    def done(self, step: int) -> Message:
        """Send DONE; return the FINAL model (sent once every rank has finished)."""
        self._start(Header(DONE, step=step), None)
        return self.finish_push()


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
    """Broadcast rank 0's MERGE message (sizes first, then arrays) with ``Ibcast`` + polling.
    Every rank returns the message; rank 0 gets its own arrays back."""
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


def bcast_bytes(comm: MPI.Comm, data: bytes | None, timeout: float | None = None) -> bytes:
    """Broadcast a byte string from rank 0 (length first, then bytes; buffer-based)."""
    if comm.Get_size() == 1:
        return data or b""
    poller = Poller(timeout)
    root = comm.Get_rank() == 0
    n = np.array([len(data or b"") if root else 0], np.int64)
    poller.wait([comm.Ibcast(n, root=0)], "a length from rank 0")
    buf = np.frombuffer(data or b"", np.uint8).copy() if root else np.empty(int(n[0]), np.uint8)
    poller.wait([comm.Ibcast(buf, root=0)], "bytes from rank 0")
    return buf.tobytes()


def allreduce_sum(comm: MPI.Comm, buf: np.ndarray, timeout: float | None = None) -> np.ndarray:
    """In-place SUM over all ranks with ``Iallreduce`` + polling (ranks that arrive early
    sleep instead of spinning). Returns ``buf``."""
    if comm.Get_size() > 1:
        Poller(timeout).wait([comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)], "the other ranks' epoch sums")
    return buf


def barrier(comm: MPI.Comm, timeout: float | None = None) -> None:
    """A barrier that sleeps while it waits (``Ibarrier`` + polling)."""
    if comm.Get_size() > 1:
        Poller(timeout).wait([comm.Ibarrier()], "the other ranks at a barrier")
