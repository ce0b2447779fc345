#!/usr/bin/env python3
"""Data-parallel scaling on this machine: samples/s at P=1 and P=2 (one thread per rank), and
P=1 with two threads, for the paper's Fashion-MNIST setup (or a synthetic stand-in of the same
shape when the data is absent). Prints one JSON line.

    python tools/bench_scaling.py [--epochs 14] [--repeats 3] [--config configs/fashion-mnist.toml]

The runs are interleaved (P=1, P=2, P=1 with 2 threads; ``--repeats`` times), so a change in
the machine's load hits all of them alike. Each run's figures cover its epochs after the first
(the first carries start-up costs), a window of at least ``--min-seconds`` of training: the
training throughput (forward, backward, update and sync; not evaluation or evolution) and the
share of training time spent in the weight-averaging Allreduce (including waiting for the
slower rank). ``speedup`` is the median over the repeats of P=2 over the P=1 run of the same
repeat, with its spread (``speedup_min``, ``speedup_max``).
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
from pathlib import Path

from hpc_sparse.runtime.launcher import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, threads: int, config: str, epochs: int, extra: list[str]) -> dict:
    """One training run; its throughput and communication share over epochs 2..E."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"scaling_p{ranks}_t{threads}_"))
    cmd = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m",
           "hpc_sparse", "train", "--config", config, "--run-dir", str(run_dir), "--quiet",
           "--set", f"train.epochs={epochs}", "--set", f"train.threads={threads}",
           "--set", "checkpoint.at_end=false", "--set", "checkpoint.every_seconds=0", *extra]
    env = {**os.environ, "NUMBA_NUM_THREADS": str(max(threads, 1))}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = sum(r["train_seconds"] for r in recs)
    samples = sum(r["samples_per_second"] * r["train_seconds"] for r in recs)
    return {"samples_per_second": samples / seconds, "train_seconds": seconds,
            "comm_share": sum(r["comm_share"] * r["train_seconds"] for r in recs) / seconds,
            "bytes_per_sync": recs[-1]["bytes_per_sync"], "test_accuracy": recs[-1]["test_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "fashion-mnist.toml"))
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=10.0, help="shortest training window per run")
    args = ap.parse_args()
    extra: list[str] = []
    dataset = "fashion-mnist"
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and "fashion" in args.config:
        dataset = "synthetic stand-in 60000x784, 10 classes"
        extra = ["--set", "data.name=\"synthetic\"", "--set", "data.n_train=60000", "--set", "data.n_test=10000",
                 "--set", "data.n_features=784", "--set", "data.n_classes=10"]
    p1s, p2s, p1t2s = [], [], []
    for _ in range(args.repeats):
        p1s.append(run(1, 1, args.config, args.epochs, extra))
        p2s.append(run(2, 1, args.config, args.epochs, extra))
        p1t2s.append(run(1, 2, args.config, args.epochs, extra))
    short = min(r["train_seconds"] for r in p1s + p2s + p1t2s)
    speedups = [b["samples_per_second"] / a["samples_per_second"] for a, b in zip(p1s, p2s)]
    speedups_t2 = [b["samples_per_second"] / a["samples_per_second"] for a, b in zip(p1s, p1t2s)]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    rec = {
        "benchmark": "scaling", "dataset": dataset, "config": os.path.relpath(args.config, ROOT),
        "samples_per_second_p1": round(med(p1s, "samples_per_second"), 1),
        "samples_per_second_p2": round(med(p2s, "samples_per_second"), 1),
        "samples_per_second_p1_2threads": round(med(p1t2s, "samples_per_second"), 1),
        "speedup": round(statistics.median(speedups), 3),
        "speedup_min": round(min(speedups), 3), "speedup_max": round(max(speedups), 3),
        "speedup_2threads": round(statistics.median(speedups_t2), 3),
        "comm_share": round(med(p2s, "comm_share"), 4),
        "bytes_per_sync": p2s[-1]["bytes_per_sync"],
        "test_accuracy_p1": p1s[-1]["test_accuracy"], "test_accuracy_p2": p2s[-1]["test_accuracy"],
        "epochs": args.epochs, "repeats": args.repeats, "shortest_window_seconds": round(short, 2),
    }
    if short < args.min_seconds:
        rec["warning"] = f"a run trained for only {short:.1f}s (< {args.min_seconds}s); raise --epochs"
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
