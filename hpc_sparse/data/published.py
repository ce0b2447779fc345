"""The paper's datasets from the files their publishers distribute: CIFAR-10, Madelon, HIGGS.

:func:`published_recipe` names the files (see :mod:`.cifar10`, :mod:`.madelon`,
:mod:`.higgs`) and builds the arrays: train/test split and the paper's preprocessing
(PAPER.md §7), per-feature standardisation with the training mean and std, for all three.
:func:`load_published` builds them into memory, without the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpc_sparse.data import cifar10, higgs, madelon
from hpc_sparse.data.cache import Recipe, Sink, build_in_memory
from hpc_sparse.data.preprocess import standardize_lean
from hpc_sparse.errors import UserError

PUBLISHED = ("cifar10", "madelon", "higgs")
_SOURCES = {"cifar10": cifar10.SOURCE, "madelon": madelon.SOURCE, "higgs": higgs.SOURCE}


@dataclass
class PublishedArrays:
    """x float32 C-contiguous (n, features); y int32 (n,) in [0, n_classes)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    source: str
    image_shape: tuple[int, int, int] | None  # (C, H, W) of a flattened image, for augmentation
    notes: list[str]


def _save_small(sink: Sink, mode: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray,
                yte: np.ndarray) -> None:
    """Preprocess arrays held in memory (CIFAR-10, Madelon) and save them."""
    if mode == "standardize":
        xtr, xte = standardize_lean(xtr, xte)
    elif mode == "scale":
        xtr, xte = xtr.astype(np.float32) / np.float32(255), xte.astype(np.float32) / np.float32(255)
    else:
        xtr, xte = xtr.astype(np.float32, copy=False), xte.astype(np.float32, copy=False)
    for key, arr in (("x_train", xtr), ("y_train", ytr), ("x_test", xte), ("y_test", yte)):
        sink.save(key, arr.astype(np.int32, copy=False) if key.startswith("y") else arr)


def published_recipe(name: str, path: str, preprocess: str = "auto", n_test: int = 0,
                     chunk_bytes: int = higgs.CHUNK_BYTES) -> Recipe:
    """How to build dataset ``name`` (one of :data:`PUBLISHED`) from the folder ``path``.

    ``preprocess``: auto/standardize (per-feature, training statistics), scale (/255; CIFAR-10
    only) or none. ``n_test``: HIGGS only, the last ``n_test`` rows are the test set
    (0 = the publisher's 500,000). ``chunk_bytes``: HIGGS parsing block size (not part of
    the result). Raises UserError (one line, naming the file and where the dataset comes
    from) for a missing file; the builder for a bad one."""
    if name not in PUBLISHED:
        raise ValueError(f"not a published dataset: {name!r}")
    if not path:
        raise UserError(f"data.name='{name}' needs data.path; fix: {_SOURCES[name]}")
    folder = Path(path).expanduser()
    mode = "standardize" if preprocess == "auto" else preprocess
    if mode == "scale" and name != "cifar10":
        raise UserError(f"data.preprocess='scale' divides by 255, for 8-bit images, not {name}; "
                        "fix: use 'standardize' (the paper's) or 'none'")
    params: dict[str, Any] = {"preprocess": mode}
    if name == "cifar10":
        files = cifar10.cifar10_files(folder)

        def build(sink: Sink) -> dict[str, Any]:
            _save_small(sink, mode, *cifar10.read_cifar10(files))
            return {"n_classes": cifar10.N_CLASSES, "source": str(files[0].parent),
                    "image_shape": list(cifar10.IMAGE_SHAPE), "notes": []}
    elif name == "madelon":
        files = madelon.madelon_files(folder)

        def build(sink: Sink) -> dict[str, Any]:
            _save_small(sink, mode, *madelon.read_madelon(files))
            return {"n_classes": madelon.N_CLASSES, "source": str(files[0].parent), "image_shape": None, "notes": []}
    else:
        files = [higgs.higgs_source(folder)]
        params["n_test"] = n_test or higgs.DEFAULT_N_TEST

        def build(sink: Sink) -> dict[str, Any]:
            return higgs.build_higgs(files[0], n_test, mode, sink, chunk_bytes)
    return Recipe(name, files, params, build)


def load_published(name: str, path: str, preprocess: str = "auto", n_test: int = 0,
                   chunk_bytes: int = higgs.CHUNK_BYTES) -> PublishedArrays:
    """Dataset ``name`` built into memory (no cache); arguments as :func:`published_recipe`."""
    loaded = build_in_memory(published_recipe(name, path, preprocess, n_test, chunk_bytes))
    a, info = loaded.arrays, loaded.info
    shape = info["image_shape"]
    return PublishedArrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], info["n_classes"], info["source"],
                           tuple(shape) if shape else None, list(info["notes"]))
