"""Collective save with atomic commit and retention; verified load; discovery of checkpoints.

The communicator is passed in and only used through mpi4py's interface (``rank``, ``size``,
``allgather``, ``bcast``, ``Barrier``); this package never imports mpi4py, so a size-1 stand-in
works too. Weight arrays never travel through MPI here: every rank already holds the full
replica and writes its own part of it straight to HDF5. Only short status tuples (error text,
checksum, size) are exchanged, with the pickle-based lowercase collectives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.checkpoint.format import CheckpointError

log = logging.getLogger(__name__)

_FIX_WRITE = "check free space and write permission on {where}, then save again"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Folder that holds all checkpoints of a run: ``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def _error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())  # one line, whatever the underlying library printed


def _raise_if_failed(comm: Any, errors: list[str | None], what: str, fix: str,
                     cleanup: Callable[[], None] | None = None) -> None:
    """Given every rank's error (or None), make all ranks raise the same error if any rank failed.

    ``errors`` comes from one ``allgather``, so all ranks take the same branch. ``cleanup`` runs
    on rank 0 before anyone raises, so no half-written folder outlives the failure.
    """
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if comm.rank == 0 and cleanup is not None:
        try:
            cleanup()
        except OSError as exc:
            log.warning("could not remove a half-written checkpoint: %s", exc)
    comm.Barrier()
    ranks = ", ".join(str(r) for r, _ in failed)
    first = failed[0][1]
    if "; fix:" in first:  # validation errors already carry their own fix
        raise CheckpointError(f"{what} failed on rank {ranks}: {first}")
    raise CheckpointError(f"{what} failed on rank {ranks}: {first}; nothing was committed; fix: {fix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``; if ``final`` exists, swap it out first."""
    parent = final.parent
    old = None
    if final.exists() or final.is_symlink():
        # A resumed run reached a step it had already saved. Move the old one aside (ignored by
        # discovery), commit the new one, then drop the old one: a crash in between leaves the
        # older committed steps intact, never a half-written step-N.
        old = parent / (fmt.OLD_PREFIX + final.name[len(fmt.STEP_PREFIX):])
        _remove(old)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)  # put the previous step-N back
        raise
    try:
        fmt.fsync_path(parent)  # make the rename durable
        if old is not None:
            _remove(old)
    except OSError as exc:  # committed already; do not report the save as failed
        log.warning("checkpoint %s committed, but finishing touches failed: %s", final, exc)


