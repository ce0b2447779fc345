"""Collective save with atomic commit and retention. Nothing committed is ever deleted except
by retention (``keep``); a folder that would be replaced is set aside, renamed.

The communicator is passed in and only used through mpi4py's interface (``rank``, ``size``,
``allgather``, ``bcast``, ``Barrier``); this package never imports mpi4py, so a size-1 stand-in
works too. Weight arrays never travel through MPI here: every rank already holds the full
replica and writes its own part of it straight to HDF5. Only short status tuples (error text,
checksum, size, digests of the meta, which every rank must pass alike) are exchanged, with
the pickle-based lowercase collectives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.checkpoint.discovery import checkpoint_dir, committed_checkpoints, set_aside
from hpc_sparse.checkpoint.format import CheckpointError
from hpc_sparse.checkpoint.verify import error_text, verify_committed

log = logging.getLogger(__name__)

_FIX_WRITE = "check free space and write permission on {where}, then save again"


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
        raise CheckpointError(f"{what} failed on rank {ranks}: {first}", every_rank=True)
    raise CheckpointError(f"{what} failed on rank {ranks}: {first}; nothing was committed; fix: {fix}",
                          every_rank=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _commit_folder(tmp: Path, final: Path, step: int) -> None:
    """Rename the finished ``tmp`` folder to ``final``. If ``final`` exists (a folder of the
    same step, e.g. one a resumed run skipped as invalid), it is set aside first, renamed
    ``<name>.invalid-<time>`` or ``<name>.replaced-<time>``, never deleted."""
    parent = final.parent
    old = None
    if final.exists() or final.is_symlink():
        reason = "replaced"
        try:
            verify_committed(step, final, deep=False)
        except CheckpointError:
            reason = "invalid"
        old = set_aside(final, reason)
        log.warning("checkpoint folder %s existed; set aside as %s", final, old.name)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)  # put the previous step-N back
        raise
    try:
        fmt.fsync_path(parent)  # make the rename durable
    except OSError as exc:  # committed already; do not report the save as failed
        log.warning("checkpoint %s committed, but finishing touches failed: %s", final, exc)


# Checkpoints this process committed or verified in full, with the identity of their files
# then: retention trusts them without re-hashing while the files are unchanged.
_VERIFIED: dict[Path, tuple] = {}


def _identity(path: Path) -> tuple:
    """(name, inode, size, mtime) of every file of a checkpoint folder; changes if any is replaced."""
    return tuple(sorted((p.name, s.st_ino, s.st_size, s.st_mtime_ns)
                        for p in path.iterdir() for s in [p.lstat()]))


def remember_verified(path: Path) -> None:
    """Record that this process has verified the committed checkpoint ``path`` (best effort)."""
    try:
        _VERIFIED[Path(path).resolve()] = _identity(Path(path))
    except OSError:
        pass


def _known_valid(path: Path) -> bool:
    try:
        return _VERIFIED.get(path.resolve()) == _identity(path)
    except OSError:
        return False


def _apply_retention(ckdir: Path, new_step: int, keep: int) -> None:
    """Delete committed checkpoints older than the ``keep`` newest valid ones (the new one counts).

    Only committed ``step-*`` folders older than ``new_step`` are considered. An invalid folder
    does not count towards ``keep``, so a damaged recent checkpoint never causes the deletion of
    the last good one. Validity here means manifest + sizes + SHA-256: the bytes are exactly the
    ones written. A checkpoint this process wrote or verified itself, whose files are unchanged
    since, is not hashed again. A folder that cannot be read (the environment's fault) is kept
    and not counted.
    """
    n_valid = 1
    for step, path in committed_checkpoints(ckdir.parent):
        if step >= new_step:
            continue
        if n_valid < keep:
            try:
                if not _known_valid(path):
                    verify_committed(step, path, deep=False)
                    remember_verified(path)
                n_valid += 1
            except (CheckpointError, fmt.CheckpointEnvironmentError) as exc:
                log.warning("keeping checkpoint %s (not counted towards keep=%d): %s", path, keep, exc)
            continue
        _remove(path)
        _VERIFIED.pop(path.resolve(), None)


def save_checkpoint(comm: Any, run_dir: str | Path, step: int, state: Mapping[str, np.ndarray | sp.csr_matrix],
                    meta: dict, keep: int = 2, rank_state: Mapping[str, np.ndarray | sp.csr_matrix] | None = None
                    ) -> Path:
    """Collectively save one checkpoint; return the committed ``run_dir/checkpoints/step-<N:09d>``.

    Three phases, each ending with every rank knowing whether every rank succeeded
    (:func:`_prepare`, :func:`_write_shards`, :func:`_commit`).

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
    rank_state : dict of str to ndarray or csr_matrix, optional
        This rank's own arrays (e.g. its own model where every rank trains one), of any
        size, stored in its own shard like ``state``'s and described in the manifest.

    Raises
    ------
    CheckpointError
        On every rank if any rank failed; then nothing was committed and the tmp folder is gone.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step {step!r} is not an integer >= 0; fix: pass the global step counter")
    if not isinstance(keep, (int, np.integer)) or keep < 1:
        raise CheckpointError(f"keep={keep!r} must be an integer >= 1; fix: set keep to 2 or more")
    save = _Save(comm, Path(run_dir), int(step))
    specs, meta_json, rank_specs = _prepare(save, state, meta, rank_state)
    assignment = fmt.assign_keys({k: s["nbytes"] for k, s in specs.items()}, comm.size)
    shard_results = _write_shards(save, state, assignment[comm.rank], rank_state, rank_specs)
    _commit(save, fmt.build_manifest(save.step, meta_json, specs, assignment, shard_results)
            if comm.rank == 0 else None, int(keep))
    return save.final


class _Save:
    """Where one collective save writes, and how its failures are reported."""

    def __init__(self, comm: Any, run_dir: Path, step: int) -> None:
        self.comm, self.step = comm, step
        self.ckdir = checkpoint_dir(run_dir)
        self.tmp, self.final = self.ckdir / fmt.tmp_dir_name(step), self.ckdir / fmt.step_dir_name(step)
        self.where = f"checkpoint save of step {step} to {self.final}"
        self.fix = _FIX_WRITE.format(where=self.ckdir)

    def cleanup(self) -> None:
        _remove(self.tmp)


def _digests(meta: dict[str, Any]) -> dict[str, str]:
    """A short SHA-256 of each top-level entry of ``meta`` (JSON, sorted keys)."""
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in meta.items()}


