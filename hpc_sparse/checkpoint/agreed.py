"""The collective load a resuming run uses: every rank resumes the same checkpoint, or none.

* **Rank 0 chooses.** It lists the candidates (``--resume auto``: the committed folders,
  newest first) and broadcasts them; a rank never picks a checkpoint on its own.
* **Each shard is hashed once per job.** Shard ``k`` is SHA-256-checked by rank ``k % P``
  only (not by all P ranks); every rank then reads the arrays it needs with a full
  ``check_format``. One ``allgather`` of the error texts makes every rank take the same
  branch: load this candidate, or skip it (auto) / fail (an explicit path).

Takes the communicator as an argument and uses its ``rank``, ``size``, ``allgather`` and
``bcast`` only (this package never imports mpi4py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.checkpoint.discovery import committed_checkpoints
from hpc_sparse.checkpoint.verify import error_text, read_manifest, read_shards


@dataclass
class Loaded:
    """The agreed result of a resume: ``path`` None when no valid checkpoint was found."""

    path: Path | None
    state: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    rank_state: dict[str, Any] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Candidates (newer than ``path``) that failed verification, and why (the same on every rank)."""


def load_agreed(comm: Any, path: Path, expected_step: int | None = None
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Collectively verify and read one checkpoint (every rank calls it with the same path).

    Returns this rank's ``(state, manifest, rank_state)`` (rank_state of shard ``comm.rank``,
    None if the checkpoint has no such shard or no per-rank state). Raises the same
    :class:`CheckpointError` on every rank if any rank found a problem.
    """
    error = None
    state: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    rank_state = None
    try:
        manifest = read_manifest(path)
        if expected_step is not None and manifest["step"] != expected_step:
            raise fmt.invalid(path, f"manifest says step {manifest['step']} but the folder is step {expected_step}")
        mine = {k for k in range(manifest["n_ranks"]) if k % comm.size == comm.rank}
        state, rank_state = read_shards(path, manifest, hashed=mine, deep=True, rank=comm.rank, keep_arrays=True)
    except Exception as exc:  # noqa: BLE001 - every rank learns about it below
        error = error_text(exc)
    failed = [(r, e) for r, e in enumerate(comm.allgather(error)) if e is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        text = failed[0][1]
        if not text.startswith("checkpoint "):
            text = f"checkpoint {path} is invalid: {text}; fix: {fmt.FIX_DELETE}"
        raise fmt.CheckpointError(f"{text} (found by rank {ranks})", every_rank=True)
    return state, manifest, rank_state


def choose_and_load(comm: Any, run_dir: str | Path, resume: str) -> Loaded:
    """The checkpoint a run resumes, chosen by rank 0 and verified collectively.

    Parameters
    ----------
    resume : "auto" or a path
        auto: the newest committed checkpoint of ``run_dir`` that passes verification
        (invalid ones are skipped and reported); a path: that checkpoint, or a
        CheckpointError on every rank.
    """
    if resume == "auto":
        names = [str(p) for _, p in committed_checkpoints(run_dir)] if comm.rank == 0 else None
        candidates = comm.bcast(names, root=0)
    else:
        candidates = [comm.bcast(str(resume) if comm.rank == 0 else None, root=0)]
    skipped: list[tuple[Path, str]] = []
    for name in candidates:
        path = Path(name)
        try:
            expected = fmt.parse_step_dir(path.name) if resume == "auto" else None
            state, manifest, rank_state = load_agreed(comm, path, expected)
        except fmt.CheckpointError as exc:
            if resume != "auto":
                raise
            skipped.append((path, str(exc)))
            continue
        return Loaded(path, state, manifest, rank_state, skipped)
    return Loaded(None, skipped=skipped)
