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
