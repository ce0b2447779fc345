"""Datasets: (Fashion-)MNIST idx folders, CIFAR-10/Madelon/HIGGS publisher files, npz/h5 files, a
built-in synthetic generator; data order.

Never sees a communicator; rank-dependent selection is done with the pure functions of
:mod:`hpc_sparse.data.partition`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_sparse.config import DataConfig
from hpc_sparse.data.augment import max_shift_pixels, shift_flip
from hpc_sparse.data.loaders import default_fashion_mnist_dir, load_idx_folder, load_xy_file
from hpc_sparse.data.partition import batch_indices, block_bounds, epoch_permutation, steps_per_epoch
from hpc_sparse.data.preprocess import scale, standardize
from hpc_sparse.data.published import PUBLISHED, load_published
from hpc_sparse.data.synthetic import make_madelon
from hpc_sparse.errors import UserError


@dataclass
class Dataset:
    """Train and test arrays: x (n, n_features) float32 C-contiguous, y (n,) int32 in [0, n_classes)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    source: str
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of each flattened image row
    augment: bool = False  # random shifts and flips of training batches (data.augment)

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def train_batch(self, idx: np.ndarray, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(x (len(idx), features) float32, y (len(idx),) int32): the training samples ``idx``,
        augmented if ``augment`` with a transform that is a pure function of (seed, epoch, sample)."""
        x = self.x_train[idx]
        if self.augment and self.image_shape is not None:
            x = shift_flip(x, self.image_shape, seed, epoch, idx, max_shift_pixels(self.image_shape))
        return x, self.y_train[idx]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load and preprocess the dataset a config names. Raises UserError with a fix on bad input."""
    if cfg.name in PUBLISHED:
        a = load_published(cfg.name, cfg.path, cfg.preprocess, cfg.n_test)
        return Dataset(cfg.name, a.x_train, a.y_train, a.x_test, a.y_test, a.n_classes, a.source, a.image_shape,
                       cfg.augment)
    if cfg.name == "synthetic":
        n_test = cfg.n_test or 2000  # 0: the dataset's default
        x, y = make_madelon(cfg.n_train + n_test, cfg.n_features, cfg.n_informative, cfg.n_classes,
                            cfg.noise, cfg.seed)
        xtr, ytr, xte, yte = x[:cfg.n_train], y[:cfg.n_train], x[cfg.n_train:], y[cfg.n_train:]
        source = f"synthetic Madelon-style (seed {cfg.seed})"
    elif cfg.name in ("fashion-mnist", "mnist"):
        folder = Path(cfg.path) if cfg.path else (default_fashion_mnist_dir() if cfg.name == "fashion-mnist" else None)
        if folder is None:
            raise UserError("data.name='mnist' needs data.path, the folder of the MNIST idx files; "
                            "fix: --set data.path=/path/to/mnist")
        if not folder.is_dir():
            extra = " or 'apt-get install dataset-fashion-mnist'" if cfg.name == "fashion-mnist" else ""
            raise UserError(f"{cfg.name} folder '{folder}' does not exist; fix: set data.path to the folder "
                            f"of the idx files{extra}")
        xtr, ytr, xte, yte = load_idx_folder(folder, cfg.name)
        source = str(folder)
    else:
        xtr, ytr = load_xy_file(Path(cfg.path))
        if not cfg.test_path:
            raise UserError("data.name='file' needs data.test_path too; fix: --set data.test_path=test.npz")
        xte, yte = load_xy_file(Path(cfg.test_path))
        if xte.shape[1] != xtr.shape[1]:
            raise UserError(f"test X has {xte.shape[1]} features but train X has {xtr.shape[1]}; "
                            "fix: use files with the same features")
        source = f"{cfg.path}, {cfg.test_path}"
    mode = cfg.preprocess
    if mode == "auto":
        mode = "scale" if cfg.name == "mnist" else "standardize"
    xtr, xte = xtr.astype(np.float32), xte.astype(np.float32)
    if mode == "standardize":
        xtr, xte = standardize(xtr, xte)
    elif mode == "scale":
        xtr, xte = scale(xtr, xte)
    n_classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    return Dataset(cfg.name, np.ascontiguousarray(xtr), ytr.astype(np.int32), np.ascontiguousarray(xte),
                   yte.astype(np.int32), n_classes, source)


__all__ = ["Dataset", "batch_indices", "block_bounds", "epoch_permutation", "load_dataset", "steps_per_epoch"]
