"""HIGGS from the UCI file ``HIGGS.csv`` or ``HIGGS.csv.gz`` (11,000,000 rows).

Each line is the label (1.0 signal, 0.0 background) then 28 features, comma-separated. The
publisher's split is the last 500,000 rows as the test set (``data.n_test``).

The text is parsed in blocks of ``chunk_bytes`` straight into a ``.npy`` file, so memory
holds one block while parsing and the final float32 arrays afterwards (1.2 GB for x), not
several times that. The parsed arrays stay beside the source as a cache
(:mod:`hpc_sparse.data.array_cache`): the next run loads them in seconds instead of parsing
7.5 GB of text again, and a changed source (size or modification time) is parsed afresh.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from hpc_sparse.data.array_cache import CacheWriter, NpyRowWriter, read_cache, source_signature
from hpc_sparse.errors import UserError

FILES = ("HIGGS.csv", "HIGGS.csv.gz")
N_FEATURES = 28
N_CLASSES = 2
DEFAULT_N_TEST = 500_000
CACHE_VERSION = 1
CHUNK_BYTES = 32 << 20
SOURCE = ("download HIGGS.csv.gz from the UCI Machine Learning Repository "
          "(https://archive.ics.uci.edu/dataset/280/higgs) and set data.path to its folder")


def higgs_source(path: Path) -> Path:
    """The HIGGS file: ``path`` itself if it is one, else ``HIGGS.csv`` (preferred: no
    decompression) or ``HIGGS.csv.gz`` in the folder ``path``."""
    if path.is_file():
        return path
    for name in FILES:
        if (path / name).is_file():
            return path / name
    where = f"'{path}'" if path.is_dir() else f"'{path}' (no such folder)"
    raise UserError(f"higgs file HIGGS.csv (or HIGGS.csv.gz) missing in {where}; fix: {SOURCE}")


def _parse_block(text: bytes, source: Path, first_row: int) -> np.ndarray:
    """(rows, 29) float64 from complete lines of the CSV; one-line error naming the rows if
    any line is not 29 numbers."""
    text = text.strip()
    if not text:
        return np.empty((0, N_FEATURES + 1))
    n_lines = text.count(b"\n") + 1
    with warnings.catch_warnings():
        # numpy warns and stops at the first unparsable value; the size check below reports it
        warnings.simplefilter("ignore", DeprecationWarning)
        values = np.fromstring(text.replace(b"\n", b","), dtype=np.float64, sep=",")
    if values.size != n_lines * (N_FEATURES + 1):
        raise UserError(f"HIGGS file '{source}': a line among rows {first_row + 1}-{first_row + n_lines} is not "
                        f"{N_FEATURES + 1} comma-separated numbers (label, {N_FEATURES} features); fix: {SOURCE}")
    return values.reshape(n_lines, N_FEATURES + 1)


def parse_higgs(source: Path, x_out: NpyRowWriter, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Parse the CSV block by block, appending the features to ``x_out`` (float32); return the
    labels (n,) int8 in {0, 1}."""
    labels: list[np.ndarray] = []
    opener = gzip.open if source.suffix == ".gz" else open
    row = 0
    try:
        with opener(source, "rb") as fh:
            tail = b""
            while True:
                block = fh.read(chunk_bytes)
                data = tail + block
                if block:
                    cut = data.rfind(b"\n") + 1  # parse whole lines; keep the partial last one for later
                    data, tail = data[:cut], data[cut:]
                rows = _parse_block(data, source, row)
                if rows.size:
                    y = rows[:, 0]
                    if not np.all((y == 0) | (y == 1)):
                        raise UserError(f"HIGGS file '{source}': labels in rows {row + 1}-{row + len(rows)} are not "
                                        f"0 or 1; fix: {SOURCE}")
                    if not np.all(np.isfinite(rows[:, 1:])):
                        raise UserError(f"HIGGS file '{source}': NaN or inf in rows {row + 1}-{row + len(rows)}; "
                                        f"fix: {SOURCE}")
                    x_out.append(rows[:, 1:])
                    labels.append(y.astype(np.int8))
                    row += len(rows)
                if not block:
                    break
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read HIGGS file '{source}' ({exc}); fix: re-download it: {SOURCE}") from exc
    if row == 0:
        raise UserError(f"HIGGS file '{source}' holds no rows; fix: {SOURCE}")
    return np.concatenate(labels)


def read_higgs(path: Path, chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray, str]:
    """(x (n, 28) float32, y (n,) int32 in {0, 1}, description) of every row of the HIGGS file
    at ``path`` (a folder or the file), from the cache when it is valid for that file."""
    source = higgs_source(path)
    cached = read_cache(source, CACHE_VERSION)
    if cached is not None:
        return cached["x"], cached["y"].astype(np.int32), f"{source} (cached parse)"
    signature = source_signature(source)
    note = "parsed; cache written beside it"
    try:
        writer = CacheWriter(source, CACHE_VERSION)
        x_out = writer.row_writer("x", N_FEATURES, np.float32)
    except OSError as exc:  # a read-only data folder: parse through a temporary file, cache nothing
        writer = CacheWriter(source, CACHE_VERSION, folder=Path(tempfile.mkdtemp(prefix="hpc_sparse_higgs_")))
        x_out = writer.row_writer("x", N_FEATURES, np.float32)
        note = f"parsed; no cache ({exc.strerror or exc})"
    try:
        writer.save("y", parse_higgs(source, x_out, chunk_bytes))
        arrays = writer.finish_files()
        if writer.folder == source.parent and source_signature(source) == signature:
            writer.commit(arrays, signature)
        else:  # temporary folder, or the source changed while we read it: do not publish
            writer.discard()
    except BaseException:
        writer.discard()
        raise
    finally:
        if writer.folder != source.parent:
            shutil.rmtree(writer.folder, ignore_errors=True)
    return arrays["x"], arrays["y"].astype(np.int32), f"{source} ({note})"
