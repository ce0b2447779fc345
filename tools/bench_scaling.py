#!/usr/bin/env python3
"""Data-parallel scaling on this machine: samples/s at P=1 and P=2 (one thread per rank), and
P=1 with two threads, for the paper's Fashion-MNIST setup (or a synthetic stand-in of the same
shape when the data is absent). Prints one JSON line.

    python tools/bench_scaling.py [--epochs 3] [--config configs/fashion-mnist.toml]

Figures are from the last epoch of each run (the first carries start-up costs): the training
throughput (forward, backward, update and sync; not evaluation or evolution) and the share of
training time spent in the weight-averaging Allreduce (including waiting for the slower rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, threads: int, config: str, epochs: int, extra: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"scaling_p{ranks}_t{threads}_"))
    cmd = [str(Path(sys.executable).with_name("mpiexec")) if Path(sys.executable).with_name("mpiexec").exists()
           else shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m",
           "hpc_sparse", "train", "--config", config, "--run-dir", str(run_dir), "--quiet",
           "--set", f"train.epochs={epochs}", "--set", f"train.threads={threads}",
           "--set", "checkpoint.at_end=false", "--set", "checkpoint.every_seconds=0", *extra]
    env = {**os.environ, "NUMBA_NUM_THREADS": str(max(threads, 1))}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    shutil.rmtree(run_dir, ignore_errors=True)
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "fashion-mnist.toml"))
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    extra: list[str] = []
    dataset = "fashion-mnist"
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and "fashion" in args.config:
        dataset = "synthetic stand-in 60000x784, 10 classes"
        extra = ["--set", "data.name=\"synthetic\"", "--set", "data.n_train=60000", "--set", "data.n_test=10000",
                 "--set", "data.n_features=784", "--set", "data.n_classes=10"]
    p1 = run(1, 1, args.config, args.epochs, extra)
    p2 = run(2, 1, args.config, args.epochs, extra)
    p1t2 = run(1, 2, args.config, args.epochs, extra)
    print(json.dumps({
        "benchmark": "scaling", "dataset": dataset, "config": os.path.relpath(args.config, ROOT),
        "samples_per_second_p1": round(p1["samples_per_second"], 1),
        "samples_per_second_p2": round(p2["samples_per_second"], 1),
        "samples_per_second_p1_2threads": round(p1t2["samples_per_second"], 1),
        "speedup": round(p2["samples_per_second"] / p1["samples_per_second"], 3),
        "speedup_2threads": round(p1t2["samples_per_second"] / p1["samples_per_second"], 3),
        "comm_share": round(p2["comm_share"], 4),
        "bytes_per_sync": p2["bytes_per_sync"],
        "test_accuracy_p1": p1["test_accuracy"], "test_accuracy_p2": p2["test_accuracy"],
        "epochs": args.epochs,
    }))


if __name__ == "__main__":
    main()