def _meta_differs(mine: dict[str, str] | None, first: dict[str, str] | None) -> str | None:
    """The error of a rank whose meta is not rank 0's (entries compared by digest), else None."""
    if mine is None or first is None or mine == first:
        return None
    keys = sorted(k for k in set(mine) | set(first) if mine.get(k) != first.get(k))
    return (f"its meta differs from rank 0's in {', '.join(keys)}, and every rank must pass the same meta; fix: "
            "report this bug (the caller builds the meta differently on different ranks)")


def _prepare(save: _Save, state: Mapping[str, Any], meta: dict, rank_state: Mapping[str, Any] | None
             ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, dict[str, Any]] | None]:
    """Phase 1: validate the inputs on every rank (``rank_state`` differs per rank) and check
    that every rank passed rank 0's meta; rank 0 makes the tmp folder. Returns the specs of
    ``state``, the JSON of ``meta`` and the specs of ``rank_state``."""
    error, out, digests = None, None, None
    try:
        out = (fmt.describe_state(state), fmt.meta_to_jsonable(meta),
               None if rank_state is None else fmt.describe_state(rank_state, "rank_state"))
        digests = _digests(out[1])
        if save.comm.rank == 0:
            save.ckdir.mkdir(parents=True, exist_ok=True)
            _remove(save.tmp)  # leftovers of an interrupted attempt at this same step
            save.tmp.mkdir()
    except Exception as exc:  # noqa: BLE001 - reported collectively, re-raised below
        error = error_text(exc)
    gathered = save.comm.allgather((error, digests))
    errors = [e or _meta_differs(d, gathered[0][1]) for e, d in gathered]
    _raise_if_failed(save.comm, errors, save.where, save.fix, save.cleanup)
    assert out is not None
    return out


