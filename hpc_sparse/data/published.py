"""The paper's datasets from the files their publishers distribute: CIFAR-10, Madelon, HIGGS.

One entry point, :func:`load_published`, with plain arguments; it reads the files (see
:mod:`.cifar10`, :mod:`.madelon`, :mod:`.higgs`), splits train and test, and applies the
paper's preprocessing (PAPER.md §7): per-feature standardisation with the training mean
and std, for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_sparse.data import cifar10, higgs, madelon
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


def load_published(name: str, path: str, preprocess: str = "auto", n_test: int = 0,
                   chunk_bytes: int = higgs.CHUNK_BYTES) -> PublishedArrays:
    """Load dataset ``name`` (one of :data:`PUBLISHED`) from the folder ``path``.

    ``preprocess``: auto/standardize (per-feature, training statistics), scale (/255; CIFAR-10
    only) or none. ``n_test``: HIGGS only, the last ``n_test`` rows are the test set
    (0 = the publisher's 500,000). ``chunk_bytes``: HIGGS parsing block size.
    Raises UserError (one line, naming the file and where the dataset comes from)."""
    if name not in PUBLISHED:
        raise ValueError(f"not a published dataset: {name!r}")
    if not path:
        raise UserError(f"data.name='{name}' needs data.path; fix: {_SOURCES[name]}")
    folder = Path(path).expanduser()
    image_shape = None
    if name == "cifar10":
        xtr, ytr, xte, yte, where = cifar10.read_cifar10(folder)
        n_classes, image_shape = cifar10.N_CLASSES, cifar10.IMAGE_SHAPE
    elif name == "madelon":
        xtr, ytr, xte, yte, where = madelon.read_madelon(folder)
        n_classes = madelon.N_CLASSES
    else:
        x, y, where = higgs.read_higgs(folder, chunk_bytes)
        n_test = n_test or higgs.DEFAULT_N_TEST
        if n_test >= x.shape[0]:
            raise UserError(f"data.n_test={n_test} but the HIGGS file has only {x.shape[0]} rows; "
                            f"fix: set data.n_test below {x.shape[0]}")
        cut = x.shape[0] - n_test
        xtr, ytr, xte, yte = x[:cut], y[:cut], x[cut:], y[cut:]  # views: no copy of 1.2 GB
        n_classes = higgs.N_CLASSES
    mode = "standardize" if preprocess == "auto" else preprocess
    if mode == "scale" and name != "cifar10":
        raise UserError(f"data.preprocess='scale' divides by 255, for 8-bit images, not {name}; "
                        "fix: use 'standardize' (the paper's) or 'none'")
    if mode == "standardize":
        xtr, xte = standardize_lean(xtr, xte)
    elif mode == "scale":
        xtr, xte = xtr.astype(np.float32) / np.float32(255), xte.astype(np.float32) / np.float32(255)
    else:
        xtr, xte = xtr.astype(np.float32, copy=False), xte.astype(np.float32, copy=False)
    return PublishedArrays(np.ascontiguousarray(xtr), ytr.astype(np.int32, copy=False), np.ascontiguousarray(xte),
                           yte.astype(np.int32, copy=False), n_classes, where, image_shape)