def committed_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every committed ``step-*`` folder, newest first (``.tmp-*`` ignored)."""
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return []
    found = [(fmt.parse_step_dir(p.name), p) for p in ckdir.iterdir()]
    return sorted(((s, p) for s, p in found if s is not None and p.is_dir() and not p.is_symlink()),
                  reverse=True)


def _apply_retention(ckdir: Path, new_step: int, keep: int) -> None:
    """Delete committed checkpoints older than the ``keep`` newest valid ones (the new one counts).

    Only committed ``step-*`` folders older than ``new_step`` are considered. An invalid folder
    does not count towards ``keep``, so a damaged recent checkpoint never causes the deletion of
    the last good one. Validity here means manifest + sizes + SHA-256: the bytes are exactly the
    ones written, which is enough to decide what to keep and costs one read of each kept folder.
    """
    n_valid = 1
    for step, path in committed_checkpoints(ckdir.parent):
        if step >= new_step:
            continue
        if n_valid < keep:
            try:
                _verify_committed(step, path, deep=False)
                n_valid += 1
            except CheckpointError as exc:
                log.warning("keeping invalid checkpoint %s (not counted towards keep=%d): %s", path, keep, exc)
            continue
        _remove(path)


def save_checkpoint(comm: Any, run_dir: str | Path, step: int, state: Mapping[str, np.ndarray | sp.csr_matrix],
                    meta: dict, keep: int = 2, rank_state: Mapping[str, np.ndarray] | None = None) -> Path:
    """Collectively save one checkpoint; return the committed ``run_dir/checkpoints/step-<N:09d>``.

    Parameters
    ----------
    comm : mpi4py-like communicator
        Every rank of it must call this with the same ``step``, ``state`` and ``meta``.
    run_dir : str or Path
        Run folder, shared by all ranks; checkpoints go to ``run_dir/checkpoints``.
    step : int
        Global step (>= 0); names the folder. An existing ``step-N`` is safely replaced.
    state : dict of str to ndarray or csr_matrix
        The full replica (identical on every rank). Keys may contain ``/``. Each rank writes a
        disjoint subset, balanced by bytes.
    meta : dict
        JSON-serializable run metadata (config, ``epoch``, RNG states...), stored in the manifest.
    keep : int
        Number of newest valid checkpoints to keep (>= 1); older committed ones are deleted
        only after this one has committed.
    rank_state : dict of str to ndarray, optional
        Small per-rank arrays, stored in this rank's own shard.

    Raises
    ------
    CheckpointError
        On every rank if any rank failed; then nothing was committed and the tmp folder is gone.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step {step!r} is not an integer >= 0; fix: pass the global step counter")
    if not isinstance(keep, (int, np.integer)) or keep < 1:
        raise CheckpointError(f"keep={keep!r} must be an integer >= 1; fix: set keep to 2 or more")
    step, keep = int(step), int(keep)
    rank, size = comm.rank, comm.size
    ckdir = checkpoint_dir(run_dir)
    tmp, final = ckdir / fmt.tmp_dir_name(step), ckdir / fmt.step_dir_name(step)
    where = f"checkpoint save of step {step} to {final}"
    fix = _FIX_WRITE.format(where=ckdir)

    def cleanup() -> None:
        _remove(tmp)

    # Phase 1: validate inputs on every rank (rank_state differs per rank), rank 0 makes the tmp
    # folder; one allgather tells everyone whether to go on.
    error = None
    try:
        specs = fmt.describe_state(state)
        meta_json = fmt.meta_to_jsonable(meta)
        if rank_state is not None:
            fmt.check_rank_state(rank_state)
        if rank == 0:
            ckdir.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # leftovers of an interrupted attempt at this same step
            tmp.mkdir()
    except Exception as exc:  # noqa: BLE001 - reported collectively, re-raised below
        error = _error_text(exc)
    _raise_if_failed(comm, comm.allgather(error), where, fix, cleanup)

    # Phase 2: each rank writes its disjoint part, then all agree on success.
    assignment = fmt.assign_keys({k: s["nbytes"] for k, s in specs.items()}, size)
    attrs = {"schema_version": fmt.SCHEMA_VERSION, "step": step, "rank": rank, "n_ranks": size}
    error, result = None, None
    try:
        sha, nbytes = fmt.write_shard(tmp / fmt.shard_file_name(rank, size), state, assignment[rank],
                                      rank_state, attrs)
        result = (sha, nbytes, rank_state is not None)
    except Exception as exc:  # noqa: BLE001
        error = _error_text(exc)
    results = comm.allgather((error, result))
    _raise_if_failed(comm, [e for e, _ in results], where, fix, cleanup)

    # Phase 3: rank 0 writes the manifest last, commits by rename, then applies retention.
    error = None
    if rank == 0:
        try:
            shard_results = [r for _, r in results]
            for r, (_, nbytes, _) in enumerate(shard_results):
                shard = tmp / fmt.shard_file_name(r, size)
                on_disk = shard.stat().st_size if shard.is_file() else None
                if on_disk != nbytes:  # rank 0 must see what rank r wrote (shared file system)
                    raise CheckpointError(f"rank 0 sees {on_disk} bytes in shard {r}, rank {r} wrote {nbytes}; "
                                          f"fix: put run_dir on a file system shared by all ranks")
            manifest = fmt.build_manifest(step, meta_json, specs, assignment, shard_results)
            fmt.write_manifest(tmp / fmt.MANIFEST_NAME, manifest)
            fmt.fsync_path(tmp)
            _commit(tmp, final)
        except Exception as exc:  # noqa: BLE001
            error = f"{where} failed on rank 0: {_error_text(exc)}"
            try:
                cleanup()
            except OSError:
                pass
        if error is None:
            try:
                _apply_retention(ckdir, step, keep)
            except OSError as exc:  # the new checkpoint is safe; a failed cleanup must not stop training
                log.warning("checkpoint retention in %s failed: %s", ckdir, exc)
    error = comm.bcast(error, root=0)  # also the barrier: nobody returns before the commit
    if error is not None:
        if "; fix:" not in error:
            error += f"; nothing was committed; fix: {fix}"
        raise CheckpointError(error)
    return final


