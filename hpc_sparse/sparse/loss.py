"""Softmax + cross-entropy on feature-major logits ``(n_classes, batch)``."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, fastmath=False, boundscheck=False)


@njit(parallel=True, **_OPTS)
def softmax_xent(logits, labels, delta, losses, correct):  # pragma: no cover - numba
    """Per-sample loss and its gradient, fused.

    logits: (C, B) float32; labels: (B,) int; delta (C, B) receives
    ``(softmax(logits) - onehot(labels)) / B`` (the gradient of the *mean* loss);
    losses (B,) float64 receives ``-log softmax[label]``; correct (B,) uint8 whether the
    arg-max equals the label (first maximum wins, as numpy's argmax).
    """
    c, nb = logits.shape
    inv_b = np.float32(1.0 / nb)
    for b in prange(nb):
        m = logits[0, b]
        arg = 0
        for k in range(1, c):
            if logits[k, b] > m:
                m = logits[k, b]
                arg = k
        s = 0.0
        for k in range(c):
            s += np.exp(np.float64(logits[k, b] - m))
        lab = labels[b]
        losses[b] = np.log(s) - np.float64(logits[lab, b] - m)
        correct[b] = 1 if arg == lab else 0
        for k in range(c):
            p = np.exp(np.float64(logits[k, b] - m)) / s
            if k == lab:
                p -= 1.0
            delta[k, b] = np.float32(p) * inv_b


def softmax_xent_reference(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense numpy reference: (per-sample losses (B,), delta (C, B)) for tests."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=0, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=0, keepdims=True)
    nb = logits.shape[1]
    losses = -np.log(p[labels, np.arange(nb)])
    p[labels, np.arange(nb)] -= 1.0
    return losses, (p / nb).astype(np.float32)
