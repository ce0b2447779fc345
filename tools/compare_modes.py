#!/usr/bin/env python3
"""Compare parallel.mode = sync and wasap on Fashion-MNIST: one JSON line per (mode, ranks).

Each run is the real CLI under mpiexec::

    mpiexec -n P python -m mpi4py -m hpc_sparse train --config configs/fashion-mnist.toml \\
        --set parallel.mode=MODE --set train.epochs=E --run-dir DIR --quiet

and the line is read from the run's summary.json and metrics.jsonl::

    {"mode": "wasap", "ranks": 2, "epochs": 3, "test_accuracy": 0.84, "seconds_per_epoch": 9.1, ...}

``seconds_per_epoch`` is the median of the metrics lines' ``epoch_seconds`` (training,
evolution, evaluation; wasap's last epoch includes the merge): the median, because a first
epoch that has to JIT-compile the kernels (after any edit of ``hpc_sparse/sparse``) can take
tens of seconds; ``mean_seconds_per_epoch`` and ``first_epoch_seconds`` are given too.
``wall_seconds`` is the whole command (start-up, JIT compilation and data loading included).
On a shared machine, run it when nothing else is running: timings follow the load.

    python tools/compare_modes.py [--epochs 3] [--ranks 2,3] [--modes sync,wasap] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc_sparse.runtime.launcher import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion-mnist.toml"
# the paper's Fashion-MNIST setup (PAPER.md §5), used when configs/fashion-mnist.toml is absent
PAPER_SETUP = ['data.name="fashion-mnist"', "model.layers=[784,1000,1000,1000,10]", "model.epsilon=20",
               'model.activation="allrelu"', "model.alpha=0.6", 'model.init="he_uniform"', "model.dropout=0.3",
               "train.lr=0.01", "train.batch_size=128"]


def run_one(mode: str, ranks: int, epochs: int, config: Path | None, extra: list[str], out: Path,
            timeout: float) -> dict:
    run_dir = out / f"{mode}-p{ranks}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = ([] if config else PAPER_SETUP) + [f'parallel.mode="{mode}"', f"train.epochs={epochs}",
                                              "checkpoint.every_seconds=0", *extra]
    cmd = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m",
           "hpc_sparse", "train", *(["--config", str(config)] if config else []),
           *[a for s in sets for a in ("--set", s)], "--run-dir", str(run_dir), "--quiet"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    wall = time.monotonic() - t0
    line: dict = {"mode": mode, "ranks": ranks, "epochs": epochs}
    if proc.returncode != 0:
        return {**line, "error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-1500:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    seconds = [m["epoch_seconds"] for m in metrics]
    return {**line, "test_accuracy": summary["test_accuracy"],
            "seconds_per_epoch": round(statistics.median(seconds), 3),
            "mean_seconds_per_epoch": round(statistics.fmean(seconds), 3),
            "first_epoch_seconds": round(seconds[0], 3),
            "best_test_accuracy": summary.get("best_test_accuracy"),
            "accuracy_per_epoch": [round(m["test_accuracy"], 4) for m in metrics],
            "phases": [m.get("phase", "sync") for m in metrics],
            "wall_seconds": round(wall, 1), "nnz": summary.get("nnz")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="train.epochs of every run (default 3: a quick look)")
    ap.add_argument("--ranks", default="2,3", help="comma-separated rank counts (default 2,3)")
    ap.add_argument("--modes", default="sync,wasap", help="comma-separated modes (default sync,wasap)")
    ap.add_argument("--config", default=str(CONFIG),
                    help="TOML config (default configs/fashion-mnist.toml; if missing, the paper setup as --set)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (repeatable)")
    ap.add_argument("--out-dir", help="keep the runs here (default: a temporary folder, removed afterwards)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before giving up")
    args = ap.parse_args()
    config = Path(args.config) if args.config and Path(args.config).is_file() else None
    if config is None:
        print(f"compare_modes: {args.config} not found; using the paper's Fashion-MNIST setup as --set overrides",
              file=sys.stderr)
    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="compare_modes_"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            for ranks in [int(r) for r in args.ranks.split(",") if r.strip()]:
                print(json.dumps(run_one(mode, ranks, args.epochs, config, args.extra, out, args.timeout)),
                      flush=True)
    finally:
        if not args.out_dir:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
