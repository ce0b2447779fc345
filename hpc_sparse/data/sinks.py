"""Where a dataset builder puts its arrays: ``.npy`` files of a cache entry being built
(:class:`FileSink`), or memory (:class:`MemorySink`, when there is no cache).

A builder (see :mod:`hpc_sparse.data.recipes`) writes the four arrays ``x_train``,
``y_train``, ``x_test``, ``y_test`` with the same calls into either sink, so the bytes are
the same whichever was used:

- ``save(name, array)``: a whole array;
- ``rows(name, n_cols, dtype).append(block)``: a 2-D array streamed in row blocks whose
  number is known only at the end (HIGGS: memory holds one block, not the array);
- ``array(name)``: the finished array, writable: changes persist (in-place preprocessing);
- ``keep_rows(name, n)``: drop the rows after the first ``n``.

Every failure to write a :class:`FileSink` raises :class:`CacheWriteError`, never OSError,
so that a caller can tell a full disk (fall back to loading without a cache) from an
unreadable source (the user's file is bad).
"""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

HEADER_BYTES = 128  # fixed .npy header size: it is rewritten in place with the final shape


class CacheWriteError(Exception):
    """Writing the dataset cache failed (full disk, quota, read-only or vanished folder).
    Not the source's fault: the caller loads without a cache instead."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn any OSError inside the block into a CacheWriteError naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise CacheWriteError(f"cannot write the data cache '{path}' ({exc.strerror or exc})") from exc


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version 1.0 .npy header of exactly ``HEADER_BYTES`` bytes (the format pads with spaces)."""
    text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = HEADER_BYTES - 10
    if len(text) + 1 > body:
        raise ValueError(f"shape {shape} does not fit a {HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + (text.ljust(body - 1) + "\n").encode("latin1")


class NpyRowWriter:
    """Streams row blocks of a 2-D array into a ``.npy`` file; ``close`` writes the final shape."""

    def __init__(self, path: Path, n_cols: int, dtype: np.dtype | type) -> None:
        self.path, self.n_cols, self.dtype, self.rows = path, int(n_cols), np.dtype(dtype), 0
        with writing(path):
            self._fh: BinaryIO | None = open(path, "wb")  # noqa: SIM115 - closed in close()
            self._fh.write(npy_header((0, self.n_cols), self.dtype))

    def append(self, block: np.ndarray) -> None:
        """Append ``block`` (k, n_cols), converted to the writer's dtype, C order."""
        assert self._fh is not None and block.ndim == 2 and block.shape[1] == self.n_cols
        with writing(self.path):
            self._fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        with writing(self.path):
            try:
                fh.seek(0)
                fh.write(npy_header((self.rows, self.n_cols), self.dtype))
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fh.close()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink:
    """Arrays as ``<name>.npy`` files in ``folder`` (created here; the caller commits or removes it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with writing(folder):
            folder.mkdir(parents=True)
        self._writers: dict[str, NpyRowWriter] = {}
        self._maps: dict[str, np.memmap] = {}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def save(self, name: str, array: np.ndarray) -> None:
        self._forget(name)
        with writing(self.path(name)), open(self.path(name), "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)

    def rows(self, name: str, n_cols: int, dtype: np.dtype | type) -> NpyRowWriter:
        self._forget(name)
        self._writers[name] = NpyRowWriter(self.path(name), n_cols, dtype)
        return self._writers[name]

    def array(self, name: str) -> np.ndarray:
        if name not in self._maps:
            if name in self._writers:
                self._writers.pop(name).close()
            with writing(self.path(name)):
                self._maps[name] = np.load(self.path(name), mmap_mode="r+", allow_pickle=False)
        return self._maps[name]

    def keep_rows(self, name: str, n: int) -> None:
        arr = self.array(name)
        if n > arr.shape[0]:
            raise ValueError(f"keep_rows({name!r}, {n}) on {arr.shape[0]} rows")
        shape, dtype = (n, *arr.shape[1:]), arr.dtype
        del arr
        self._forget(name)  # unmap before the file shrinks under the map
        path = self.path(name)
        with writing(path), open(path, "r+b") as fh:
            if _header_length(fh) != HEADER_BYTES:
                raise ValueError(f"keep_rows({name!r}) needs a file written by rows()")
            fh.seek(0)
            fh.write(npy_header(shape, dtype))
            fh.truncate(HEADER_BYTES + int(np.prod(shape)) * dtype.itemsize)

    def finish(self) -> None:
        """Close the writers, write back and drop the maps, fsync every file and the folder."""
        for name in list(self._writers) + list(self._maps):
            self._forget(name)
        with writing(self.folder):
            for path in self.folder.iterdir():
                fsync_path(path)
            fsync_path(self.folder)

    def _forget(self, name: str) -> None:
        if name in self._writers:
            self._writers.pop(name).close()
        if name in self._maps:
            m = self._maps.pop(name)
            with writing(self.path(name)):
                m.flush()
            del m


def _header_length(fh: BinaryIO) -> int:
    """Bytes of the .npy header at the file's start (magic, length field, text)."""
    major, _ = np.lib.format.read_magic(fh)
    if major == 1:
        (n,) = struct.unpack("<H", fh.read(2))
        return 10 + n
    (n,) = struct.unpack("<I", fh.read(4))
    return 12 + n


class _MemoryRows:
    def __init__(self, n_cols: int, dtype: np.dtype | type) -> None:
        self.n_cols, self.dtype, self.blocks, self.rows = n_cols, np.dtype(dtype), [], 0

    def append(self, block: np.ndarray) -> None:
        self.blocks.append(np.ascontiguousarray(block, dtype=self.dtype))
        self.rows += block.shape[0]

    def close(self) -> np.ndarray:
        out = np.concatenate(self.blocks) if self.blocks else np.empty((0, self.n_cols), self.dtype)
        self.blocks = []
        return out


class MemorySink:
    """Arrays in this process's memory (no cache): ``arrays`` maps each name to its array."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._rows: dict[str, _MemoryRows] = {}

    def save(self, name: str, array: np.ndarray) -> None:
        self.arrays[name] = np.ascontiguousarray(array)  # no copy: a view stays one (HIGGS' test rows)

    def rows(self, name: str, n_cols: int, dtype: np.dtype | type) -> _MemoryRows:
        self._rows[name] = _MemoryRows(n_cols, dtype)
        return self._rows[name]

    def array(self, name: str) -> np.ndarray:
        if name in self._rows:
            self.arrays[name] = self._rows.pop(name).close()
        return self.arrays[name]

    def keep_rows(self, name: str, n: int) -> None:
        self.arrays[name] = self.array(name)[:n]
