"""Parsed arrays cached as ``.npy`` files beside their source, valid only for that exact source.

Layout, for a source ``DIR/HIGGS.csv.gz``::

    DIR/HIGGS.csv.gz.cache.json             the commit record, written last (atomic rename)
    DIR/HIGGS.csv.gz.cache-<token>-x.npy    the arrays it names
    DIR/HIGGS.csv.gz.cache-<token>-y.npy

The record holds the source's size and modification time (ns) and a format version; a
cache whose record does not match the source as it is now, or whose files are missing or
have other shapes, is ignored (and replaced by the next writer). Every writer uses a fresh
random token, so two processes that build the cache at the same time (the ranks of a first
MPI run) never write into each other's files; the last record renamed into place wins, and
either is complete. No pickle: ``np.load(allow_pickle=False)`` and JSON only.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

_HEADER_BYTES = 128  # fixed .npy header size, so it can be rewritten in place with the final shape
_STALE_SECONDS = 3600.0  # a writer appends every few seconds: older unreferenced files are from dead writers


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version 1.0 .npy header of exactly ``_HEADER_BYTES`` bytes (the format pads with spaces)."""
    text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = _HEADER_BYTES - 10
    if len(text) + 1 > body:
        raise ValueError(f"shape {shape} does not fit a {_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + (text.ljust(body - 1) + "\n").encode("latin1")


class NpyRowWriter:
    """Streams rows of a 2-D array into a ``.npy`` file whose row count is known only at the end.

    ``append`` writes (k, n_cols) blocks as they are parsed, so memory holds one block, not
    the array; ``close`` rewrites the header with the final shape and fsyncs."""

    def __init__(self, path: Path, n_cols: int, dtype: np.dtype | type) -> None:
        self.path, self.n_cols, self.dtype, self.rows = path, int(n_cols), np.dtype(dtype), 0
        self._fh: BinaryIO | None = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(_npy_header((0, self.n_cols), self.dtype))

    def append(self, block: np.ndarray) -> None:
        """Append ``block`` (k, n_cols), converted to the writer's dtype, C order."""
        assert self._fh is not None and block.ndim == 2 and block.shape[1] == self.n_cols
        self._fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.write(_npy_header((self.rows, self.n_cols), self.dtype))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None


def _record_path(source: Path) -> Path:
    return source.with_name(source.name + ".cache.json")


def source_signature(source: Path) -> dict[str, int | str]:
    """What identifies the source's content cheaply: its name, size and modification time (ns)."""
    st = source.stat()
    return {"name": source.name, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def read_cache(source: Path, version: int) -> dict[str, np.ndarray] | None:
    """The cached arrays of ``source`` (name -> array), or None if there is no cache valid for
    the source as it is now and for this format ``version``."""
    try:
        record = json.loads(_record_path(source).read_text())
        if record.get("version") != version or record.get("source") != source_signature(source):
            return None
        out = {}
        for name, entry in record["arrays"].items():
            arr = np.load(source.with_name(entry["file"]), allow_pickle=False)
            if list(arr.shape) != entry["shape"] or arr.dtype.str != entry["dtype"]:
                return None
            out[name] = arr
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no record, a torn or foreign one, a file replaced by a newer writer: rebuild


class CacheWriter:
    """Writes a new cache for ``source`` into ``folder`` (default: beside the source).

    Usage: ``w = CacheWriter(src, version)``; fill ``w.row_writer(name, n_cols, dtype)``
    and/or ``w.save(name, array)``; ``w.finish_files()`` loads them; then ``w.commit(...)``,
    or ``w.discard()`` on failure. A writer given another ``folder`` (a temporary one, when
    the source's folder is read-only) is only discarded: its files serve one load."""

    def __init__(self, source: Path, version: int, folder: Path | None = None) -> None:
        self.source, self.version = source, version
        self.folder = folder or source.parent
        self.token = secrets.token_hex(6)
        self.files: dict[str, Path] = {}
        self._writers: dict[str, NpyRowWriter] = {}

    def path_for(self, name: str) -> Path:
        return self.folder / f"{self.source.name}.cache-{self.token}-{name}.npy"

    def row_writer(self, name: str, n_cols: int, dtype: np.dtype | type) -> NpyRowWriter:
        self.files[name] = self.path_for(name)
        self._writers[name] = NpyRowWriter(self.files[name], n_cols, dtype)
        return self._writers[name]

    def save(self, name: str, array: np.ndarray) -> None:
        self.files[name] = self.path_for(name)
        with open(self.files[name], "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())

    def finish_files(self) -> dict[str, np.ndarray]:
        """Close the row writers and load every file into memory (the caller's arrays)."""
        for w in self._writers.values():
            w.close()
        return {name: np.load(path, allow_pickle=False) for name, path in self.files.items()}

    def commit(self, arrays: dict[str, np.ndarray], signature: dict[str, int | str]) -> None:
        """Publish the files: write the record to a temporary name, fsync, rename it into place
        (the commit point), then delete the files of the record it replaced and dead writers'
        leftovers. ``signature`` is the source's, taken before parsing began."""
        record = {"version": self.version, "source": signature,
                  "arrays": {name: {"file": self.files[name].name, "shape": list(arrays[name].shape),
                                    "dtype": arrays[name].dtype.str} for name in self.files}}
        final = _record_path(self.source)
        try:
            previous = {e["file"] for e in json.loads(final.read_text())["arrays"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            previous = set()
        tmp = final.with_name(f".{final.name}.{self.token}.tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(record, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self._remove_stale(previous)

    def discard(self) -> None:
        """Remove this writer's files (after a failure, or after loading from a temporary folder)."""
        for w in self._writers.values():
            try:
                w.close()
            except OSError:
                pass
        for path in self.files.values():
            path.unlink(missing_ok=True)

    def _remove_stale(self, previous: set[str]) -> None:
        """Delete the files of the record just replaced, and unreferenced files nobody has written
        to for an hour (a writer that died). A concurrent writer's files are recent: kept."""
        now = time.time()
        for path in self.folder.glob(f"{self.source.name}.cache-*-*.npy"):
            if self.token in path.name:
                continue
            try:
                if path.name in previous or now - path.stat().st_mtime > _STALE_SECONDS:
                    path.unlink()
            except OSError:
                pass
