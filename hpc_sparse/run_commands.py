"""The commands that look at a run dir rather than train in it: the checkpoint load of
``evaluate`` and ``info``, ``info`` itself and ``clean``.

* Loading uses the rank-agreed loader of a resume (rank 0 chooses; every shard hashed once
  per job; the same checkpoint on every rank even while a save is committing).
* ``info`` lists the committed checkpoints (each verified), the folders set aside and the
  temporary ones with their sizes, and who holds the run dir's lock.
* ``clean`` removes the set-aside and temporary folders, never a committed checkpoint: it
  lists them first, removes only with ``--yes``, and only while it holds the run dir's lock
  (so never under a running job).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from hpc_sparse.errors import UserError

SUMMARY_MAX_BYTES = 1 << 20


def load_run(comm: Any, run_dir: Path, checkpoint: str | None) -> tuple[Any, Any, dict[str, Any], Path]:
    """``(config, model, manifest, path)`` of ``checkpoint`` or of the run's newest valid
    checkpoint, chosen by rank 0 and verified collectively; a checkpoint of per-rank models
    (WASAP-SGD's local phase) gives rank 0's model on every rank. Collective; a user error on
    any rank is raised on every rank."""
    from hpc_sparse.checkpoint import choose_and_load
    from hpc_sparse.config import config_from_dict
    from hpc_sparse.engine.failure import agreed
    from hpc_sparse.engine.resume import check_meta, checkpoint_model

    if not checkpoint and not comm.bcast(run_dir.is_dir() if comm.Get_rank() == 0 else None, root=0):
        raise UserError(f"run dir '{run_dir}' does not exist; fix: pass the --run-dir of a training run",
                        every_rank=True)
    loaded = choose_and_load(comm, run_dir, checkpoint or "auto", check=check_meta, rank_state_of=0)
    if loaded.path is None:
        raise UserError(f"no valid checkpoint in '{run_dir}'; fix: train with checkpoint.at_end=true "
                        "(the default) or pass --checkpoint", every_rank=True)
    path, manifest = loaded.path, loaded.manifest
    if not loaded.state and comm.Get_rank() == 0:
        print(f"note: {path} holds one model per rank (WASAP-SGD's local phase); this is rank 0's", file=sys.stderr)

    def build() -> tuple[Any, Any]:
        cfg = config_from_dict(manifest["meta"]["config"])
        return cfg, checkpoint_model(cfg, loaded.state, loaded.rank_state, str(path))

    cfg, model = agreed(comm, build)
    return cfg, model, manifest, path


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def leftovers(run_dir: Path) -> list[tuple[Path, int, str]]:
    """``(folder, bytes, what)`` of every set-aside and temporary checkpoint folder."""
    from hpc_sparse.checkpoint import folder_bytes, set_aside_folders, temporary_folders

    rows = [(p, folder_bytes(p), "set aside") for p in set_aside_folders(run_dir)]
    return rows + [(p, folder_bytes(p), "temporary") for p in temporary_folders(run_dir)]


def describe_lock(run_dir: Path) -> str:
    """One line on the run dir's lock: free, or held by whom (and whether that job is gone)."""
    from hpc_sparse.runtime.run_lock import LOCK_NAME, judge, read_holder, this_process

    try:
        holder, age = read_holder(run_dir / LOCK_NAME)
    except OSError as exc:
        return f"lock: {run_dir / LOCK_NAME} cannot be read ({exc})"
    if age is None:
        return "lock: free"
    if holder is None:
        return f"lock: {run_dir / LOCK_NAME} is unreadable"
    verdict, why = judge(holder, this_process())
    state = {"alive": "in use", "gone": "stale, the next job takes it over", "undecided": "cannot be checked here"}
    return f"lock: held by {holder.describe()} ({state[verdict]}: {why})"


def info(comm: Any, run_dir: Path) -> int:
    """``hpc-sparse info``: checkpoints, set-aside and temporary folders, lock, model, summary."""
    from hpc_sparse.checkpoint import list_checkpoints

    rank0 = comm.Get_rank() == 0
    if not comm.bcast(run_dir.is_dir() if rank0 else None, root=0):
        raise UserError(f"run dir '{run_dir}' does not exist; fix: pass the --run-dir of a training run",
                        every_rank=True)
    any_valid = None
    if rank0:
        checkpoints = list_checkpoints(run_dir)
        print(f"run dir: {run_dir}")
        print(describe_lock(run_dir))
        print("checkpoints:" if checkpoints else "checkpoints: none")
        for c in checkpoints:
            state = "valid" if c["valid"] else f"INVALID ({c['reason']})"
            print(f"  {Path(c['path']).name}  step {c['step']}  epoch {c['epoch']}  ranks {c['n_ranks']}  "
                  f"{_mb(c['bytes'])}  {state}")
        rows = leftovers(run_dir)
        if rows:
            print(f"set aside and temporary: {len(rows)} folder(s), {_mb(sum(b for _, b, _ in rows))} "
                  f"(`hpc-sparse clean --run-dir {run_dir}` lists and removes them)")
            for path, nbytes, what in rows:
                print(f"  {path.name}  {_mb(nbytes)}  {what}")
        any_valid = any(c["valid"] for c in checkpoints)
    if comm.bcast(any_valid, root=0):
        cfg, model, manifest, path = load_run(comm, run_dir, None)
        if rank0:
            _print_model(cfg, model, path)
    summary = run_dir / "summary.json"
    if rank0 and summary.is_file():
        try:
            if summary.stat().st_size > SUMMARY_MAX_BYTES:
                raise ValueError(f"more than {SUMMARY_MAX_BYTES} bytes")
            s = json.loads(summary.read_text())
            print(f"summary: test_accuracy {s.get('test_accuracy')} after {s.get('epochs_completed')} epochs; "
                  f"model_sha256 {s.get('model_sha256')}")
        except (OSError, ValueError, AttributeError, RecursionError) as exc:
            print(f"summary: {summary} is unreadable ({type(exc).__name__}: {exc})")
    return 0


def _print_model(cfg: Any, model: Any, path: Path) -> None:
    from hpc_sparse.model_builder import describe_structure

    print(f"model (from {path.name}):")
    print(f"  {'layer':>5} {'n_in':>10} {'n_out':>10} {'nnz':>12} {'density':>10}")
    for l, layer in enumerate(model.layers):
        n_in, n_out = layer.shape
        print(f"  {l:>5} {n_in:>10,} {n_out:>10,} {layer.nnz:>12,} {layer.nnz / (n_in * n_out):>10.5f}")
    print(f"  widths {list(model.widths)}; hidden neurons {model.hidden_neurons:,}; nnz {model.nnz:,}")
    print(f"  model_sha256 {model.sha256()}")
    print("\n".join(describe_structure(cfg, model)) or "structure: unstructured")
    print(f"config: {json.dumps(cfg.to_dict(), sort_keys=True)}")


def clean(run_dir: Path, yes: bool) -> int:
    """``hpc-sparse clean``: list the set-aside and temporary folders; with ``yes``, remove
    them while holding the run dir's lock. Committed checkpoints are never touched. One process."""
    from hpc_sparse.runtime.run_lock import acquire

    if not run_dir.is_dir():
        raise UserError(f"run dir '{run_dir}' does not exist; fix: pass the --run-dir of a training run")
    rows = leftovers(run_dir)
    if not rows:
        print(f"nothing to clean in {run_dir}: no set-aside or temporary checkpoint folders")
        return 0
    for path, nbytes, what in rows:
        print(f"  {path.name}  {_mb(nbytes)}  {what}")
    total = _mb(sum(b for _, b, _ in rows))
    if not yes:
        print(f"{len(rows)} folder(s), {total}; nothing removed: run again with --yes to remove them "
              "(committed checkpoints are never touched)")
        return 0
    lock, note = acquire(run_dir, command="hpc-sparse clean")
    try:
        if note:
            print(note)
        again = leftovers(run_dir)  # listed again, under the lock
        for path, _, _ in again:
            shutil.rmtree(path)
        print(f"removed {len(again)} folder(s), {_mb(sum(b for _, b, _ in again))}")
    finally:
        lock.release()
    return 0
