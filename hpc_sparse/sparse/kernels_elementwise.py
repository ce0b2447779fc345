"""Element-wise helpers that the compute kernels inline: activation storage (float32 or
bfloat16), the sign bits of piecewise-linear pre-activations, the dropout hash, activations
and their derivatives.

**bfloat16 storage.** With ``train.activation_dtype = "bfloat16"`` the activations and deltas
of a step live in ``uint16`` arrays holding the top 16 bits of a float32 (:data:`BF16`); every
product and sum is still computed in float32. A load widens exactly (the 16 bits shifted up);
a store rounds to nearest, ties to even, written out here with integer operations so that no
compiler flag can change it; a NaN stays a (quiet) NaN. The kernels are generic over the
storage: :func:`load` and :func:`stored` dispatch on the array's dtype when numba compiles
them, so the float32 path is the plain float32 code.

**What the backward pass needs of the forward pass.** A piecewise-linear activation (ReLU,
LeakyReLU, All-ReLU) has ``f'(z) = 1`` for ``z >= 0`` and ``slope`` below, so the forward
pass keeps one bit per element, the sign of z (:func:`put_z`, packed little-endian into
``(width, ceil(B / 8))`` uint8). tanh and sigmoid keep z itself, in the activation dtype. The
dropout mask is never stored: it is a counter-based hash of (key, element index)
(:func:`keep`) that the backward pass recomputes.

numba's on-disk cache keys a kernel on the content of the file that defines it, not on the
files it imports: after editing this file, clear numba's cache (``__pycache__/*.nbi`` and
``*.nbc`` beside the kernels, or a fresh ``NUMBA_CACHE_DIR``) before running the kernels.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

BF16 = np.uint16
"""Storage dtype of bfloat16 activations: the top 16 bits of the float32."""

ACTIVATION_DTYPES = {"float32": np.float32, "bfloat16": BF16}
"""``train.activation_dtype`` names and their storage dtypes."""

_U32 = np.uint32
_OPTS = dict(cache=True, nogil=True, boundscheck=False)


# ------------------------------------------------------------------ numpy references
def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded).astype(BF16)


def from_bfloat16(h: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exact."""
    return (np.asarray(h, BF16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def as_float32(x: np.ndarray) -> np.ndarray:
    """An activation array as float32: ``x`` itself if it is float32, else its widened copy."""
    return x if x.dtype == np.float32 else from_bfloat16(x)


# ------------------------------------------------------------- numba: storage dtype
@njit(inline="always", **_OPTS)
def _bf16_to_f32(h):  # pragma: no cover - numba
    return _U32(_U32(h) << _U32(16)).view(np.float32)


@njit(inline="always", **_OPTS)
def _f32_to_bf16(x):  # pragma: no cover - numba
    u = np.float32(x).view(np.uint32)
    rounded = _U32(_U32(u + _U32(_U32(0x7FFF) + _U32(_U32(u >> _U32(16)) & _U32(1)))) >> _U32(16))
    quiet_nan = _U32(_U32(u >> _U32(16)) | _U32(0x40))
    return np.uint16(quiet_nan if _U32(u & _U32(0x7FFFFFFF)) > _U32(0x7F800000) else rounded)


def load(x):  # pragma: no cover - replaced by the overload in compiled code
    """float32 value of one stored activation element (float32 or bfloat16 bits)."""
    raise NotImplementedError


def stored(x, arr):  # pragma: no cover - replaced by the overload in compiled code
    """The float32 ``x`` converted to the element type of ``arr`` (float32, or bfloat16 bits)."""
    raise NotImplementedError


@overload(load)
def _load_impl(x):  # pragma: no cover - numba
    if x == types.uint16:
        return lambda x: _bf16_to_f32(x)
    return lambda x: np.float32(x)


@overload(stored)
def _stored_impl(x, arr):  # pragma: no cover - numba
    if arr.dtype == types.uint16:
        return lambda x, arr: _f32_to_bf16(x)
    return lambda x, arr: np.float32(x)


# ---------------------------------------------------------- numba: what z leaves behind
def put_z(zinfo, j, c0, zr):  # pragma: no cover - replaced by the overload
    """Record row j's pre-activations ``zr`` (float32, samples c0 .. c0 + len(zr)): their sign
    bits if ``zinfo`` is uint8, else the values in zinfo's dtype."""
    raise NotImplementedError


def z_negative(zinfo, i, b):  # pragma: no cover - replaced by the overload
    """True if z[i, b] < 0 (uint8 sign bits, or stored values)."""
    raise NotImplementedError


def z_value(zinfo, i, b):  # pragma: no cover - replaced by the overload
    """z[i, b] as float32 (stored values only; 0 for sign bits)."""
    raise NotImplementedError


@overload(put_z)
def _put_z_impl(zinfo, j, c0, zr):  # pragma: no cover - numba
    if zinfo.dtype == types.uint8:
        def put_bits(zinfo, j, c0, zr):
            n = zr.shape[0]
            zb = zinfo[j]
            b = 0
            if c0 % 8 == 0:  # whole bytes, no read-modify-write; a counted loop, for LLVM
                zs = zinfo[j, c0 // 8:]
                for g in range(n // 8):
                    byte = 0
                    for t in range(8):
                        byte |= (1 << t) if zr[8 * g + t] < 0 else 0
                    zs[g] = byte
                b = n // 8 * 8
            while b < n:  # a chunk edge inside a byte
                e = c0 + b
                bit = 1 << (e & 7)
                old = zb[e >> 3]
                zb[e >> 3] = (old | bit) if zr[b] < 0 else (old & ~bit)
                b += 1
        return put_bits

    def put_values(zinfo, j, c0, zr):
        zs = zinfo[j, c0:c0 + zr.shape[0]]
        for b in range(zr.shape[0]):
            zs[b] = stored(zr[b], zinfo)
    return put_values


@overload(z_negative)
def _z_negative_impl(zinfo, i, b):  # pragma: no cover - numba
    if zinfo.dtype == types.uint8:
        return lambda zinfo, i, b: (zinfo[i, b >> 3] >> (b & 7)) & 1 != 0
    return lambda zinfo, i, b: load(zinfo[i, b]) < 0


@overload(z_value)
def _z_value_impl(zinfo, i, b):  # pragma: no cover - numba
    if zinfo.dtype == types.uint8:
        return lambda zinfo, i, b: np.float32(0.0)
    return lambda zinfo, i, b: load(zinfo[i, b])


def zinfo_shape(kind: int, width: int, batch: int) -> tuple[tuple[int, int], type | None]:
    """Shape and dtype (None: the activation dtype) of what a hidden layer keeps of z: sign
    bits for the piecewise-linear kind 0, the values otherwise."""
    if kind == 0:
        return (width, (batch + 7) // 8), np.uint8
    return (width, batch), None


# ------------------------------------------------------------------ numba: the math
@njit(inline="always", **_OPTS)
def keep(key, idx, threshold):  # pragma: no cover - numba
    """The dropout mask: True with probability 1 - p. splitmix64 of (key + idx * golden), its
    top 32 bits against ``threshold = p * 2**32``; ``idx`` is the element's index in the
    (width, B) array, so a mask depends on neither chunks, blocks nor threads."""
    x = key + np.uint64(idx) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)) >= threshold


@njit(inline="always", **_OPTS)
def activate(kind, slope, z):  # pragma: no cover - numba
    """f(z) for the kinds of :mod:`activations` (0 piecewise-linear, 1 tanh, 2 sigmoid)."""
    if kind == 0:
        return z if z >= 0 else slope * z
    if kind == 1:
        return np.tanh(z)
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-z))


@njit(inline="always", **_OPTS)
def derivative(kind, slope, z):  # pragma: no cover - numba
    """f'(z) of the smooth kinds (1 tanh, 2 sigmoid); kind 0 uses the sign bit instead."""
    if kind == 1:
        t = np.tanh(z)
        return np.float32(1.0) - t * t
    s = np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
    return s * (np.float32(1.0) - s)
