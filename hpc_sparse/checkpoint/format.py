"""On-disk layout of one checkpoint: folder names, HDF5 shards, manifest, checksums.

A committed checkpoint is a folder ``RUN_DIR/checkpoints/step-<N:09d>/`` holding

* ``shard-<r:05d>-of-<P:05d>.h5`` for every rank ``r`` of the ``P`` ranks that saved it.
  Group ``state/<key>`` holds the arrays assigned to that rank (``<key>`` may contain ``/``,
  which simply nests HDF5 groups). A dense array is one dataset; a CSR matrix is a group with
  datasets ``data`` (nnz,), ``indices`` (nnz,), ``indptr`` (n_rows + 1,) and ``shape`` (2,) int64.
  Group ``rank_state/<key>`` holds that rank's own arrays (its *per-rank state*, e.g. its own
  model where every rank trains one), dense or CSR in the same layout, of any size.
* ``manifest.json``, written last: schema version, step, meta, every shard's SHA-256 and size,
  and where every array lives. A folder without a valid manifest is never loaded.

Only numeric datasets and JSON are used: nothing is pickled, so loading a checkpoint never runs
code. This module knows nothing about MPI; ``manager.py`` orchestrates the collective save,
``verify.py`` decides what may be loaded (``manifest.py`` and ``shard_reader.py`` read the
two kinds of file as untrusted input), ``discovery.py`` finds (and sets aside) folders and
``agreed.py`` is the collective load of a resuming run.

Schema 3 (this version) describes each per-rank array in its shard's manifest entry exactly as
``arrays`` describes the shared ones (kind, shape, dtype; CSR adds nnz and index dtype) and
writes it the same way (large arrays through the direct-write, hash-from-memory path). Schema
2 (per-rank state of dense arrays, each with its shape and dtype) and schema 1 (per-rank state
without a description) are still read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy
import scipy.sparse as sp

from hpc_sparse import __version__
from hpc_sparse.errors import UserError

SCHEMA_VERSION: int = 3
SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
MANIFEST_MAX_BYTES = 64 << 20
"""A manifest larger than this is refused unread (one epoch's metrics record is ~0.5 KB)."""
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
_STEP_RE = re.compile(r"^step-(\d{9,})$")

#: HDF5 filter for CSR ``indices``/``indptr`` (None, "lzf" or "gzip"). None by measurement:
#: on 17 M random column indices lzf+shuffle shrinks them to 34 % but writes at ~200 MB/s,
#: well below the disk (~1 GB/s), and float weights do not compress at all. Fast beats small.
INDEX_COMPRESSION: str | None = None
_CHUNK = 1 << 20  # elements per chunk when a filter is on (filters need chunked layout)
_DIRECT_MIN_BYTES = 1 << 20  # arrays at least this large bypass HDF5's write path (see write_shard)
_HASH_BLOCK = 8 << 20

State = Mapping[str, "np.ndarray | sp.csr_matrix"]
FIX_DELETE = "delete this folder; resuming picks the newest valid checkpoint automatically"


class CheckpointError(UserError):
    """A checkpoint cannot be written, read or trusted. The message names the problem and the fix.

    Raised while loading, it is a verdict on the checkpoint's *content* (manifest, size, hash,
    format): only such a verdict may set a checkpoint aside."""


class CheckpointEnvironmentError(UserError):
    """Reading a checkpoint failed because of the environment (EIO, ESTALE, EACCES, an HDF5
    file lock, out of memory), not because of its content. Never a reason to set the
    checkpoint aside or to start afresh: the job stops and says which file and errno."""


#: errno values that say something about the checkpoint's files themselves (a shard that is
#: missing, a folder where a file belongs, a symbolic link opened with O_NOFOLLOW); every
#: other errno is the environment's.
CONTENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP})


def invalid(path: str | Path, what: str, fix: str = FIX_DELETE) -> CheckpointError:
    """Build the standard one-line error for a checkpoint that fails verification."""
    return CheckpointError(f"checkpoint {path} is invalid: {what}; fix: {fix}")