def _write_shards(save: _Save, state: Mapping[str, Any], keys: list[str], rank_state: Mapping[str, Any] | None,
                  rank_specs: dict[str, dict[str, Any]] | None) -> list[tuple[str, int, dict | None]]:
    """Phase 2: each rank writes its disjoint part (``keys``) and its ``rank_state`` into its
    shard; all agree on success. Returns every shard's (sha256, bytes, rank_state specs)."""
    comm = save.comm
    attrs = {"schema_version": fmt.SCHEMA_VERSION, "step": save.step, "rank": comm.rank, "n_ranks": comm.size}
    error, result = None, None
    try:
        if not save.tmp.is_dir():  # rank 0 made it: this rank's view of run_dir is another folder
            raise CheckpointError(f"rank {comm.rank} on host {socket.gethostname()} does not see {save.tmp}, which "
                                  "rank 0 created: run_dir is not the same folder on every node; fix: put run_dir "
                                  "on a file system shared by all ranks")
        sha, nbytes = fmt.write_shard(save.tmp / fmt.shard_file_name(comm.rank, comm.size), state, keys,
                                      rank_state, attrs)
        result = (sha, nbytes, rank_specs)
    except Exception as exc:  # noqa: BLE001
        error = error_text(exc)
    results = comm.allgather((error, result))
    _raise_if_failed(comm, [e for e, _ in results], save.where, save.fix, save.cleanup)
    return [r for _, r in results]


def _commit(save: _Save, manifest: dict[str, Any] | None, keep: int) -> None:
    """Phase 3: rank 0 checks that it sees every shard, writes the manifest last and commits
    by rename; the broadcast of its verdict releases the other ranks; only then does rank 0
    apply retention (off the ranks' critical path, which a stop signal's time budget also
    counts)."""
    comm, error = save.comm, None
    if comm.rank == 0:
        assert manifest is not None
        try:
            for r, entry in enumerate(manifest["shards"]):
                shard = save.tmp / entry["file"]
                on_disk = shard.stat().st_size if shard.is_file() else None
                if on_disk != entry["bytes"]:  # rank 0 must see what rank r wrote (shared file system)
                    raise CheckpointError(f"rank 0 sees {on_disk} bytes in shard {r}, rank {r} wrote "
                                          f"{entry['bytes']}; fix: put run_dir on a file system shared by all ranks")
            fmt.write_manifest(save.tmp / fmt.MANIFEST_NAME, manifest)
            fmt.fsync_path(save.tmp)
            _commit_folder(save.tmp, save.final, save.step)
        except Exception as exc:  # noqa: BLE001
            error = f"{save.where} failed on rank 0: {error_text(exc)}"
            try:
                save.cleanup()
            except OSError:
                pass
    error = comm.bcast(error, root=0)  # also the barrier: nobody returns before the commit
    if comm.rank == 0 and error is None:
        remember_verified(save.final)
        try:
            _apply_retention(save.ckdir, save.step, keep)
        except Exception as exc:  # noqa: BLE001 - the new checkpoint is safe; cleanup must not stop training
            log.warning("checkpoint retention in %s failed: %s", save.ckdir, exc)
    if error is not None:
        if "; fix:" not in error:
            error += f"; nothing was committed; fix: {save.fix}"
        raise CheckpointError(error, every_rank=True)
