"""Datasets: (Fashion-)MNIST idx folders, CIFAR-10/Madelon/HIGGS publisher files, npz/h5 files, a
built-in synthetic generator; the dataset cache shared by the ranks of a node; data order.

Never sees a communicator; rank-dependent selection is done with the pure functions of
:mod:`hpc_sparse.data.partition`, and which process builds a cache is decided by a
``coordinate`` callable passed in (serial default; the MPI one is in
:mod:`hpc_sparse.parallel.node_build`). Takes plain arguments (it does not know the config
classes): :func:`load_dataset` takes ``dataclasses.asdict(cfg.data)``; the engine calls its two
halves, :func:`~hpc_sparse.data.recipes.make_recipe` and :func:`load_recipe`, so that a missing
source is agreed by the ranks before the cache's collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_sparse.data.augment import max_shift_pixels, shift_flip
from hpc_sparse.data.cache import Coordinate, Recipe, load_cached
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
from hpc_sparse.data.recipes import make_recipe


@dataclass
class Dataset:
    """Train and test arrays: x (n, n_features) float32 C-contiguous, y (n,) int32 in [0, n_classes).

    The arrays are read-only when they are mapped from the cache (the usual case): index
    them (``x_train[idx]`` copies), never write into them."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    source: str
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of each flattened image row
    augment: bool = False  # random shifts and flips of training batches (data.augment)
    notes: tuple[str, ...] = ()  # log lines: where the arrays come from (cache), warnings about the data

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
                 n_classes: int = 4, seed: int = 1234, noise: float = 0.5, augment: bool = False,
                 cache_dir: str = "", coordinate: Coordinate | None = None) -> Dataset:
    """Load and preprocess a dataset through the cache; the keyword arguments are those of ``[data]``
    in the config. Raises :class:`~hpc_sparse.errors.UserError` naming the fix on bad input (missing
    files, wrong shapes or labels).

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
    cache_dir : str
        Folder of the dataset cache ("" = beside the source if writable, else the user cache
        folder; "off" = no cache, the arrays in this process's memory). See
        :mod:`hpc_sparse.data.cache`.
    coordinate : callable, optional
        Decides which process builds a missing cache entry while the others wait (default:
        this process builds it).
    """
    recipe = make_recipe(name, path, test_path, preprocess, n_train=n_train, n_test=n_test, n_features=n_features,
                         n_informative=n_informative, n_classes=n_classes, seed=seed, noise=noise)
    return load_recipe(recipe, augment, cache_dir, coordinate)


def load_recipe(recipe: Recipe, augment: bool = False, cache_dir: str = "",
                coordinate: Coordinate | None = None) -> Dataset:
    """The dataset of ``recipe`` (:func:`~hpc_sparse.data.recipes.make_recipe`, which finds the
    sources and checks them without touching the cache), through the cache; other arguments as
    :func:`load_dataset`."""
    name = recipe.dataset
    loaded = load_cached(recipe, cache_dir, coordinate)
    a, info = loaded.arrays, loaded.info
    shape = tuple(info["image_shape"]) if info.get("image_shape") else None
    return Dataset(name, a["x_train"], a["y_train"], a["x_test"], a["y_test"], int(info["n_classes"]),
                   str(info["source"]), shape, augment, tuple(loaded.notes))  # type: ignore[arg-type]


__all__ = ["AsyncBatches", "Dataset", "batch_indices", "block_bounds", "epoch_permutation", "load_dataset", "load_recipe",
           "position_in_epoch", "stealable", "steps_per_epoch", "updates_per_server_epoch"]
