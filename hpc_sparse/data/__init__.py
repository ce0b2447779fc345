"""Datasets: (Fashion-)MNIST idx folders, CIFAR-10/Madelon/HIGGS publisher files, npz/h5 files, a
built-in synthetic generator; data order.

Never sees a communicator; rank-dependent selection is done with the pure functions of
:mod:`hpc_sparse.data.partition`. Takes plain arguments (it does not know the config
classes): the engine calls ``load_dataset(**dataclasses.asdict(cfg.data))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_sparse.data.augment import max_shift_pixels, shift_flip
from hpc_sparse.data.loaders import default_fashion_mnist_dir, load_idx_folder, load_xy_file
from hpc_sparse.data.partition import (
    AsyncBatches,
    batch_indices,
    block_bounds,
    epoch_permutation,
    position_in_epoch,
    stealable,
    steps_per_epoch,
    updates_per_server_epoch,
)
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


def load_dataset(name: str, path: str = "", test_path: str = "", preprocess: str = "auto", *,
                 n_train: int = 6000, n_test: int = 0, n_features: int = 500, n_informative: int = 20,
                 n_classes: int = 4, seed: int = 1234, noise: float = 0.5, augment: bool = False) -> Dataset:
    """Load and preprocess a dataset; the keyword arguments are those of ``[data]`` in the config.
    Raises :class:`~hpc_sparse.errors.UserError` naming the fix on bad input (missing files,
    wrong shapes or labels).

    Parameters
    ----------
    name : "synthetic" | "fashion-mnist" | "mnist" | "file" | "cifar10" | "madelon" | "higgs"
    path : str
        Folder of the idx/idx.gz files (fashion-mnist: default Debian's folder; mnist), the
        folder of a published dataset's files (cifar10, madelon, higgs), or the training
        .npz/.h5 file (file).
    test_path : str
        The test .npz/.h5 file (file).
    preprocess : "auto" | "standardize" | "scale" | "none"
        auto: /255 for mnist, per-feature standardisation otherwise.
    n_test : int
        Test samples: synthetic generates this many, higgs takes the file's last n_test rows;
        0 = the dataset's default (synthetic 2000, higgs 500000).
    n_train : int
        synthetic: training samples (ignored for the other datasets, as are the five below).
    n_features : int
        synthetic: total features (informative + noise).
    n_informative : int
        synthetic: informative features.
    n_classes : int
        synthetic: classes.
    seed : int
        synthetic: seed of the generated data (not the run's seed).
    noise : float
        synthetic: std of the Gaussian noise on the informative features.
    augment : bool
        cifar10: random shifts and flips of training batches (:meth:`Dataset.train_batch`).
    """
    if name in PUBLISHED:
        a = load_published(name, path, preprocess, n_test)
        return Dataset(name, a.x_train, a.y_train, a.x_test, a.y_test, a.n_classes, a.source, a.image_shape, augment)
    if name == "synthetic":
        n_test = n_test or 2000  # 0: the dataset's default
        x, y = make_madelon(n_train + n_test, n_features, n_informative, n_classes, noise, seed)
        xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
        source = f"synthetic Madelon-style (seed {seed})"
    elif name in ("fashion-mnist", "mnist"):
        folder = Path(path) if path else (default_fashion_mnist_dir() if name == "fashion-mnist" else None)
        if folder is None:
            raise UserError("data.name='mnist' needs data.path, the folder of the MNIST idx files; "
                            "fix: --set data.path=/path/to/mnist")
        if not folder.is_dir():
            extra = " or 'apt-get install dataset-fashion-mnist'" if name == "fashion-mnist" else ""
            raise UserError(f"{name} folder '{folder}' does not exist; fix: set data.path to the folder "
                            f"of the idx files{extra}")
        xtr, ytr, xte, yte = load_idx_folder(folder, name)
        source = str(folder)
    else:
        xtr, ytr = load_xy_file(Path(path))
        if not test_path:
            raise UserError("data.name='file' needs data.test_path too; fix: --set data.test_path=test.npz")
        xte, yte = load_xy_file(Path(test_path))
        if xte.shape[1] != xtr.shape[1]:
            raise UserError(f"test X has {xte.shape[1]} features but train X has {xtr.shape[1]}; "
                            "fix: use files with the same features")
        source = f"{path}, {test_path}"
    mode = preprocess
    if mode == "auto":
        mode = "scale" if name == "mnist" else "standardize"
    xtr, xte = xtr.astype(np.float32), xte.astype(np.float32)
    if mode == "standardize":
        xtr, xte = standardize(xtr, xte)
    elif mode == "scale":
        xtr, xte = scale(xtr, xte)
    n_classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    return Dataset(name, np.ascontiguousarray(xtr), ytr.astype(np.int32), np.ascontiguousarray(xte),
                   yte.astype(np.int32), n_classes, source)


__all__ = ["AsyncBatches", "Dataset", "batch_indices", "block_bounds", "epoch_permutation", "load_dataset",
           "position_in_epoch", "stealable", "steps_per_epoch", "updates_per_server_epoch"]
