"""CIFAR-10 from its publisher's binary version (``cifar-10-batches-bin/``).

Each of ``data_batch_1.bin`` ... ``data_batch_5.bin`` (10,000 images each) and
``test_batch.bin`` holds records of 3073 bytes: one label byte (0-9), then 3072 pixel bytes,
the 32 x 32 red plane, then green, then blue, each row-major. The pixels are kept in that
order (C, H, W), flattened to 3072 features; for a fully connected network the order of
the features does not matter, and the augmentation knows the layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_sparse.errors import UserError

TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
IMAGE_SHAPE = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32
RECORDS_PER_FILE = 10_000  # in each of the six files
N_CLASSES = 10
SOURCE = ("download the CIFAR-10 binary version (cifar-10-binary.tar.gz) from "
          "https://www.cs.toronto.edu/~kriz/cifar.html, extract it and set data.path to its "
          "cifar-10-batches-bin folder")


def cifar10_folder(path: Path) -> Path:
    """``path`` itself, or its ``cifar-10-batches-bin`` subfolder when ``path`` is where the
    archive was extracted."""
    sub = path / "cifar-10-batches-bin"
    return sub if sub.is_dir() and not (path / TEST_FILE).is_file() else path


def read_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x (10000, 3072) uint8 in R, G, B plane order, y (10000,) int32) from one ``*.bin``
    batch file; a file of another length (cut short, even at a record boundary) is refused."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"cannot read CIFAR-10 file '{path}' ({exc}); fix: {SOURCE}") from exc
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise UserError(f"CIFAR-10 file '{path}' has {raw.size} bytes, not a multiple of the "
                        f"{RECORD_BYTES}-byte record (truncated, or the Python/MATLAB version?); fix: {SOURCE}")
    if raw.size != RECORDS_PER_FILE * RECORD_BYTES:
        raise UserError(f"CIFAR-10 file '{path}' holds {raw.size // RECORD_BYTES:,} records, expected "
                        f"{RECORDS_PER_FILE:,} (a copy cut short?); fix: {SOURCE}")
    records = raw.reshape(-1, RECORD_BYTES)
    y = records[:, 0].astype(np.int32)
    if y.max() >= N_CLASSES:
        raise UserError(f"CIFAR-10 file '{path}' has label {int(y.max())} (expected 0-9): not the binary "
                        f"CIFAR-10 (CIFAR-100's binary has 2 label bytes); fix: {SOURCE}")
    return np.ascontiguousarray(records[:, 1:]), y


def cifar10_files(path: Path) -> list[Path]:
    """The five training files then the test file, in ``path`` (or ``path/cifar-10-batches-bin``)."""
    folder = cifar10_folder(path)
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
    if missing:
        where = f"'{folder}'" if folder.is_dir() else f"'{folder}' (no such folder)"
        raise UserError(f"cifar10 file(s) {', '.join(missing)} missing in {where}; fix: {SOURCE}")
    return [folder / name for name in (*TRAIN_FILES, TEST_FILE)]


def read_cifar10(files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train (50000, 3072) uint8, y_train (50000,) int32, x_test, y_test) from
    :func:`cifar10_files`."""
    parts = [read_batch_file(f) for f in files[:-1]]
    x_test, y_test = read_batch_file(files[-1])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test
