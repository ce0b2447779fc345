"""HIGGS from the UCI file ``HIGGS.csv`` or ``HIGGS.csv.gz`` (11,000,000 rows).

Each line is the label (1.0 signal, 0.0 background) then 28 features, comma-separated. The
publisher's split is the last 500,000 rows as the test set (``data.n_test``).

The text is parsed in blocks of ``chunk_bytes`` straight into the sink (the cache's
``.npy`` file, :mod:`hpc_sparse.data.sinks`), so memory holds one block while parsing, not
the array; the test rows are then split off and both parts standardised in place. A line
that is not 29 numbers (a header line, a blank line) stops the load with its line number.
Errors reading the source are the source's (UserError); errors writing the cache are
:class:`~hpc_sparse.data.sinks.CacheWriteError` (the caller loads without a cache).
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hpc_sparse.data.preprocess import standardize_lean
from hpc_sparse.errors import UserError

FILES = ("HIGGS.csv", "HIGGS.csv.gz")
N_FEATURES = 28
N_CLASSES = 2
N_ROWS = 11_000_000  # the publisher's file
DEFAULT_N_TEST = 500_000
CHUNK_BYTES = 32 << 20
SOURCE = ("download HIGGS.csv.gz from the UCI Machine Learning Repository "
          "(https://archive.ics.uci.edu/dataset/280/higgs) and set data.path to its folder")
_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


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


def _line_blocks(source: Path, chunk_bytes: int) -> Iterator[bytes]:
    """The file's text in blocks of whole lines (each block ends with a newline, except
    possibly the file's last line). Read errors become a UserError naming the file."""
    opener = gzip.open if source.suffix == ".gz" else open
    try:
        with opener(source, "rb") as fh:
            tail = b""
            while True:
                block = fh.read(chunk_bytes)
                if not block:
                    break
                data = tail + block
                cut = data.rfind(b"\n") + 1  # whole lines now; the partial last one waits for more
                tail = data[cut:]
                if cut:
                    yield data[:cut]
            if tail:
                yield tail
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read HIGGS file '{source}' ({exc}); fix: re-download it: {SOURCE}") from exc


def _first_bad_line(lines: list[bytes]) -> tuple[int, str] | None:
    """(index, what is wrong) of the first line that is not N_FEATURES + 1 numbers, or None."""
    for i, line in enumerate(lines):
        if not line.strip():
            return i, "a blank line"
        fields = line.split(b",")
        try:
            for f in fields:
                float(f)
        except ValueError:
            return i, "a header line?" if any(chr(c).isalpha() for c in line) else "a field is not a number"
        if len(fields) != N_FEATURES + 1:
            return i, f"{len(fields)} fields"
    return None


def _parse_block(text: bytes, source: Path, first_line: int) -> np.ndarray:
    """(lines, 29) float64 from a block of whole lines; ``first_line`` is the 0-based number of
    its first line in the file. One-line error naming the first line that is not 29 numbers."""
    body = text[:-1] if text.endswith(b"\n") else text
    n_lines = body.count(b"\n") + 1
    values = None
    try:
        with warnings.catch_warnings():
            # numpy 1.x warns and stops at the first unparsable value, 2.x raises: either way the
            # line search below names the line
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(body.replace(b"\n", b","), dtype=np.float64, sep=",")
    except ValueError:
        pass
    if values is not None and values.size == n_lines * (N_FEATURES + 1):
        return values.reshape(n_lines, N_FEATURES + 1)
    lines = body.split(b"\n")
    found = _first_bad_line(lines)
    if found is None:  # numpy refused what Python's float() accepts: name the block
        raise UserError(f"HIGGS file '{source}': a line among lines {first_line + 1}-{first_line + n_lines} is "
                        f"not {N_FEATURES + 1} comma-separated numbers; fix: correct it or re-download: {SOURCE}")
    bad, what = found
    line = lines[bad].decode("utf-8", "replace").strip()
    shown = line if len(line) <= 60 else line[:57] + "..."
    raise UserError(f"HIGGS file '{source}' line {first_line + bad + 1:,} is not {N_FEATURES + 1} comma-separated "
                    f"numbers (label, {N_FEATURES} features): {shown!r} ({what}); fix: delete or correct that line "
                    f"(every line must be a data row), or re-download: {SOURCE}")


def parse_higgs(source: Path, x_out: Any, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Parse the CSV block by block, appending the features (k, 28) to ``x_out`` (a row
    writer of a sink); return the labels (n,) int8 in {0, 1}."""
    labels: list[np.ndarray] = []
    row = 0
    for text in _line_blocks(source, chunk_bytes):
        rows = _parse_block(text, source, row)
        y = rows[:, 0]
        if not np.all((y == 0) | (y == 1)):
            bad = row + int(np.flatnonzero((y != 0) & (y != 1))[0]) + 1
            raise UserError(f"HIGGS file '{source}' line {bad:,}: the label is {float(rows[bad - row - 1, 0])}, not 0 "
                            f"or 1; fix: {SOURCE}")
        if not np.all(np.isfinite(rows[:, 1:])):
            bad = row + int(np.flatnonzero(~np.isfinite(rows[:, 1:]).all(axis=1))[0]) + 1
            raise UserError(f"HIGGS file '{source}' line {bad:,} holds NaN or inf; fix: {SOURCE}")
        x_out.append(rows[:, 1:])
        labels.append(y.astype(np.int8))
        row += len(rows)
    if row == 0:
        raise UserError(f"HIGGS file '{source}' holds no rows; fix: {SOURCE}")
    return np.concatenate(labels)


def build_higgs(source: Path, n_test: int, mode: str, sink: Any, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Parse ``source`` into ``sink`` (x_train, y_train, x_test, y_test): the last ``n_test``
    rows (0: the publisher's 500,000) are the test set; ``mode`` "standardize" (training
    statistics, in place) or "none". Returns the dataset info; its notes warn when the file
    does not have the publisher's 11,000,000 rows and say which rows became the test set."""
    y = parse_higgs(source, sink.rows("x_train", N_FEATURES, np.float32), chunk_bytes)
    n = int(y.size)
    n_test = n_test or DEFAULT_N_TEST
    if n_test >= n:
        raise UserError(f"data.n_test={n_test} but the HIGGS file has only {n} rows; "
                        f"fix: set data.n_test below {n}")
    cut = n - n_test
    x_all = sink.array("x_train")
    sink.save("x_test", x_all[cut:])
    del x_all
    sink.keep_rows("x_train", cut)
    sink.save("y_train", y[:cut].astype(np.int32))
    sink.save("y_test", y[cut:].astype(np.int32))
    if mode == "standardize":
        standardize_lean(sink.array("x_train"), sink.array("x_test"))  # float32, writable: in place
    notes = []
    if n != N_ROWS:
        notes.append(f"warning: HIGGS file '{source}' has {n:,} rows, not the publisher's {N_ROWS:,} (a subset, "
                     f"or a copy cut short?); the test set is its last {n_test:,} rows, lines {cut + 1:,}-{n:,}, "
                     f"and training uses lines 1-{cut:,}")
    return {"n_classes": N_CLASSES, "source": str(source), "image_shape": None, "notes": notes}
