"""The collective load a resuming run uses: every rank resumes the same checkpoint, or none.

* **Rank 0 chooses.** It lists the candidates (``--resume auto``: the committed folders,
  newest first) and broadcasts them; a rank never picks a checkpoint on its own.
* **Hashes before parsing.** Shard ``k`` is SHA-256-checked by rank ``k % P`` only (not by
  all P ranks), and the ranks exchange these verdicts *before* any rank hands a shard to
  HDF5's parser: damaged metadata reaches no parser, so a crash of the C library cannot end
  the job where an older checkpoint would do. Then every rank reads the arrays it needs.
* **Verdicts are agreed.** One ``allgather`` after each of the two phases makes every rank
  take the same branch: load this candidate, or skip it (auto) / fail (an explicit path).
  Only a verdict on the checkpoint's content (manifest, size, hash, format: a
  CheckpointError) skips it; an error of the environment on any rank (EIO, ESTALE, EACCES,
  an HDF5 lock, out of memory) raises CheckpointEnvironmentError on every rank instead, and
  the caller stops: a checkpoint it could not read is neither skipped nor set aside.

Takes the communicator as an argument and uses its ``rank``, ``size``, ``allgather`` and
``bcast`` only (this package never imports mpi4py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.checkpoint.discovery import checkpoint_dir, committed_checkpoints
from hpc_sparse.checkpoint.manager import remember_verified
from hpc_sparse.checkpoint.verify import check_shards, error_text, parse_shards, read_manifest

ManifestCheck = Callable[[Path, dict[str, Any]], None]
"""Called with (path, manifest) on every rank before any shard is read; raises CheckpointError
when the manifest's ``meta`` is not what the caller can resume (a content verdict)."""


@dataclass
class Loaded:
    """The agreed result of a resume: ``path`` None when no valid checkpoint was found."""

    path: Path | None
    state: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    rank_state: dict[str, Any] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Candidates (newer than ``path``) that failed verification, and why (the same on every rank)."""


def _verdict(exc: BaseException) -> tuple[str, str]:
    """("content" | "environment", one line) for an exception while loading."""
    if isinstance(exc, fmt.CheckpointError):
        return "content", error_text(exc)
    if isinstance(exc, fmt.CheckpointEnvironmentError):
        return "environment", error_text(exc)
    if fmt.is_environment_error(exc):
        return "environment", error_text(fmt.environment_error(exc, getattr(exc, "filename", None) or "?"))
    # Anything else is not a verdict on the checkpoint either (a bug, an unexpected library
    # error): stop rather than set aside a checkpoint that may be fine.
    return "environment", (f"unexpected {type(exc).__name__} while loading a checkpoint ({error_text(exc)}); "
                           "the checkpoint is left as it is; fix: report this error with the checkpoint")


def _agree(comm: Any, path: Path, verdict: tuple[str, str] | None) -> None:
    """Every rank raises the same error if any rank had one (environment errors first)."""
    gathered = [(r, v) for r, v in enumerate(comm.allgather(verdict)) if v is not None]
    if not gathered:
        return
    env = [(r, text) for r, (kind, text) in gathered if kind == "environment"]
    failed = env or [(r, text) for r, (_, text) in gathered]
    ranks = ", ".join(str(r) for r, _ in failed)
    text = failed[0][1]
    if env:
        raise fmt.CheckpointEnvironmentError(f"{text} (on rank {ranks})", every_rank=True)
    if not text.startswith("checkpoint "):
        text = f"checkpoint {path} is invalid: {text}; fix: {fmt.FIX_DELETE}"
    raise fmt.CheckpointError(f"{text} (found by rank {ranks})", every_rank=True)


def load_agreed(comm: Any, path: Path, expected_step: int | None = None, check: ManifestCheck | None = None,
                rank_state_of: int | None = None
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Collectively verify and read one checkpoint (every rank calls it with the same path).

    Returns this rank's ``(state, manifest, rank_state)``: rank_state of shard
    ``rank_state_of`` (default: this rank's), None if the checkpoint has no such shard or no
    per-rank state. Raises the same :class:`CheckpointError` (a content verdict) or
    :class:`CheckpointEnvironmentError` on every rank if any rank found a problem.
    """
    verdict = None
    manifest: dict[str, Any] = {}
    try:
        manifest = read_manifest(path)
        if expected_step is not None and manifest["step"] != expected_step:
            raise fmt.invalid(path, f"manifest says step {manifest['step']} but the folder is step {expected_step}")
        if check is not None:
            check(path, manifest)
        check_shards(path, manifest, hashed=(k for k in range(manifest["n_ranks"]) if k % comm.size == comm.rank))
    except BaseException as exc:  # noqa: BLE001 - every rank learns about it below
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        verdict = _verdict(exc)
    _agree(comm, path, verdict)  # no rank parses a shard before every hash has passed

    state: dict[str, Any] = {}
    rank_state = None
    mine = comm.rank if rank_state_of is None else rank_state_of
    try:
        state, rank_state = parse_shards(path, manifest, rank=mine, keep_arrays=True)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        verdict = _verdict(exc)
    _agree(comm, path, verdict)
    remember_verified(path)
    return state, manifest, rank_state


def choose_and_load(comm: Any, run_dir: str | Path, resume: str, check: ManifestCheck | None = None,
                    rank_state_of: int | None = None) -> Loaded:
    """The checkpoint a run resumes (or a command reads), chosen by rank 0 and verified collectively.

    Parameters
    ----------
    resume : "auto" or a path
        auto: the newest committed checkpoint of ``run_dir`` that passes verification
        (invalid ones are skipped and reported); a path: that checkpoint, or a
        CheckpointError on every rank.
    check, rank_state_of
        See :func:`load_agreed`.

    Raises CheckpointEnvironmentError on every rank if a candidate could not be read: the
    search stops there instead of skipping to an older checkpoint.
    """
    if resume == "auto":
        listing: tuple[str, Any] | None = None
        if comm.rank == 0:
            try:
                listing = ("ok", [str(p) for _, p in committed_checkpoints(run_dir)])
            except OSError as exc:
                listing = ("error", error_text(fmt.reading_failed(exc, checkpoint_dir(run_dir))))
        kind, candidates = comm.bcast(listing, root=0)
        if kind == "error":
            raise fmt.CheckpointEnvironmentError(candidates, every_rank=True)
    else:
        candidates = [comm.bcast(str(resume) if comm.rank == 0 else None, root=0)]
    skipped: list[tuple[Path, str]] = []
    for name in candidates:
        path = Path(name)
        try:
            expected = fmt.parse_step_dir(path.name) if resume == "auto" else None
            state, manifest, rank_state = load_agreed(comm, path, expected, check, rank_state_of)
        except fmt.CheckpointError as exc:
            if resume != "auto":
                raise
            skipped.append((path, str(exc)))
            continue
        return Loaded(path, state, manifest, rank_state, skipped)
    return Loaded(None, skipped=skipped)
