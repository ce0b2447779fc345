"""What may be loaded: manifest structure, shard sizes and SHA-256, every array's content.

One process, nothing modified. The collective load of a run (each shard hashed once per
job, the choice agreed by all ranks) is :mod:`hpc_sparse.checkpoint.agreed`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from hpc_sparse.checkpoint import format as fmt


def error_text(exc: BaseException) -> str:
    """One line for any exception (a CheckpointError's message as it is)."""
    text = str(exc) if isinstance(exc, fmt.CheckpointError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())  # one line, whatever the underlying library printed


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """Parse and structurally check ``ckpt/manifest.json``; raise CheckpointError if unusable."""
    path = ckpt / fmt.MANIFEST_NAME
    if not ckpt.is_dir():
        raise fmt.invalid(ckpt, "no such folder", "pass a step-<N> folder under RUN_DIR/checkpoints")
    if not path.is_file():
        raise fmt.invalid(ckpt, f"{fmt.MANIFEST_NAME} is missing (the save never committed)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fmt.invalid(ckpt, f"{fmt.MANIFEST_NAME} cannot be parsed ({exc})") from exc
    if not isinstance(manifest, dict):
        raise fmt.invalid(ckpt, f"{fmt.MANIFEST_NAME} is not a JSON object")
    version = manifest.get("schema_version")
    if version not in fmt.SUPPORTED_SCHEMA_VERSIONS:
        raise fmt.invalid(ckpt, f"schema_version {version!r} is not supported (this hpc_sparse reads "
                                f"{list(fmt.SUPPORTED_SCHEMA_VERSIONS)})",
                          "load it with the hpc_sparse version that wrote it, or start a new run")
    for field, kind in (("step", int), ("n_ranks", int), ("meta", dict), ("shards", list), ("arrays", dict)):
        if not isinstance(manifest.get(field), kind):
            raise fmt.invalid(ckpt, f"{fmt.MANIFEST_NAME} field {field!r} is missing or not a {kind.__name__}")
    n_ranks, shards, arrays = manifest["n_ranks"], manifest["shards"], manifest["arrays"]
    if len(shards) != n_ranks or not all(isinstance(sh, dict) and isinstance(sh.get("keys"), list)
                                         and sh.get("file") == fmt.shard_file_name(r, n_ranks)
                                         for r, sh in enumerate(shards)):
        raise fmt.invalid(ckpt, f"manifest shard list does not match its {n_ranks} ranks")
    listed = {key: r for r, sh in enumerate(shards) for key in sh["keys"]}
    for key, spec in arrays.items():
        if not isinstance(spec, dict) or spec.get("kind") not in ("dense", "csr") \
                or listed.get(key) != spec.get("shard"):
            raise fmt.invalid(ckpt, f"manifest entry for array {key!r} is malformed or not in its shard")
    if set(listed) != set(arrays) or sum(len(sh["keys"]) for sh in shards) != len(arrays):
        raise fmt.invalid(ckpt, "manifest shards list arrays that are missing, or list one twice")
    return manifest


def check_shard_file(ckpt: Path, shard: Mapping[str, Any], hash_it: bool = True) -> Path:
    """Check one shard's presence and size (and, with ``hash_it``, its SHA-256) against the
    manifest; return its path."""
    path = ckpt / shard["file"]
    if not path.is_file():
        raise fmt.invalid(ckpt, f"shard {shard['file']} is missing")
    size = path.stat().st_size
    if size != shard.get("bytes"):
        raise fmt.invalid(ckpt, f"shard {shard['file']} has {size} bytes, manifest says {shard.get('bytes')} "
                                "(truncated or overwritten)")
    if hash_it and fmt.sha256_file(path) != shard.get("sha256"):
        raise fmt.invalid(ckpt, f"shard {shard['file']} fails its SHA-256 check (damaged or changed after "
                                "saving)")
    return path


def read_shards(path: Path, manifest: Mapping[str, Any], *, hashed: set[int] | None, deep: bool,
                rank: int | None = None, keep_arrays: bool = False
                ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Read a checkpoint's shards (every array with ``deep``, CSR with a full ``check_format``).

    ``hashed``: the shards whose SHA-256 this call checks (None: all). Returns the arrays
    (with ``keep_arrays``) and the per-rank state of shard ``rank`` (None if it has none).
    """
    state: dict[str, Any] = {}
    rank_state = None
    for r, shard in enumerate(manifest["shards"]):
        shard_path = check_shard_file(path, shard, hash_it=hashed is None or r in hashed)
        if not deep and r != rank:
            continue
        try:
            with h5py.File(shard_path, "r") as f:
                if deep:
                    group = f["state"]
                    for key in shard["keys"]:
                        value = fmt.read_entry(group, key, manifest["arrays"][key])
                        if keep_arrays:
                            state[key] = value
                if r == rank:
                    rank_state = fmt.read_rank_state(f)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise fmt.invalid(path, f"shard {shard['file']} content is unreadable or inconsistent "
                                    f"({error_text(exc)})") from exc
    return state, rank_state


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
    rank_state : dict of str to ndarray or None
    """
    path = Path(path)
    manifest = read_manifest(path)
    state, rank_state = read_shards(path, manifest, hashed=None, deep=True, rank=rank, keep_arrays=True)
    return state, manifest, rank_state


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` passes the same checks as ``load_checkpoint``.

    Reads one array at a time, so memory stays at the size of the largest array.
    """
    path = Path(path)
    read_shards(path, read_manifest(path), hashed=None, deep=True)


def verify_committed(step: int, path: Path, deep: bool = True) -> dict[str, Any]:
    """Verify ``path`` (``deep``: every array too; else manifest, sizes and SHA-256) and
    that the manifest's step matches the folder name. Returns the manifest."""
    manifest = read_manifest(path)
    read_shards(path, manifest, hashed=None, deep=deep)
    if manifest["step"] != step:
        raise fmt.invalid(path, f"manifest says step {manifest['step']} but the folder is step {step}")
    return manifest
