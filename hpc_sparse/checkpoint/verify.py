"""What may be loaded: manifest structure, shard sizes and SHA-256, every array's content.

One process, nothing modified. The collective load of a run (each shard hashed once per
job, the choice agreed by all ranks) is :mod:`hpc_sparse.checkpoint.agreed`.

Order of the checks, the same everywhere: the manifest (:mod:`.manifest`), then every
shard's size and SHA-256, and only then does HDF5's parser see a shard
(:mod:`.shard_reader`, which accepts only what this package writes). A problem with the
checkpoint's content is a :class:`~hpc_sparse.checkpoint.format.CheckpointError` (the
verdict "invalid"); a failure of the environment while reading (EIO, ESTALE, EACCES, an
HDF5 file lock, out of memory) is a
:class:`~hpc_sparse.checkpoint.format.CheckpointEnvironmentError`, which says nothing about
the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.checkpoint import shard_reader
from hpc_sparse.checkpoint.manifest import rank_state_spec, read_manifest

__all__ = ["check_shards", "error_text", "load_checkpoint", "parse_shards", "read_manifest", "verify_checkpoint",
           "verify_committed"]


def error_text(exc: BaseException) -> str:
    """One line for any exception (a CheckpointError's message as it is)."""
    text = str(exc) if isinstance(exc, fmt.UserError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())  # one line, whatever the underlying library printed


def check_shard_file(ckpt: Path, shard: Mapping[str, Any], hash_it: bool = True) -> Path:
    """Check one shard's presence and size (and, with ``hash_it``, its SHA-256) against the
    manifest; return its path."""
    path = ckpt / shard["file"]
    try:
        if path.is_symlink():
            raise fmt.invalid(ckpt, f"shard {shard['file']} is a symbolic link; a checkpoint's files must be "
                                    "regular files in its folder")
        if not path.is_file():
            raise fmt.invalid(ckpt, f"shard {shard['file']} is missing")
        size = path.stat().st_size
        if size != shard.get("bytes"):
            raise fmt.invalid(ckpt, f"shard {shard['file']} has {size} bytes, manifest says {shard.get('bytes')} "
                                    "(truncated or overwritten)")
        if hash_it and fmt.sha256_file(path) != shard.get("sha256"):
            raise fmt.invalid(ckpt, f"shard {shard['file']} fails its SHA-256 check (damaged or changed after "
                                    "saving)")
    except (OSError, MemoryError) as exc:
        raise fmt.reading_failed(exc, path, ckpt) from exc
    return path


def check_shards(path: Path, manifest: Mapping[str, Any], hashed: Iterable[int] | None = None) -> None:
    """Every shard's presence and size; the SHA-256 of those in ``hashed`` (None: all)."""
    hashed = None if hashed is None else set(hashed)
    for r, shard in enumerate(manifest["shards"]):
        check_shard_file(path, shard, hash_it=hashed is None or r in hashed)


def parse_shards(path: Path, manifest: Mapping[str, Any], *, deep: bool = True, rank: int | None = None,
                 keep_arrays: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Parse shards whose size and hash were checked (:func:`check_shards`): every array
    with ``deep`` (CSR with a full ``check_format``; every shard's per-rank state too), and
    the per-rank state of shard ``rank``.

    Returns the arrays (with ``keep_arrays``) and that per-rank state (None if it has none).
    """
    state: dict[str, Any] = {}
    rank_state = None
    version = manifest["schema_version"]
    for r, shard in enumerate(manifest["shards"]):
        if not deep and r != rank:
            continue
        shard_path = path / shard["file"]
        try:
            with h5py.File(shard_path, "r") as f:
                if deep:
                    group = shard_reader.resolve(f, "state", "group 'state'") if shard["keys"] else None
                    for key in shard["keys"]:
                        value = shard_reader.read_entry(group, key, manifest["arrays"][key], shard["bytes"])
                        if keep_arrays:
                            state[key] = value
                mine = shard_reader.read_rank_state(f, rank_state_spec(shard, version), shard["bytes"])
                if r == rank:
                    rank_state = mine
        except (OSError, MemoryError) as exc:
            if fmt.is_environment_error(exc):
                raise fmt.environment_error(exc, shard_path) from exc
            raise _unreadable(path, shard, exc) from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise _unreadable(path, shard, exc) from exc
    return state, rank_state


def _unreadable(path: Path, shard: Mapping[str, Any], exc: BaseException) -> fmt.CheckpointError:
    return fmt.invalid(path, f"shard {shard['file']} content is unreadable or inconsistent ({error_text(exc)})")


def load_checkpoint(path: str | Path, rank: int | None = None
                    ) -> tuple[dict[str, np.ndarray | sp.csr_matrix], dict, dict[str, np.ndarray] | None]:
    """Read and fully verify one committed checkpoint. Not collective; never modifies anything.

    Parameters
    ----------
    path : str or Path
        A ``step-<N>`` folder (see ``find_latest_valid``).
    rank : int, optional
        Whose per-rank state to return. None, or a rank the saving run did not have, gives None.

    Returns
    -------
    state : dict of str to ndarray or csr_matrix
        Every array with its saved shape and dtypes; CSR as ``scipy.sparse.csr_matrix``.
    manifest : dict
        The parsed ``manifest.json`` (``meta`` holds what was passed to ``save_checkpoint``).
    rank_state : dict of str to ndarray or csr_matrix, or None
    """
    path = Path(path)
    manifest = read_manifest(path)
    check_shards(path, manifest)
    state, rank_state = parse_shards(path, manifest, rank=rank, keep_arrays=True)
    return state, manifest, rank_state


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` passes the same checks as ``load_checkpoint``.

    Reads one array at a time, so memory stays at the size of the largest array.
    """
    verify_committed(None, Path(path))


def verify_committed(step: int | None, path: Path, deep: bool = True) -> dict[str, Any]:
    """Verify ``path`` (``deep``: every array too; else manifest, sizes and SHA-256) and
    that the manifest's step matches the folder name's ``step`` (None: not checked).
    Returns the manifest."""
    manifest = read_manifest(path)
    if step is not None and manifest["step"] != step:
        raise fmt.invalid(path, f"manifest says step {manifest['step']} but the folder is step {step}")
    check_shards(path, manifest)
    if deep:
        parse_shards(path, manifest)
    return manifest
