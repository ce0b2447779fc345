"""Hidden-layer activations, fused with inverted dropout, on feature-major ``(width, batch)`` arrays.

Every activation is one of three kinds so that a single numba kernel serves all of them:

* ``KIND_PIECEWISE``: ``f(z) = z`` for ``z >= 0`` and ``slope * z`` below. ReLU is slope 0,
  LeakyReLU slope ``alpha`` and **All-ReLU** slope ``-alpha`` / ``+alpha`` alternating per
  hidden layer (Curci, Mocanu, Pechenizkiy 2021, ``AlternatedLeftReLU`` in the paper's
  code: layer k, 1-based, has ``-alpha`` when k is odd and ``+alpha`` when k is even).
* ``KIND_TANH`` and ``KIND_SIGMOID``.

Dropout masks come from a counter-based hash of ``(key, element index)``, so a mask is a
pure function of the run seed, step, rank and layer: nothing to store, resumable exactly,
and identical for any thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

KIND_PIECEWISE, KIND_TANH, KIND_SIGMOID = 0, 1, 2
_OPTS = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Activation:
    """One hidden layer's activation: ``kind`` (see module doc) and the negative-side ``slope``."""

    kind: int
    slope: float = 0.0
    name: str = ""

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """Reference numpy implementation (tests, bias folding). Same shape as ``z``."""
        if self.kind == KIND_PIECEWISE:
            return np.where(z >= 0, z, np.float32(self.slope) * z).astype(z.dtype)
        if self.kind == KIND_TANH:
            return np.tanh(z)
        return (1.0 / (1.0 + np.exp(-z))).astype(z.dtype)

    def derivative(self, z: np.ndarray) -> np.ndarray:
        """Reference numpy derivative ``f'(z)``."""
        if self.kind == KIND_PIECEWISE:
            return np.where(z >= 0, 1.0, self.slope).astype(z.dtype)
        if self.kind == KIND_TANH:
            return (1.0 - np.tanh(z) ** 2).astype(z.dtype)
        s = 1.0 / (1.0 + np.exp(-z))
        return (s * (1.0 - s)).astype(z.dtype)


def hidden_activations(name: str, alpha: float, n_hidden: int) -> list[Activation]:
    """The activation of each of ``n_hidden`` hidden layers for a config name.

    ``allrelu`` alternates the sign of the negative slope: hidden layer k (1-based) gets
    ``-alpha`` if k is odd and ``+alpha`` if k is even (paper §All-ReLU; PAPER.md §2).
    """
    out = []
    for k in range(1, n_hidden + 1):
        if name == "allrelu":
            out.append(Activation(KIND_PIECEWISE, -alpha if k % 2 == 1 else alpha, name))
        elif name == "relu":
            out.append(Activation(KIND_PIECEWISE, 0.0, name))
        elif name == "leaky_relu":
            out.append(Activation(KIND_PIECEWISE, alpha, name))
        elif name == "tanh":
            out.append(Activation(KIND_TANH, 0.0, name))
        elif name == "sigmoid":
            out.append(Activation(KIND_SIGMOID, 0.0, name))
        else:
            raise ValueError(f"unknown activation {name!r}")
    return out


def dropout_key(seed: int, step: int, rank: int, layer: int) -> np.uint64:
    """The 64-bit key of one dropout mask, mixed from its coordinates (splitmix64 steps)."""
    x = 0
    for part in (seed, step, rank, layer):
        x = (x ^ (part & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return np.uint64(x)


@njit(inline="always", **_OPTS)
def _apply(kind, slope, z):  # pragma: no cover - numba
    if kind == 0:
        return z if z >= 0 else slope * z
    if kind == 1:
        return np.tanh(z)
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-z))


@njit(inline="always", **_OPTS)
def _deriv(kind, slope, z):  # pragma: no cover - numba
    if kind == 0:
        return np.float32(1.0) if z >= 0 else slope
    if kind == 1:
        t = np.tanh(z)
        return np.float32(1.0) - t * t
    s = np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
    return s * (np.float32(1.0) - s)


@njit(inline="always", **_OPTS)
def _keep(key, idx, threshold):  # pragma: no cover - numba
    """True with probability 1 - p: splitmix64 of (key + idx), top 32 bits against p*2^32."""
    x = key + np.uint64(idx) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)) >= threshold


@njit(parallel=True, **_OPTS)
def activate_dropout(z, kind, slope, threshold, scale, key, a, keep):  # pragma: no cover
    """a = f(z) * mask * scale, in place per element; keep (uint8) records the mask.

    ``threshold = p * 2**32`` (0 disables dropout), ``scale = 1/(1-p)``.
    z, a: (width, B) float32; keep: (width, B) uint8.
    """
    n, nb = z.shape
    for j in prange(n):
        for b in range(nb):
            y = _apply(kind, slope, z[j, b])
            if threshold > 0:
                if _keep(key, j * nb + b, threshold):
                    keep[j, b] = 1
                    a[j, b] = y * scale
                else:
                    keep[j, b] = 0
                    a[j, b] = 0.0
            else:
                a[j, b] = y


@njit(parallel=True, **_OPTS)
def activate(z, kind, slope, a):  # pragma: no cover - numba
    """a = f(z) without dropout (evaluation). z, a: (width, B)."""
    n, nb = z.shape
    for j in prange(n):
        for b in range(nb):
            a[j, b] = _apply(kind, slope, z[j, b])


@njit(parallel=True, **_OPTS)
def spmm_backward_act(indptr, indices, data, delta, z, keep, kind, slope, scale, use_keep, out):  # pragma: no cover
    """Backward through a layer and the activation below it, fused.

    out[i, :] = (W @ delta)[i, :] * f'(z[i, :]) * mask[i, :] * scale, where W is (n_in, n_out)
    in CSR, delta (n_out, B) is dL/dz of this layer, z (n_in, B) the pre-activation of the
    layer below and keep its dropout mask (ignored unless ``use_keep``).
    """
    n_in, nb = out.shape
    for i in prange(n_in):
        for b in range(nb):
            out[i, b] = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            w = data[k]
            c = indices[k]
            for b in range(nb):
                out[i, b] += w * delta[c, b]
        for b in range(nb):
            g = out[i, b] * _deriv(kind, slope, z[i, b])
            if use_keep:
                g = g * scale if keep[i, b] else np.float32(0.0)
            out[i, b] = g
