"""Counter-based image augmentation: random shifts and horizontal flips of training batches.

The paper's code augmented CIFAR-10 with Keras' ImageDataGenerator (width/height shift 0.1,
horizontal flip, rotation 10 degrees; the paper's code, docs/paper-differences.md), drawing from a global RNG, so a resumed
run saw different images. Here each sample's transform is a pure function of
``(seed, epoch, sample index)``: the same sample in the same epoch gets the same shift and
flip on any rank, in any batch, before or after a resume, at any rank count.
"""

from __future__ import annotations

import numpy as np

MAX_SHIFT_FRACTION = 0.1  # the paper's Keras width/height_shift_range
_MASK = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on a uint64 array (wraps modulo 2**64 by design)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_int(z: int) -> int:
    """SplitMix64's finaliser on a Python int (the scalar counterpart of :func:`_mix64`)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def transform_keys(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """One 64-bit random word per sample, a pure function of ``(seed, epoch, sample id)``.

    ``sample_ids`` (n,) integer indices into the training set. Returns (n,) uint64."""
    base = _mix_int(_mix_int(seed + 0xA0611E47A5EED5) ^ (epoch + 0x5DEECE66D))
    ids = np.asarray(sample_ids).astype(np.uint64)
    return _mix64(np.uint64(base) ^ _mix64(ids + np.uint64(0x9E3779B97F4A7C15)))


def shifts_and_flips(keys: np.ndarray, max_shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip) per key: shifts uniform in ``[-max_shift, max_shift]`` pixels (int64),
    flip a bool with probability 1/2."""
    span = np.uint64(2 * max_shift + 1)
    dy = (keys % span).astype(np.int64) - max_shift
    dx = ((keys >> np.uint64(21)) % span).astype(np.int64) - max_shift
    flip = ((keys >> np.uint64(42)) & np.uint64(1)).astype(bool)
    return dy, dx, flip


def max_shift_pixels(image_shape: tuple[int, int, int]) -> int:
    """Largest shift in pixels: 10% of the smaller side, rounded down (3 for 32 x 32)."""
    return int(MAX_SHIFT_FRACTION * min(image_shape[1:]))


def shift_flip(x: np.ndarray, image_shape: tuple[int, int, int], seed: int, epoch: int,
               sample_ids: np.ndarray, max_shift: int) -> np.ndarray:
    """Augmented copy of a batch of flattened images.

    Parameters
    ----------
    x : (n, C*H*W) array, each row one image stored as C planes of H x W (CIFAR-10's order).
    image_shape : (C, H, W).
    seed, epoch : the run seed and the 0-based epoch.
    sample_ids : (n,) the rows' indices in the training set (they key the random transform).
    max_shift : largest shift in pixels, in each direction and axis.

    Returns (n, C*H*W), same dtype: each image flipped left-right (if drawn), then moved by
    (dy, dx) pixels; pixels shifted in from outside repeat the nearest edge pixel (Keras'
    default ``fill_mode="nearest"``).
    """
    c, h, w = image_shape
    n = x.shape[0]
    if n == 0:
        return x.copy()
    dy, dx, flip = shifts_and_flips(transform_keys(seed, epoch, sample_ids), max_shift)
    rows = np.clip(np.arange(h)[None, :] - dy[:, None], 0, h - 1)            # (n, H) source row
    cols = np.clip(np.arange(w)[None, :] - dx[:, None], 0, w - 1)            # (n, W) source col
    cols = np.where(flip[:, None], w - 1 - cols, cols)
    img = x.reshape(n, c, h, w)
    out = img[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]
    return np.ascontiguousarray(out.reshape(n, c * h * w))
