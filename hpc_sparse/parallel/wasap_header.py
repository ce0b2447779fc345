"""WASAP-SGD's message header: a fixed-size int64 array in front of every message.

Pure numpy (no MPI); :mod:`hpc_sparse.parallel.wasap` sends and receives it. Every message
is this header, sent on its own tag, followed by at most two payload messages whose lengths
the header implies:

========  ====================  ==============================================================
kind      direction             payloads
========  ====================  ==============================================================
GRAD      worker -> server      float32: per layer ``dW`` (nnz_l) then ``db`` (n_out_l)
DONE      worker -> server      none (the worker finished its asynchronous batches)
MODEL     server -> worker      float32: per layer ``W.data``, ``b``; then, with
                                FLAG_MOMENTUM, per layer ``W momentum``, ``b momentum``.
                                int64 (FLAG_INDICES only): per layer ``indptr``, ``indices``
FINAL     server -> worker      as MODEL, always with indices and momentum; also the
                                model of a checkpoint (broadcast to every rank)
HOLD      server -> worker      none: stop sending, a checkpoint (and maybe a stop) follows
MERGE     any rank -> 0, and    float32 ``W.data``, ``b`` per layer; int64 ``indptr``,
          0 -> all (Ibcast)     ``indices`` per layer
========  ====================  ==============================================================

A worker sets FLAG_STOP in its GRAD/DONE headers once it has been asked to stop (SIGUSR1 or
SIGTERM), so that the server, which decides, learns of it at the next message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

MAGIC = 0x57415341  # "WASA"
GRAD, DONE, MODEL, FINAL, MERGE, HOLD = 1, 2, 3, 4, 5, 6
KIND_NAMES = {GRAD: "GRAD", DONE: "DONE", MODEL: "MODEL", FINAL: "FINAL", MERGE: "MERGE", HOLD: "HOLD"}
FLAG_INDICES = 1  # int64 index payload follows (topology changed since the receiver's last pull)
FLAG_MOMENTUM = 2  # float payload also carries the momentum buffers
FLAG_STOP = 4  # GRAD/DONE: the sending worker got a stop request

_FIXED = 10
_NO_SHAPES = (DONE, HOLD)


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
        GRAD, DONE, MODEL, FINAL, HOLD or MERGE.
    step : int
        The sender's step counter (GRAD), or the server's accepted-update count (MODEL).
    version : int
        Topology version the payload lives on.
    flags : int
        FLAG_INDICES | FLAG_MOMENTUM | FLAG_STOP.
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
        run is fixed; DONE and HOLD headers carry no shapes, their layer slots are zero)."""
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
                   [] if kind in _NO_SHAPES else shapes)  # type: ignore[arg-type]

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