# ---------------------------------------------------------------- verification


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


def _check_shard_file(ckpt: Path, shard: Mapping[str, Any]) -> Path:
    """Check one shard's presence, size and SHA-256 against the manifest; return its path."""
    path = ckpt / shard["file"]
    if not path.is_file():
        raise fmt.invalid(ckpt, f"shard {shard['file']} is missing")
    size = path.stat().st_size
    if size != shard.get("bytes"):
        raise fmt.invalid(ckpt, f"shard {shard['file']} has {size} bytes, manifest says {shard.get('bytes')} "
                                "(truncated or overwritten)")
    if fmt.sha256_file(path) != shard.get("sha256"):
        raise fmt.invalid(ckpt, f"shard {shard['file']} fails its SHA-256 check (damaged or changed after "
                                "saving)")
    return path


def _verify(path: Path, deep: bool, rank: int | None = None,
            keep_arrays: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray] | None]:
    """Check a checkpoint; with ``deep``, also read every array (CSR: full ``check_format``)."""
    path = Path(path)
    manifest = read_manifest(path)
    state: dict[str, Any] = {}
    rank_state = None
    for r, shard in enumerate(manifest["shards"]):
        shard_path = _check_shard_file(path, shard)
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
                                    f"({_error_text(exc)})") from exc
    return state, manifest, rank_state


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
    state, manifest, rank_state = _verify(Path(path), deep=True, rank=rank, keep_arrays=True)
    return state, manifest, rank_state


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` passes the same checks as ``load_checkpoint``.

    Reads one array at a time, so memory stays at the size of the largest array.
    """
    _verify(Path(path), deep=True)


def _verify_committed(step: int, path: Path, deep: bool = True) -> dict[str, Any]:
    """``_verify`` plus: the manifest's step matches the folder name. Returns the manifest."""
    manifest = _verify(path, deep=deep)[1]
    if manifest["step"] != step:
        raise fmt.invalid(path, f"manifest says step {manifest['step']} but the folder is step {step}")
    return manifest


def find_latest_valid(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Newest committed checkpoint that passes full verification (``.tmp-*`` folders are ignored).

    Returns
    -------
    path : Path or None
        None when the run has no valid checkpoint.
    skipped : list of (Path, str)
        Newer folders that failed verification and why, newest first.
    """
    skipped: list[tuple[Path, str]] = []
    for step, path in committed_checkpoints(run_dir):
        try:
            _verify_committed(step, path)
            return path, skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    return None, skipped


def list_checkpoints(run_dir: str | Path) -> list[dict]:
    """Every committed checkpoint, oldest first, each fully verified.

    Returns dicts with ``path`` (Path), ``step``, ``epoch``, ``n_ranks`` (None if unreadable),
    ``valid`` (bool), ``reason`` ("" when valid) and ``bytes`` (total size of the folder's files).
    """
    rows = []
    for step, path in reversed(committed_checkpoints(run_dir)):
        row: dict[str, Any] = {"path": path, "step": step, "epoch": None, "n_ranks": None,
                               "valid": True, "reason": "",
                               "bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file())}
        try:
            manifest = read_manifest(path)
            row["epoch"], row["n_ranks"] = manifest.get("epoch"), manifest["n_ranks"]
            _verify_committed(step, path)
        except CheckpointError as exc:
            row["valid"], row["reason"] = False, str(exc)
        rows.append(row)
    return rows
