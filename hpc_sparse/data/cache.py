"""The dataset cache: preprocessed float32 arrays in ``.npy`` files, memory-mapped read-only,
so that every rank of a node shares one copy of the data in the page cache.

Layout, in the cache folder (``data.cache_dir``; default :func:`choose_folder`)::

    <dataset>-<label>-<digest>/        one entry, published by renaming a complete folder
        x_train.npy y_train.npy x_test.npy y_test.npy
        cache.json                      identity, array shapes and file sizes, dataset info
    .tmp-<dataset>-<label>-<digest>-<token>/   an entry being built (never read)

An entry is identified by its *identity*: the source files (absolute path, size,
modification time in ns), the parameters of the preprocessing and split, and the code that
made it (a hash of this package's source, the numpy version, :data:`FORMAT`). ``digest``
hashes the identity; ``label`` hashes everything but the sources' sizes and times and the
code, so a newer entry for the same data and preprocessing replaces the older one.

An entry is written in a temporary folder, every file fsynced, ``cache.json`` last, then
renamed into place: a reader sees a complete entry or none. A reader also checks the
identity against the sources as they are now and every file's size against
``cache.json`` before it maps anything, so a torn, truncated or outdated entry is never
used (it is rebuilt). No pickle: ``np.load(allow_pickle=False)`` and JSON only.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from hpc_sparse.data.sinks import CacheWriteError, FileSink, MemorySink, fsync_path, writing
from hpc_sparse.errors import UserError

FORMAT = 1
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
SUBFOLDER = "hpc_sparse-cache"
OFF = "off"
_RECORD = "cache.json"
_RECORD_MAX_BYTES = 1 << 20
_STALE_SECONDS = 3600.0  # a temporary folder nobody wrote to for this long belongs to a dead builder
_SYSTEM_PREFIXES = ("/usr/",)  # the package manager's folders: never written beside, even as root


class Sink(Protocol):
    """What a builder writes into (see :mod:`hpc_sparse.data.sinks`)."""

    def save(self, name: str, array: np.ndarray) -> None: ...

    def rows(self, name: str, n_cols: int, dtype: Any) -> Any: ...

    def array(self, name: str) -> np.ndarray: ...

    def keep_rows(self, name: str, n: int) -> None: ...


@dataclass
class Recipe:
    """How to make one dataset: what it is read from, with which parameters, and the builder.

    ``build(sink)`` writes :data:`ARRAYS` into ``sink`` (x float32 (n, f), y int32 (n,)) and
    returns the dataset's info as JSON-able values: ``n_classes``, ``source`` (a
    description), ``image_shape`` (or None) and ``notes`` (log lines about the data)."""

    dataset: str
    sources: list[Path]
    params: dict[str, Any]
    build: Callable[[Sink], dict[str, Any]]


@dataclass
class Loaded:
    """A dataset's arrays (mapped read-only from a cache entry, or in memory), its info, and
    log lines that say where the arrays come from."""

    arrays: dict[str, np.ndarray]
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of what makes an entry's bytes: this package's source files, numpy's version
    (its reductions set the standardisation's last bits) and the cache :data:`FORMAT`."""
    h = hashlib.sha256(f"format {FORMAT} numpy {np.__version__}".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _digest(value: Any, n: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


def identity(recipe: Recipe) -> dict[str, Any]:
    """What an entry must have been made from to serve ``recipe`` now (stats every source)."""
    sources = []
    for path in recipe.sources:
        try:
            st = path.stat()
        except OSError as exc:
            raise UserError(f"cannot read '{path}' ({exc.strerror or exc}); fix: check data.path") from exc
        sources.append({"path": str(path.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)})
    return {"format": FORMAT, "dataset": recipe.dataset, "sources": sources, "params": recipe.params,
            "code": code_version()}


def entry_name(ident: dict[str, Any]) -> str:
    label = _digest([ident["dataset"], [s["path"] for s in ident["sources"]], ident["params"]], 8)
    return f"{ident['dataset']}-{label}-{_digest(ident, 12)}"


def user_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/hpc_sparse`` or ``~/.cache/hpc_sparse`` (home folders are usually on
    a file system every node of a cluster sees)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hpc_sparse"


def _writable(folder: Path) -> bool:
    resolved = str(folder.resolve()) + "/"
    if resolved.startswith(_SYSTEM_PREFIXES):
        return False
    sub = folder / SUBFOLDER
    return os.access(sub if sub.is_dir() else folder, os.W_OK)


def choose_folder(cache_dir: str, sources: list[Path]) -> tuple[Path, str]:
    """The cache folder and why it was chosen: ``cache_dir`` if set; else ``hpc_sparse-cache``
    beside the first source if that folder is writable (and not a system folder under
    /usr); else :func:`user_cache_folder`."""
    if cache_dir:
        return Path(cache_dir).expanduser(), "data.cache_dir"
    if sources and _writable(sources[0].parent):
        return sources[0].parent / SUBFOLDER, "beside the source"
    why = "the source's folder is not writable" if sources else "the dataset has no source file"
    return user_cache_folder(), f"the user cache folder: {why}"


class Entry:
    """One dataset's entry in the cache ``folder``."""

    def __init__(self, folder: Path, recipe: Recipe) -> None:
        self.folder, self.recipe = folder, recipe
        self.identity = identity(recipe)
        self.name = entry_name(self.identity)
        self.path = folder / self.name

    def open(self) -> Loaded | None:
        """The entry's arrays mapped read-only, or None if it is missing, torn, or was made from
        other sources, parameters or code."""
        try:
            record_path = self.path / _RECORD
            if record_path.stat().st_size > _RECORD_MAX_BYTES:
                return None
            record = json.loads(record_path.read_text())
            if record.get("identity") != self.identity:
                return None
            arrays = {}
            for name in ARRAYS:
                spec, path = record["arrays"][name], self.path / f"{name}.npy"
                if path.stat().st_size != spec["bytes"]:
                    return None
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                if list(arr.shape) != spec["shape"] or arr.dtype.str != spec["dtype"]:
                    return None
                arrays[name] = np.asarray(arr)  # a plain read-only ndarray; its base keeps the map open
            return Loaded(arrays, dict(record["info"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def build(self) -> None:
        """Build the entry in a temporary folder and publish it by renaming the folder.

        Raises UserError for a bad source (also if it changed while it was read),
        CacheWriteError if the cache cannot be written; leaves no temporary folder either way.
        If another process published the same entry first, keeps that one."""
        tmp = self.folder / f".tmp-{self.name}-{secrets.token_hex(6)}"
        try:
            with writing(self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
            sink = FileSink(tmp)
            info = self.recipe.build(sink)
            sink.finish()
            for name in ARRAYS:  # every builder must deliver all four arrays
                if not sink.path(name).is_file():
                    raise RuntimeError(f"the {self.recipe.dataset} builder wrote no {name}")
            if identity(self.recipe) != self.identity:
                raise UserError(f"the {self.recipe.dataset} source files changed while they were read; fix: "
                                "wait until they are completely copied and run again")
            arrays = {}
            for name in ARRAYS:
                arr = np.load(sink.path(name), mmap_mode="r", allow_pickle=False)
                arrays[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str,
                                "bytes": sink.path(name).stat().st_size}
                del arr
            record = {"identity": self.identity, "arrays": arrays, "info": info,
                      "built": {"host": os.uname().nodename, "pid": os.getpid(), "time": time.time()}}
            with writing(tmp / _RECORD), open(tmp / _RECORD, "w") as fh:
                fh.write(json.dumps(record, indent=1) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if not self._publish(tmp):
                return  # another process published a complete entry first: keep it
            try:
                fsync_path(self.folder)
            except OSError:
                pass  # the rename is done; the durability of the folder's entry is best effort
            self._remove_replaced()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path) -> bool:
        """Rename ``tmp`` to the entry's name (atomic); False if a valid entry is there already.
        An invalid one there (damaged after it was published) is removed first."""
        for attempt in range(2):
            try:
                os.rename(tmp, self.path)
                return True
            except OSError as exc:
                if self.open() is not None:
                    return False
                if attempt or not self.path.exists():
                    raise CacheWriteError(f"cannot publish the data cache entry '{self.path}' "
                                          f"({exc.strerror or exc})") from exc
                shutil.rmtree(self.path, ignore_errors=True)
        return False

    def _remove_replaced(self) -> None:
        """Remove older entries of the same data and preprocessing, and temporary folders of
        builders that died. An entry another process still maps stays readable to it until
        it unmaps (the file system keeps unlinked files open)."""
        prefix = self.name.rsplit("-", 1)[0] + "-"
        now = time.time()
        for path in self.folder.iterdir():
            try:
                if path.name.startswith(prefix) and path.name != self.name:
                    shutil.rmtree(path)
                elif path.name.startswith(".tmp-") and now - _newest_mtime(path) > _STALE_SECONDS:
                    shutil.rmtree(path)
                elif path.name.startswith(".probe-") and now - path.stat().st_mtime > _STALE_SECONDS:
                    path.unlink()  # left by a job that died while deciding who builds
            except OSError:
                pass


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for path in folder.iterdir():
        times.append(path.stat().st_mtime)
    return max(times)


def _give_back_freed_memory() -> None:
    """Return the heap the build freed to the system: glibc keeps freed blocks below its mmap
    threshold, and the builder would then hold tens of MB more than the other ranks for the
    whole run. A no-op where there is no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_in_memory(recipe: Recipe) -> Loaded:
    """The dataset built into this process's memory (no cache)."""
    sink = MemorySink()
    info = recipe.build(sink)
    return Loaded({name: sink.array(name) for name in ARRAYS}, info)


# (folder, entry digest, is_valid(), build() -> write error or None) -> (who built it, write error)
Coordinate = Callable[[Path, str, Callable[[], bool], Callable[[], "str | None"]], "tuple[str, str | None]"]


def build_here(folder: Path, digest: str, is_valid: Callable[[], bool],
               build: Callable[[], str | None]) -> tuple[str, str | None]:
    """The serial :data:`Coordinate`: build if there is no valid entry."""
    if is_valid():
        return "", None
    return "built by this process", build()


def load_cached(recipe: Recipe, cache_dir: str = "", coordinate: Coordinate | None = None,
                wait_seconds: float = 30.0) -> Loaded:
    """The dataset of ``recipe``, mapped from its cache entry, built first if needed.

    ``coordinate`` decides which process builds (see
    :func:`hpc_sparse.parallel.node_build.build_once_per_node`; default: this one). If the
    cache cannot be written, or a rank cannot map what another built (after waiting up to
    ``wait_seconds`` for a network file system to show it), the dataset is built into memory
    instead and a note says so. ``cache_dir="off"``: always in memory."""
    if cache_dir == OFF:
        loaded = build_in_memory(recipe)
        loaded.notes.append("data cache: off (data.cache_dir='off'): every rank holds its own copy of the data")
        return loaded
    folder, why = choose_folder(cache_dir, recipe.sources)
    entry = Entry(folder, recipe)

    def build() -> str | None:
        try:
            entry.build()
            return None
        except CacheWriteError as exc:
            return str(exc)
        finally:
            _give_back_freed_memory()

    who, write_error = (coordinate or build_here)(folder, entry.name, lambda: entry.open() is not None, build)
    loaded = entry.open()
    deadline = time.monotonic() + (wait_seconds if who and write_error is None else 0.0)
    while loaded is None and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            os.listdir(folder)  # refreshes a network file system's view of the folder
        except OSError:
            pass
        loaded = entry.open()
    if loaded is not None:
        how = f"{who}; " if who else "already built; "
        loaded.notes = [f"data cache: {entry.path} ({why}), {how}every rank maps it read-only",
                        *loaded.info.get("notes", [])]
        return loaded
    loaded = build_in_memory(recipe)
    reason = write_error or f"this rank cannot read the entry that was built in {folder}"
    loaded.notes = [f"data cache: not used ({reason}); every rank holds its own copy of the data; fix: set "
                    "data.cache_dir to a writable folder with free space that every rank sees",
                    *loaded.info.get("notes", [])]
    return loaded
