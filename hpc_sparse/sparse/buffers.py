"""Activation-sized scratch of a :class:`~hpc_sparse.sparse.mlp.SparseMLP` for one batch size,
and the cache blocking plan of every layer for the current step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpc_sparse.sparse.blocking import LayerPlan
from hpc_sparse.sparse.kernels_elementwise import zinfo_shape

ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary, so that a
    row of a (width, batch) float32 activation with ``batch % 16 == 0`` spans whole cache lines
    (numpy's default 16-byte alignment makes every gathered row touch one line more)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n].view(dt).reshape(shape)


@dataclass
class Buffers:
    """Everything a step stores per sample, in the activation ``dtype`` (float32, or uint16
    holding bfloat16) unless noted.

    ``x`` the feature-major input (width_0, B); per hidden layer l ``a[l]`` (width_{l+1}, B) its
    activation and ``zinfo[l]`` what the backward pass needs of its pre-activation (sign bits
    or values, :func:`kernels_elementwise.zinfo_shape`); per layer ``delta[l]`` (width_{l+1}, B)
    dL/dz; ``logits`` (C, B) and ``dlogits`` (C, B) float32 (``delta[-1]`` is ``dlogits`` itself
    when the dtype is float32, else its rounded copy); ``gbias[l]`` (width_{l+1},) float32 bias
    gradients; per-sample ``losses`` and ``correct``; ``plans[l]`` the layer's cache blocking
    and ``keys[l]`` its dropout key, both set by each forward pass for its step. Float32
    kernel scratch comes from :meth:`scratch`."""

    batch: int
    widths: tuple[int, ...]
    dtype: type = np.float32
    kinds: tuple[int, ...] = ()
    plans: list[LayerPlan] = field(init=False, default_factory=list)
    keys: list[np.uint64] = field(init=False, default_factory=list)
    x: np.ndarray = field(init=False)
    a: list[np.ndarray] = field(init=False)
    zinfo: list[np.ndarray] = field(init=False)
    delta: list[np.ndarray] = field(init=False)
    logits: np.ndarray = field(init=False)
    dlogits: np.ndarray = field(init=False)
    gbias: list[np.ndarray] = field(init=False)
    losses: np.ndarray = field(init=False)
    correct: np.ndarray = field(init=False)
    _scratch: dict[str, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        b, w, dt = self.batch, self.widths, self.dtype
        kinds = self.kinds or (0,) * (len(w) - 2)
        self.x = aligned_empty((w[0], b), dt)
        self.a = [aligned_empty((n, b), dt) for n in w[1:-1]]
        self.zinfo = []
        for n, kind in zip(w[1:-1], kinds):
            shape, zdt = zinfo_shape(kind, n, b)
            self.zinfo.append(aligned_empty(shape, zdt or dt))
        self.logits = aligned_empty((w[-1], b), np.float32)
        self.dlogits = aligned_empty((w[-1], b), np.float32)
        self.delta = [aligned_empty((n, b), dt) for n in w[1:-1]]
        self.delta.append(self.dlogits if np.dtype(dt) == np.float32 else aligned_empty((w[-1], b), dt))
        self.gbias = [np.empty(n, np.float32) for n in w[1:]]
        self.losses = np.empty(b, np.float64)
        self.correct = np.empty(b, np.uint8)

    def scratch(self, name: str, rows: int, cols: int) -> np.ndarray:
        """A float32 (rows, cols) C-contiguous scratch array, reused (and grown) across calls
        with the same ``name``; its contents are undefined."""
        n = max(1, rows * cols)
        flat = self._scratch.get(name)
        if flat is None or flat.size < n:
            flat = self._scratch[name] = aligned_empty((n,), np.float32)
        return flat[:rows * cols].reshape(rows, cols)

    def nbytes(self) -> int:
        """Bytes held by the per-sample arrays and the scratch."""
        arrays = [self.x, self.logits, *self.a, *self.zinfo, *self.delta, *self._scratch.values()]
        if self.delta[-1] is not self.dlogits:
            arrays.append(self.dlogits)
        return sum(a.nbytes for a in arrays)
