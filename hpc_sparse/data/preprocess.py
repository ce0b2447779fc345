"""Feature scaling, fitted on the training set only."""

from __future__ import annotations

import numpy as np


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ``(x - mean) / std`` with the training mean and std (std 0 -> 1). float32."""
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    f = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return f(x_train), f(x_test)


def scale(x_train: np.ndarray, x_test: np.ndarray, factor: float = 1.0 / 255.0) -> tuple[np.ndarray, np.ndarray]:
    """Multiply by ``factor`` (MNIST: 1/255, as in the paper's code). float32."""
    return (x_train * np.float32(factor)).astype(np.float32), (x_test * np.float32(factor)).astype(np.float32)


def standardize_lean(x_train: np.ndarray, x_test: np.ndarray, chunk_bytes: int = 16 << 20
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`standardize` for large arrays: float64 statistics accumulated over row chunks of
    about ``chunk_bytes`` (as float64), results written chunk by chunk into float32 arrays (in
    place when the inputs already are writable float32), so no full-size float64 temporary
    exists. std 0 -> 1.

    x_train (n, f), x_test (m, f), any real dtype. Returns float32 (n, f), (m, f)."""
    n, f = x_train.shape
    rows = max(1, chunk_bytes // (8 * max(f, 1)))
    total = np.zeros(f)
    for lo in range(0, n, rows):
        total += x_train[lo:lo + rows].sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    sq = np.zeros(f)
    for lo in range(0, n, rows):
        d = x_train[lo:lo + rows] - mean
        sq += np.einsum("ij,ij->j", d, d)
    std = np.sqrt(sq / max(n, 1))
    std[std == 0] = 1.0
    outs = []
    for x in (x_train, x_test):
        out = x if x.dtype == np.float32 and x.flags.writeable else np.empty(x.shape, np.float32)
        for lo in range(0, x.shape[0], rows):
            out[lo:lo + rows] = (x[lo:lo + rows] - mean) / std
        outs.append(out)
    return outs[0], outs[1]
