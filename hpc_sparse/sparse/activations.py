"""Hidden-layer activations, fused with inverted dropout, on feature-major ``(width, batch)`` arrays.

Every activation is one of three kinds so that a single numba kernel serves all of them:

* ``KIND_PIECEWISE``: ``f(z) = z`` for ``z >= 0`` and ``slope * z`` below. ReLU is slope 0,
  LeakyReLU slope ``alpha`` and **All-ReLU** slope ``-alpha`` / ``+alpha`` alternating per
  hidden layer (Curci, Mocanu, Pechenizkiy 2021, ``AlternatedLeftReLU`` in the paper's
  code: layer k, 1-based, has ``-alpha`` when k is odd and ``+alpha`` when k is even).
* ``KIND_TANH`` and ``KIND_SIGMOID``.

Dropout masks come from a counter-based hash of ``(key, element index)``, so a mask is a
pure function of the run seed, step, rank and layer: nothing to store, resumable exactly,
and identical for any thread count. The compiled activation and mask code is fused into
the layer kernels (:mod:`kernels_forward`, :mod:`kernels_backward`); the numpy methods here
are the references.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KIND_PIECEWISE, KIND_TANH, KIND_SIGMOID = 0, 1, 2
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
    ``-alpha`` if k is odd and ``+alpha`` if k is even (the paper's All-ReLU; its code's ``AlternatedLeftReLU``).
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

def dropout_keep_mask(key: np.uint64, shape: tuple[int, ...], p: float) -> np.ndarray:
    """numpy reference of the kernels' dropout mask for one layer's ``(width, B)`` array: element
    e (row-major) is kept when the top 32 bits of splitmix64(key + e * golden) are >= p * 2**32.
    bool, of ``shape``."""
    e = np.arange(int(np.prod(shape)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(key) + e * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(32)) >= np.uint64(int(p * 2 ** 32))).reshape(shape)


__all__ = ["Activation", "KIND_PIECEWISE", "KIND_SIGMOID", "KIND_TANH", "dropout_keep_mask", "dropout_key",
           "hidden_activations"]
