"""Finding a run's checkpoints, and moving the ones a run must not resume aside (never deleting).

Discovery only looks at committed folders named ``step-<N:09d>``. A folder that is set
aside is renamed ``step-<N>.<reason>-<UTC time>`` (e.g. ``step-000000400.invalid-20250101T120000Z``):
discovery ignores it from then on, and its files stay as they were for a user to inspect.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from hpc_sparse.checkpoint import format as fmt
from hpc_sparse.checkpoint.verify import read_manifest, verify_committed

log = logging.getLogger(__name__)

SET_ASIDE_REASONS = ("invalid", "abandoned", "replaced")
"""invalid: failed verification when a run resumed past it; abandoned: newer than the step a
run resumed from (another line of the run); replaced: a folder of the same step was committed."""
_SET_ASIDE_RE = re.compile(r"^step-\d{9,}\.(" + "|".join(SET_ASIDE_REASONS) + r")-\d{8}T\d{6}Z(-\d+)?$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Folder that holds all checkpoints of a run: ``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def committed_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every committed ``step-*`` folder, newest first (``.tmp-*`` and
    set-aside folders ignored)."""
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return []
    found = [(fmt.parse_step_dir(p.name), p) for p in ckdir.iterdir()]
    return sorted(((s, p) for s, p in found if s is not None and p.is_dir() and not p.is_symlink()),
                  reverse=True)


def set_aside(path: Path, reason: str) -> Path:
    """Rename the committed folder ``path`` to ``<name>.<reason>-<UTC time>`` (a counter is
    appended if that exists); nothing inside it changes. Returns the new path."""
    if reason not in SET_ASIDE_REASONS:
        raise ValueError(f"reason {reason!r} is not one of {SET_ASIDE_REASONS}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
        n += 1
    os.rename(path, target)
    try:
        fmt.fsync_path(path.parent)
    except OSError as exc:  # renamed already; durability of the rename is best effort
        log.warning("could not fsync %s after renaming %s: %s", path.parent, path.name, exc)
    return target


def set_aside_newer(run_dir: str | Path, step: int, invalid: set[Path]) -> list[tuple[Path, Path]]:
    """Checkpoint lineage: a run that continues from ``step`` sets aside every committed
    checkpoint newer than it (``abandoned``, or ``invalid`` for those in ``invalid``), so
    that ``--resume auto`` never jumps back to the line it left. Returns (old, new) paths."""
    moved = []
    for s, path in committed_checkpoints(run_dir):
        if s > step:
            moved.append((path, set_aside(path, "invalid" if path in invalid else "abandoned")))
    return moved


def find_latest_valid(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Newest committed checkpoint that passes full verification, in one process.

    (A training run chooses collectively instead: :func:`hpc_sparse.checkpoint.agreed.choose_and_load`.)

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
            verify_committed(step, path)
            return path, skipped
        except fmt.CheckpointError as exc:
            skipped.append((path, str(exc)))
    return None, skipped


def folder_bytes(path: Path) -> int:
    """Total size of the regular files in and under ``path`` (symbolic links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def set_aside_folders(run_dir: str | Path) -> list[Path]:
    """Folders that :func:`set_aside` renamed (``step-N.<reason>-<UTC time>``), oldest name first."""
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if _SET_ASIDE_RE.match(p.name) and p.is_dir() and not p.is_symlink())


def temporary_folders(run_dir: str | Path) -> list[Path]:
    """``.tmp-step-*`` folders: saves in progress, or left by a save that was interrupted. Only
    the job that holds the run dir's lock may remove them (no save of another job can be running)."""
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if p.name.startswith(fmt.TMP_PREFIX) and not p.is_symlink())


def list_checkpoints(run_dir: str | Path) -> list[dict]:
    """Every committed checkpoint, oldest first, each fully verified.

    Returns dicts with ``path`` (Path), ``step``, ``epoch``, ``n_ranks`` (None if unreadable),
    ``valid`` (bool), ``reason`` ("" when valid; the environment's error when it could not be
    read) and ``bytes`` (total size of the folder's files).
    """
    rows = []
    for step, path in reversed(committed_checkpoints(run_dir)):
        row: dict[str, Any] = {"path": path, "step": step, "epoch": None, "n_ranks": None,
                               "valid": True, "reason": "", "bytes": folder_bytes(path)}
        try:
            manifest = read_manifest(path)
            row["epoch"], row["n_ranks"] = manifest.get("epoch"), manifest["n_ranks"]
            verify_committed(step, path)
        except (fmt.CheckpointError, fmt.CheckpointEnvironmentError) as exc:
            row["valid"], row["reason"] = False, str(exc)
        rows.append(row)
    return rows
