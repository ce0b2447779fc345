"""Every dataset as a :class:`~hpc_sparse.data.cache.Recipe`: the files it is read from, the
parameters that shape its arrays, and the builder that writes them (into a cache entry or
into memory, the same bytes either way).

The published datasets (CIFAR-10, Madelon, HIGGS) are in :mod:`.published`; this module adds
the idx folders ((Fashion-)MNIST), ``.npz``/``.h5`` files and the built-in synthetic
generator, whose "source" is its parameters (it goes through the same cache, so ranks on a
node share it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpc_sparse.data.cache import Recipe, Sink
from hpc_sparse.data.higgs import CHUNK_BYTES
from hpc_sparse.data.loaders import default_fashion_mnist_dir, idx_paths, load_idx_files, load_xy_file
from hpc_sparse.data.preprocess import scale, standardize
from hpc_sparse.data.published import PUBLISHED, published_recipe
from hpc_sparse.data.synthetic import make_madelon
from hpc_sparse.errors import UserError

NAMES = ("synthetic", "fashion-mnist", "mnist", "file", *PUBLISHED)


def _save_plain(sink: Sink, mode: str, source: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray,
                yte: np.ndarray) -> dict[str, Any]:
    """Preprocess in memory (idx, file, synthetic), save, and return the info."""
    xtr, xte = xtr.astype(np.float32), xte.astype(np.float32)
    if mode == "standardize":
        xtr, xte = standardize(xtr, xte)
    elif mode == "scale":
        xtr, xte = scale(xtr, xte)
    n_classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    for key, arr in (("x_train", xtr), ("y_train", ytr.astype(np.int32)), ("x_test", xte),
                     ("y_test", yte.astype(np.int32))):
        sink.save(key, arr)
    return {"n_classes": n_classes, "source": source, "image_shape": None, "notes": []}


def make_recipe(name: str, path: str = "", test_path: str = "", preprocess: str = "auto", *, n_train: int = 6000,
                n_test: int = 0, n_features: int = 500, n_informative: int = 20, n_classes: int = 4,
                seed: int = 1234, noise: float = 0.5, chunk_bytes: int = CHUNK_BYTES) -> Recipe:
    """The recipe of dataset ``name``; arguments as :func:`hpc_sparse.data.load_dataset`.
    Raises UserError (one line with the fix) for a missing file or a bad combination."""
    if name in PUBLISHED:
        return published_recipe(name, path, preprocess, n_test, chunk_bytes)
    mode = preprocess
    if mode == "auto":
        mode = "scale" if name == "mnist" else "standardize"
    if name == "synthetic":
        n_test = n_test or 2000  # 0: the dataset's default
        params = {"preprocess": mode, "n_train": n_train, "n_test": n_test, "n_features": n_features,
                  "n_informative": n_informative, "n_classes": n_classes, "seed": seed, "noise": noise}

        def build(sink: Sink) -> dict[str, Any]:
            x, y = make_madelon(n_train + n_test, n_features, n_informative, n_classes, noise, seed)
            return _save_plain(sink, mode, f"synthetic Madelon-style (seed {seed})",
                               x[:n_train], y[:n_train], x[n_train:], y[n_train:])
        return Recipe(name, [], params, build)
    if name in ("fashion-mnist", "mnist"):
        folder = Path(path) if path else (default_fashion_mnist_dir() if name == "fashion-mnist" else None)
        if folder is None:
            raise UserError("data.name='mnist' needs data.path, the folder of the MNIST idx files; "
                            "fix: --set data.path=/path/to/mnist")
        if not folder.is_dir():
            extra = " or 'apt-get install dataset-fashion-mnist'" if name == "fashion-mnist" else ""
            raise UserError(f"{name} folder '{folder}' does not exist; fix: set data.path to the folder "
                            f"of the idx files{extra}")
        paths = idx_paths(folder, name)

        def build(sink: Sink) -> dict[str, Any]:
            return _save_plain(sink, mode, str(folder), *load_idx_files(paths, name))
        return Recipe(name, list(paths.values()), {"preprocess": mode}, build)
    if name != "file":
        raise UserError(f"unknown dataset '{name}'; fix: set data.name to one of {', '.join(NAMES)}")
    if not test_path:
        raise UserError("data.name='file' needs data.test_path too; fix: --set data.test_path=test.npz")
    files = [Path(path), Path(test_path)]
    for f in files:
        if not f.is_file():
            raise UserError(f"data file '{f}' not found; fix: set data.path / data.test_path to an existing "
                            ".npz or .h5 file with datasets X and y")

    def build(sink: Sink) -> dict[str, Any]:
        xtr, ytr = load_xy_file(files[0])
        xte, yte = load_xy_file(files[1])
        if xte.shape[1] != xtr.shape[1]:
            raise UserError(f"test X has {xte.shape[1]} features but train X has {xtr.shape[1]}; "
                            "fix: use files with the same features")
        return _save_plain(sink, mode, f"{path}, {test_path}", xtr, ytr, xte, yte)
    return Recipe(name, files, {"preprocess": mode}, build)