def is_environment_error(exc: BaseException) -> bool:
    """True for MemoryError and an OSError whose errno is the environment's (not in
    :data:`CONTENT_ERRNOS`). HDF5's own format errors come without an errno."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, OSError) and exc.errno is not None and exc.errno not in CONTENT_ERRNOS


def environment_error(exc: BaseException, file: str | Path) -> CheckpointEnvironmentError:
    """The one-line error for an environment failure ``exc`` while reading ``file``."""
    if isinstance(exc, MemoryError):
        what = "out of memory"
    else:
        code = exc.errno if isinstance(exc, OSError) and exc.errno is not None else 0
        what = f"{errno.errorcode.get(code, 'error')} (errno {code}: {os.strerror(code)})"
    detail = " ".join(str(exc).split())
    return CheckpointEnvironmentError(
        f"cannot read checkpoint file {file}: {what}{f' [{detail}]' if detail else ''}; this is an error of the "
        "file system or the machine, not of the checkpoint, which is left as it is; fix: check the file "
        "system (mounts, permissions, free memory, HDF5 file locks held by another process) and run again")


def reading_failed(exc: BaseException, file: str | Path, ckpt: str | Path | None = None) -> UserError:
    """What to raise for ``exc`` while reading ``file`` of checkpoint ``ckpt`` (default: its
    folder): an environment error, or the verdict "invalid" for a content errno."""
    if is_environment_error(exc):
        return environment_error(exc, file)
    ckpt = Path(file).parent if ckpt is None else ckpt
    return invalid(ckpt, f"{Path(file).name} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())})")


def _open_regular(path: Path, ckpt: str | Path, missing: str) -> int:
    """Open ``path`` read-only without following a symbolic link and without blocking (a FIFO
    must not hang the job); refuse anything that is not a regular file. Returns the fd."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise invalid(ckpt, missing) from None
    if stat.S_ISLNK(info.st_mode):
        raise invalid(ckpt, f"{path.name} is a symbolic link; a checkpoint's files must be regular files in "
                            "its folder")
    if not stat.S_ISREG(info.st_mode):
        raise invalid(ckpt, f"{path.name} is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between lstat and open
        os.close(fd)
        raise invalid(ckpt, f"{path.name} is not a regular file")
    return fd


def read_regular_file(path: Path, cap: int, ckpt: str | Path, missing: str) -> bytes:
    """The bytes of the regular file ``path`` (at most ``cap``; larger is a verdict)."""
    fd = _open_regular(path, ckpt, missing)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise invalid(ckpt, f"{path.name} has {size} bytes, more than the {cap} it may have")
        chunks, total = [], 0
        while chunk := os.read(fd, min(_HASH_BLOCK, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise invalid(ckpt, f"{path.name} has more than the {cap} bytes it may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    """Folder name of the committed checkpoint of ``step`` (``step-000000123``)."""
    return f"{STEP_PREFIX}{step:09d}"


def tmp_dir_name(step: int) -> str:
    """Folder name used while ``step`` is being written; never loaded."""
    return f"{TMP_PREFIX}{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """Step number of a committed folder name, or None for anything else (``.tmp-*`` included)."""
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def shard_file_name(rank: int, size: int) -> str:
    """File name of the shard written by ``rank`` out of ``size`` ranks."""
    return f"shard-{rank:05d}-of-{size:05d}.h5"


def is_csr(x: Any) -> bool:
    """True for scipy CSR matrices and arrays."""
    return sp.issparse(x) and x.format == "csr"


def check_keys(keys: list[Any], where: str) -> None:
    """Reject keys that cannot be HDF5 paths: non-strings, empty/``.``/``..`` parts, and a key
    that is a folder of another ("a" and "a/b" would make "a" both a dataset and a group)."""
    keyset = set(keys)
    for key in keys:
        if not isinstance(key, str) or any(part in ("", ".", "..") for part in key.split("/")):
            raise CheckpointError(f"{where} key {key!r} is not a valid path (empty, '.' or '..' part); "
                                  "fix: name arrays like 'layers/0/W'")
        parts = key.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in keyset:
                raise CheckpointError(f"{where} key {'/'.join(parts[:i])!r} is also a prefix of {key!r}; "
                                      "fix: rename one so that no key is a folder of another")


def _check_dense(key: str, arr: Any, where: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise CheckpointError(f"{where} entry {key!r} is a {type(arr).__name__}, not a numpy array or CSR "
                              "matrix; fix: convert it with np.asarray or put small values in meta")
    if arr.dtype.kind not in "biufc":
        raise CheckpointError(f"{where} entry {key!r} has non-numeric dtype {arr.dtype}; fix: store numbers "
                              "only (strings and objects belong in meta)")
    return arr


def describe_state(state: State, where: str = "state") -> dict[str, dict[str, Any]]:
    """Validate ``state`` (or, ``where="rank_state"``, a rank's per-rank state) and describe
    every entry for the manifest.

    Parameters
    ----------
    state : dict of str to ndarray or csr_matrix
        Numeric dense arrays of any shape, or CSR matrices (any numeric ``data`` dtype,
        int32 or int64 ``indices``/``indptr``).
    where : str
        Names the dict in error messages.

    Returns
    -------
    dict of str to dict
        Per key: ``kind`` ("dense" or "csr"), ``shape`` (list of int), ``dtype`` (numpy dtype
        string such as "<f4"), ``nbytes``; CSR adds ``nnz`` and ``index_dtype``.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} is a {type(state).__name__}; fix: pass a dict of arrays")
    check_keys(list(state), where)
    specs: dict[str, dict[str, Any]] = {}
    for key, x in state.items():
        if is_csr(x):
            if len(x.indptr) != x.shape[0] + 1 or len(x.indices) != len(x.data):
                raise CheckpointError(f"{where} entry {key!r} is a malformed CSR matrix (indptr/indices/data "
                                      "lengths disagree with its shape); fix: call check_format() on it")
            _check_dense(key, x.data, where)
            specs[key] = {
                "kind": "csr", "shape": [int(s) for s in x.shape], "dtype": x.data.dtype.str,
                "index_dtype": x.indices.dtype.str, "nnz": int(x.nnz),
                "nbytes": int(x.data.nbytes + x.indices.nbytes + x.indptr.nbytes),
            }
        else:
            arr = _check_dense(key, x, where)
            specs[key] = {"kind": "dense", "shape": list(arr.shape), "dtype": arr.dtype.str,
                          "nbytes": int(arr.nbytes)}
    return specs


def manifest_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """An entry of :func:`describe_state` as the manifest stores it (without ``nbytes``)."""
    return {k: v for k, v in spec.items() if k != "nbytes"}


def assign_keys(nbytes: Mapping[str, int], n_ranks: int) -> list[list[str]]:
    """Split keys into ``n_ranks`` disjoint lists balanced by bytes (greedy, largest first).

    Pure and deterministic: ties break by key name and then by the lowest rank, so every rank
    computes the same assignment from the same state. Returns one sorted key list per rank.
    """
    loads = [0] * n_ranks
    parts: list[list[str]] = [[] for _ in range(n_ranks)]
    for key in sorted(nbytes, key=lambda k: (-nbytes[k], k)):
        target = min(range(n_ranks), key=lambda r: (loads[r], r))
        parts[target].append(key)
        loads[target] += nbytes[key]
    return [sorted(p) for p in parts]


def _create(group: h5py.Group, name: str, arr: np.ndarray, compress: bool,
            direct: list[tuple[int, np.ndarray]]) -> None:
    """Create dataset ``name``; large plain numeric arrays only get space reserved (see write_shard)."""
    if compress and INDEX_COMPRESSION and arr.size:
        opts = {"compression": INDEX_COMPRESSION, "shuffle": True, "chunks": (min(arr.size, _CHUNK),)}
        if INDEX_COMPRESSION == "gzip":
            opts["compression_opts"] = 1
        group.create_dataset(name, data=arr, **opts)
        return
    if arr.nbytes < _DIRECT_MIN_BYTES or arr.dtype.kind not in "iuf":
        group.create_dataset(name, data=arr)
        return
    # Contiguous storage allocated now and never filled: HDF5 writes only metadata, and we
    # pwrite the array's bytes at the dataset's file offset after closing the file.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    ds = group.create_dataset(name, shape=arr.shape, dtype=arr.dtype, dcpl=dcpl)
    offset = ds.id.get_offset()
    if offset is None or ds.id.get_storage_size() != arr.nbytes:
        ds[...] = arr  # unexpected layout: let HDF5 write it
    else:
        direct.append((offset, np.ascontiguousarray(arr)))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # a single write may be partial (Linux caps one call at ~2 GiB)
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _hash_file_with(fd: int, size: int, direct: list[tuple[int, np.ndarray]]) -> str:
    """SHA-256 of the final file: gaps (HDF5 metadata, small arrays) read from ``fd``, large
    arrays taken from memory, where they are identical to what gets written."""
    digest = hashlib.sha256()
    pos = 0
    for offset, arr in direct + [(size, None)]:
        while pos < offset:
            gap = os.pread(fd, min(offset - pos, _HASH_BLOCK), pos)
            if not gap:
                raise OSError(f"unexpected end of file at byte {pos}")
            digest.update(gap)
            pos += len(gap)
        if arr is not None:
            digest.update(memoryview(arr).cast("B"))
            pos += arr.nbytes
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a regular file, read in blocks (hashlib releases the GIL on large
    updates). A symbolic link or anything but a regular file is refused (CheckpointError)."""
    path = Path(path)
    digest = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    fd = _open_regular(path, path.parent, f"{path.name} is missing")
    with open(fd, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory fsync makes renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_entries(group: h5py.Group, entries: State, keys: list[str],
                   direct: list[tuple[int, np.ndarray]]) -> None:
    """Write ``entries[k] for k in keys`` into ``group``: a CSR matrix as a group of four
    datasets, a dense array as one; large arrays only get their extent reserved (``direct``)."""
    for key in keys:
        x = entries[key]
        if is_csr(x):
            g = group.create_group(key)
            g.attrs["kind"] = "csr"
            _create(g, "data", x.data, False, direct)
            _create(g, "indices", x.indices, True, direct)
            _create(g, "indptr", x.indptr, True, direct)
            g.create_dataset("shape", data=np.asarray(x.shape, dtype=np.int64))
        else:
            _create(group, key, x, False, direct)


def write_shard(path: Path, state: State, keys: list[str], rank_state: State | None,
                attrs: Mapping[str, int]) -> tuple[str, int]:
    """Write ``state[k] for k in keys`` and this rank's ``rank_state`` to one HDF5 shard,
    fsync it.

    Returns
    -------
    (sha256 hex str, size in bytes) of the file as it is on disk.
    """
    # Why not just let h5py write everything and hash the file afterwards: hashing (~1.7 GB/s)
    # would then run after the write, and halve the throughput on a fast disk. Instead HDF5
    # writes the metadata and small arrays, large arrays are pwritten into their reserved
    # extents, and a thread hashes the final byte stream from memory while we write and fsync.
    direct: list[tuple[int, np.ndarray]] = []
    with h5py.File(path, "w") as f:
        for name, value in attrs.items():
            f.attrs[name] = value
        _write_entries(f.create_group("state"), state, keys, direct)
        if rank_state is not None:
            _write_entries(f.create_group("rank_state"), rank_state, list(rank_state), direct)
    direct.sort(key=lambda item: item[0])
    size = path.stat().st_size
    ends = [off + arr.nbytes for off, arr in direct]
    if any(end > nxt for end, (nxt, _) in zip(ends, direct[1:])) or (ends and ends[-1] > size):
        raise OSError(f"HDF5 reserved overlapping or out-of-file extents in {path}")
    fd = os.open(path, os.O_RDWR)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(_hash_file_with, fd, size, direct)
            try:
                for offset, arr in direct:
                    _pwrite_all(fd, memoryview(arr).cast("B"), offset)
                os.fsync(fd)
            finally:
                digest = future.result()
        if os.fstat(fd).st_size != size:
            raise OSError(f"{path} changed size while being written")
    finally:
        os.close(fd)
    return digest, size


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.size <= 4096:
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def meta_to_jsonable(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip ``meta`` through JSON (numpy scalars become Python numbers) or raise CheckpointError."""
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"meta is a {type(meta).__name__}; fix: pass a dict (config, epoch, RNG states)")
    try:
        return json.loads(json.dumps(dict(meta), default=_json_default))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"meta cannot be stored as JSON ({exc}); fix: keep meta to numbers, strings, lists and dicts "
            "and put arrays in state"
        ) from exc


def library_versions() -> dict[str, str]:
    """Versions of the libraries that wrote the checkpoint (for the manifest)."""
    return {"hpc_sparse": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "python": platform.python_version()}


def build_manifest(step: int, meta: dict[str, Any], specs: Mapping[str, dict[str, Any]],
                   assignment: list[list[str]], shard_results: list[tuple[str, int, dict | None]]) -> dict[str, Any]:
    """Assemble the manifest. ``shard_results[r]`` is ``(sha256, bytes, rank_state specs or
    None)`` of rank r's shard (the specs from :func:`describe_state`)."""
    n_ranks = len(assignment)
    shard_of = {key: r for r, keys in enumerate(assignment) for key in keys}
    arrays = {key: manifest_spec(spec) | {"shard": shard_of[key]} for key, spec in specs.items()}
    shards = [{"file": shard_file_name(r, n_ranks), "rank": r, "sha256": sha, "bytes": nbytes,
               "keys": assignment[r], "has_rank_state": rs is not None}
              | ({} if rs is None else {"rank_state": {k: manifest_spec(v) for k, v in rs.items()}})
              for r, (sha, nbytes, rs) in enumerate(shard_results)]
    return {
        "schema_version": SCHEMA_VERSION, "step": int(step), "epoch": meta.get("epoch"),
        "n_ranks": n_ranks, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta": meta, "shards": shards, "arrays": arrays, "versions": library_versions(),
    }


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` and fsync it (it is the last file of a checkpoint)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
