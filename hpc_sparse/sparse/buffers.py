"""Activation-sized scratch of a :class:`~hpc_sparse.sparse.mlp.SparseMLP` for one batch size,
and the cache blocking plan of every layer for the current step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpc_sparse.sparse.blocking import LayerPlan

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
    """Per layer l: ``z[l]`` (pre-activation), ``delta[l]`` (dL/dz) of shape (width_{l+1}, B);
    for hidden layers ``a[l]`` (activation) and ``keep[l]`` (dropout mask, uint8); ``x`` the
    feature-major input (width_0, B); ``gbias[l]`` (width_{l+1},) bias gradients; per-sample
    ``losses`` and ``correct``; ``plans[l]`` the layer's cache blocking, set by each forward
    pass for its step."""

    batch: int
    widths: tuple[int, ...]
    plans: list[LayerPlan] = field(init=False, default_factory=list)
    x: np.ndarray = field(init=False)
    z: list[np.ndarray] = field(init=False)
    a: list[np.ndarray] = field(init=False)
    keep: list[np.ndarray] = field(init=False)
    delta: list[np.ndarray] = field(init=False)
    gbias: list[np.ndarray] = field(init=False)
    losses: np.ndarray = field(init=False)
    correct: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        b, w = self.batch, self.widths
        self.x = aligned_empty((w[0], b), np.float32)
        self.z = [aligned_empty((n, b), np.float32) for n in w[1:]]
        self.a = [aligned_empty((n, b), np.float32) for n in w[1:-1]]
        self.keep = [aligned_empty((n, b), np.uint8) for n in w[1:-1]]
        self.delta = [aligned_empty((n, b), np.float32) for n in w[1:]]
        self.gbias = [np.empty(n, np.float32) for n in w[1:]]
        self.losses = np.empty(b, np.float64)
        self.correct = np.empty(b, np.uint8)
