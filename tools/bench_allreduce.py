"""Scale-out on paper: bytes per sync, the averaging Allreduce at 2 ranks measured here, and an
alpha-beta-gamma prediction at 16, 256 and 4,096 ranks on a 100 Gb/s fabric.

    python tools/bench_allreduce.py [--repeats 15] [--alpha-us 2.0] [--link-gbps 100]

Two networks, built by the product's ``build_model`` from ``configs/fashion-mnist.toml``:
the paper's Fashion-MNIST network (784-1000-1000-1000-10, epsilon 20) and workload D
(784-95000-95000-10, epsilon 20). For each:

- ``bytes_per_sync``: what sync mode averages every ``parallel.sync_every`` steps
  (``SparseMLP.parameter_arrays``: weights, their momentum, biases and theirs, float32);
- ``step_ms``: one ``SparseMLP.train_step`` at batch 128, 1 thread, random inputs (median of
  3 after a warm-up), the compute between syncs is ``sync_every`` of them;
- ``allreduce_ms_p2`` / ``average_ms_p2``: ``mpiexec -n 2``, each rank times the product's
  ``ReplicaAverager.average_`` on its model (the whole call, and the Allreduce inside it),
  medians of ``--repeats`` rounds that alternate the two networks; shared memory, one node;
- ``gamma_ns_per_byte``: a float32 ``a += b`` over the payload here (the reduction's cost);
- ``predicted_ms``: T(P) on a fabric with latency ``--alpha-us`` and ``--link-gbps`` per
  direction, for two allreduce algorithms (n bytes, beta = 8 / link bits/s):

  recursive halving + doubling (Rabenseifner; what MPICH uses for long messages):
      T = 2 log2(P) alpha + 2 (P-1)/P n beta + (P-1)/P n gamma
  ring:
      T = 2 (P-1) alpha + 2 (P-1)/P n beta + (P-1)/P n gamma

  (Thakur, Rabenseifner, Gropp 2005). alpha and beta are assumptions stated in the output,
  not measured: no such fabric here.
- ``global_batch``: 128 x P; ``steps_per_epoch``: ceil(60,000 / global batch);
  ``comm_share``: T / (T + sync_every x step time) with Rabenseifner's T (sync is blocking).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hpc_sparse.runtime.launcher import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = {"fashion-mnist": [784, 1000, 1000, 1000, 10], "D": [784, 95000, 95000, 10]}
RANKS = (16, 256, 4096)
BATCH = 128
N_TRAIN = 60_000  # Fashion-MNIST's training set, the data both networks take (784 inputs)


def build(widths: list[int]):
    from hpc_sparse.config import load_config
    from hpc_sparse.model_builder import build_model

    cfg = load_config(ROOT / "configs" / "fashion-mnist.toml", [f"model.layers={widths}"])
    return cfg, build_model(cfg)


def worker(repeats: int) -> None:
    """One rank: time ReplicaAverager.average_ on both models, interleaved."""
    from mpi4py import MPI

    from hpc_sparse.parallel.averaging import ReplicaAverager

    comm = MPI.COMM_WORLD.Dup()
    models = {name: build(w)[1] for name, w in NETWORKS.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    comm_times: dict[str, list[float]] = {name: [] for name in models}
    averagers = {name: ReplicaAverager(comm) for name in models}
    for r in range(repeats + 1):
        for name, model in models.items():
            avg = averagers[name]
            before = avg.comm_seconds
            comm.Barrier()
            t0 = time.perf_counter()
            avg.average_(model.parameter_arrays())
            if r:  # round 0 warms up buffers and MPI's shared-memory paths
                times[name].append(time.perf_counter() - t0)
                comm_times[name].append(avg.comm_seconds - before)
            time.sleep(0.05)
    out = {name: {"average_ms_p2": 1e3 * statistics.median(times[name]),
                  "allreduce_ms_p2": 1e3 * statistics.median(comm_times[name]),
                  "bytes_per_sync": averagers[name].bytes_per_sync} for name in models}
    slowest = comm.gather(out, root=0)
    if comm.Get_rank() == 0:
        merged = {name: {k: max(o[name][k] for o in slowest) for k in out[name]} for name in out}
        print("RESULT " + json.dumps(merged), flush=True)


def step_ms(model) -> float:
    """Median of 3 ``train_step`` calls at batch 128 after a warm-up (1 thread)."""
    import numpy as np

    from hpc_sparse.sparse import SGD, dropout_key

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, model.widths[0])).astype(np.float32)
    y = rng.integers(0, model.widths[-1], BATCH).astype(np.int32)
    sgd = SGD(0.01, 0.9)
    runs = []
    for k in range(4):
        t0 = time.perf_counter()
        model.train_step(x, y, sgd, dropout_key(0, k, 0, 0))
        if k:
            runs.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(runs)


def gamma_ns_per_byte(n_bytes: int) -> float:
    """Seconds per byte of a float32 in-place sum (the reduction an allreduce does), in ns."""
    import numpy as np

    a = np.ones(n_bytes // 4, np.float32)
    b = np.ones_like(a)
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        np.add(a, b, out=a)
        runs.append(time.perf_counter() - t0)
    return 1e9 * statistics.median(runs) / n_bytes


def predict_ms(p: int, n: int, alpha: float, beta: float, gamma: float, algorithm: str) -> float:
    frac = (p - 1) / p
    latency = 2 * math.log2(p) * alpha if algorithm == "rabenseifner" else 2 * (p - 1) * alpha
    return 1e3 * (latency + 2 * frac * n * beta + frac * n * gamma)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--alpha-us", type=float, default=2.0, help="fabric latency per message (assumed)")
    ap.add_argument("--link-gbps", type=float, default=100.0, help="fabric bandwidth per direction (assumed)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HPC_SPARSE_THREADS", "1")
    if args.worker:
        worker(args.repeats)
        return
    import numba

    numba.set_num_threads(1)
    alpha, beta = args.alpha_us * 1e-6, 8.0 / (args.link_gbps * 1e9)
    nets = {}
    for name, widths in NETWORKS.items():
        cfg, model = build(widths)
        nets[name] = {"widths": widths, "nnz": model.nnz, "step_ms_batch128_1thread": round(step_ms(model), 2),
                      "sync_every": cfg.parallel.sync_every}
        del model
    cmd = [find_mpiexec(), "-n", "2", sys.executable,
           "-m", "mpi4py", __file__, "--worker", "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600,
                          env={**os.environ, "HPC_SPARSE_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"bench_allreduce: the 2-rank run failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for name, net in nets.items():
        n = measured[name]["bytes_per_sync"]
        gamma = gamma_ns_per_byte(n) * 1e-9
        compute = net["sync_every"] * net["step_ms_batch128_1thread"]
        net.update({"bytes_per_sync": n, "allreduce_ms_p2": round(measured[name]["allreduce_ms_p2"], 3),
                    "average_ms_p2": round(measured[name]["average_ms_p2"], 3),
                    "gamma_ns_per_byte": round(gamma * 1e9, 4), "at": {}})
        for p in (2, *RANKS):
            t = predict_ms(p, n, alpha, beta, gamma, "rabenseifner")
            net["at"][str(p)] = {"predicted_ms": round(t, 3),
                                 "predicted_ms_ring": round(predict_ms(p, n, alpha, beta, gamma, "ring"), 3),
                                 "global_batch": BATCH * p, "steps_per_epoch": math.ceil(N_TRAIN / (BATCH * p)),
                                 "comm_share": round(t / (t + compute), 4)}
    print(json.dumps({"benchmark": "allreduce_scale_out", "alpha_us": args.alpha_us, "link_gbps": args.link_gbps,
                      "beta_ns_per_byte": round(beta * 1e9, 4), "repeats": args.repeats, "networks": nets}))


if __name__ == "__main__":
    main()
