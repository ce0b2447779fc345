"""Collective save with atomic commit and retention. Nothing committed is ever deleted except
by retention (``keep``); a folder that would be replaced is set aside, renamed.

The communicator is passed in and only used through mpi4py's interface (``rank``, ``size``,
``allgather``, ``bcast``, ``Barrier``); this package never imports mpi4py, so a size-1 stand-in
works too. Weight arrays never travel through MPI here: every rank already holds the full
replica and writes its own part of it straight to HDF5. Only short status tuples (error text,
checksum, size) are exchanged, with the pickle-based lowercase collectives.
"""

from __future__ import annotations

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


def _commit(tmp: Path, final: Path, step: int) -> None:
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
        rs_spec = None if rank_state is None else fmt.describe_rank_state(rank_state)
        if rank == 0:
            ckdir.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # leftovers of an interrupted attempt at this same step
            tmp.mkdir()
    except Exception as exc:  # noqa: BLE001 - reported collectively, re-raised below
        error = error_text(exc)
    _raise_if_failed(comm, comm.allgather(error), where, fix, cleanup)

    # Phase 2: each rank writes its disjoint part, then all agree on success.
    assignment = fmt.assign_keys({k: s["nbytes"] for k, s in specs.items()}, size)
    attrs = {"schema_version": fmt.SCHEMA_VERSION, "step": step, "rank": rank, "n_ranks": size}
    error, result = None, None
    try:
        if not tmp.is_dir():  # rank 0 made it: this rank's view of run_dir is another folder
            raise CheckpointError(f"rank {rank} on host {socket.gethostname()} does not see {tmp}, which rank 0 "
                                  "created: run_dir is not the same folder on every node; fix: put run_dir on a "
                                  "file system shared by all ranks")
        sha, nbytes = fmt.write_shard(tmp / fmt.shard_file_name(rank, size), state, assignment[rank],
                                      rank_state, attrs)
        result = (sha, nbytes, rs_spec)
    except Exception as exc:  # noqa: BLE001
        error = error_text(exc)
    results = comm.allgather((error, result))
    _raise_if_failed(comm, [e for e, _ in results], where, fix, cleanup)

    # Phase 3: rank 0 writes the manifest last and commits by rename; the broadcast releases
    # the other ranks; only then does rank 0 apply retention (off the ranks' critical path,
    # which a stop signal's time budget also counts).
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
            _commit(tmp, final, step)
        except Exception as exc:  # noqa: BLE001
            error = f"{where} failed on rank 0: {error_text(exc)}"
            try:
                cleanup()
            except OSError:
                pass
    error = comm.bcast(error, root=0)  # also the barrier: nobody returns before the commit
    if rank == 0 and error is None:
        remember_verified(final)
        try:
            _apply_retention(ckdir, step, keep)
        except Exception as exc:  # noqa: BLE001 - the new checkpoint is safe; cleanup must not stop training
            log.warning("checkpoint retention in %s failed: %s", ckdir, exc)
    if error is not None:
        if "; fix:" not in error:
            error += f"; nothing was committed; fix: {fix}"
        raise CheckpointError(error, every_rank=True)
    return final
