"""Madelon from the UCI files (NIPS 2003 feature selection challenge).

``madelon_train.data`` (2000 rows) and ``madelon_valid.data`` (600 rows) hold 500
space-separated integer features per line; ``madelon_train.labels`` and
``madelon_valid.labels`` one label per line, -1 or +1. As in the paper's code, the
validation set is the test set (the test set's labels were never published) and the
labels -1/+1 become classes 0/1.

UCI's zip holds ``MADELON/madelon_train.data``, ``madelon_train.labels``,
``madelon_valid.data`` (and ``madelon_test.data``), with ``madelon_valid.labels`` beside
``MADELON/``, not inside it: ``data.path`` may be either folder, and each file is looked
for in the data folder, then beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_sparse.errors import UserError

FILES = ("madelon_train.data", "madelon_train.labels", "madelon_valid.data", "madelon_valid.labels")
N_CLASSES = 2
SOURCE = ("download Madelon from the UCI Machine Learning Repository "
          "(https://archive.ics.uci.edu/dataset/171/madelon), unzip it and set data.path to the folder "
          "holding madelon_train.data")


def madelon_folder(path: Path) -> Path:
    """``path``, or its ``MADELON`` subfolder (the layout of UCI's zip) when that holds the files."""
    sub = path / "MADELON"
    return sub if sub.is_dir() and not (path / FILES[0]).is_file() else path


def madelon_files(path: Path) -> list[Path]:
    """The four files (train data, train labels, valid data, valid labels): each in the data
    folder (:func:`madelon_folder`), else in its parent (where UCI's zip puts
    ``madelon_valid.labels``) or in ``path``."""
    folder = madelon_folder(path)
    places = list(dict.fromkeys([folder, path, folder.parent]))
    found, missing = [], []
    for name in FILES:
        hit = next((p / name for p in places if (p / name).is_file()), None)
        if hit is None:
            missing.append(name)
        found.append(hit)
    if missing:
        where = " or ".join(f"'{p}'" for p in places) if folder.is_dir() else f"'{folder}' (no such folder)"
        raise UserError(f"madelon file(s) {', '.join(missing)} missing in {where}; fix: {SOURCE}")
    return found  # type: ignore[return-value]


def read_int_table(path: Path) -> np.ndarray:
    """(rows, columns) int32 from a file of whitespace-separated integers, one row per
    non-blank line; every row must have the same number of columns."""
    try:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read Madelon file '{path}' ({exc}); fix: {SOURCE}") from exc
    if not lines:
        raise UserError(f"Madelon file '{path}' is empty; fix: {SOURCE}")
    width = len(lines[0])
    for i, words in enumerate(lines):
        if len(words) != width:
            raise UserError(f"Madelon file '{path}' line {i + 1} has {len(words)} numbers, line 1 has {width}; "
                            f"fix: {SOURCE}")
    try:
        return np.array(lines, dtype=np.int64).astype(np.int32)
    except ValueError as exc:
        raise UserError(f"Madelon file '{path}' holds a non-integer value ({exc}); fix: {SOURCE}") from exc


def _labels(path: Path, n_rows: int, data_name: str) -> np.ndarray:
    table = read_int_table(path)
    if table.shape[1] != 1 or table.shape[0] != n_rows:
        raise UserError(f"Madelon labels '{path}' have shape {table.shape}, expected ({n_rows}, 1) to match "
                        f"{data_name}; fix: {SOURCE}")
    y = table[:, 0]
    if not np.all((y == -1) | (y == 1)):
        raise UserError(f"Madelon labels '{path}' must be -1 or +1, found {sorted(set(y.tolist()) - {-1, 1})[:3]}; "
                        f"fix: {SOURCE}")
    return (y == 1).astype(np.int32)


def read_madelon(files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train (2000, 500) int32, y_train (2000,) int32 in {0, 1}, x_valid, y_valid) from
    :func:`madelon_files`."""
    x_train = read_int_table(files[0])
    x_valid = read_int_table(files[2])
    if x_valid.shape[1] != x_train.shape[1]:
        raise UserError(f"Madelon '{files[2]}' has {x_valid.shape[1]} features but '{files[0]}' has "
                        f"{x_train.shape[1]}; fix: {SOURCE}")
    y_train = _labels(files[1], x_train.shape[0], FILES[0])
    y_valid = _labels(files[3], x_valid.shape[0], FILES[2])
    return x_train, y_train, x_valid, y_valid
