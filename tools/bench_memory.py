"""Memory per stored weight of a large truly sparse network, optimizer included.

Builds a network with at least 50 M nnz through the real construction path
(Erdős–Rényi layers -> SparseLinear), trains a few SGD steps (momentum touched, so every
page of it is resident), and reports the peak RSS above the baseline taken before
building (after the kernels are compiled on a tiny model), divided by nnz. The peak
includes construction transients and the activation buffers of the batch; both are
also reported separately. ``dense_bytes`` is what the same network's dense float32
weights alone would need.

    python tools/bench_memory.py                     # 784-50000-50000-50000-10, epsilon 250
    python tools/bench_memory.py --widths 784,100000,100000,10 --epsilon 250 --batch 16
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="784,50000,50000,50000,10")
    ap.add_argument("--epsilon", type=float, default=250.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = all")
    args = ap.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    threads = args.threads or bc.max_threads()
    bc.set_threads(threads)

    from hpc_sparse.sparse import SGD, dropout_key

    # compile every kernel on a tiny model so JIT memory is not counted
    tiny = bc.build_mlp([20, 30, 30, 5], 5.0)
    xt = np.zeros((4, 20), np.float32)
    tiny.train_step(xt, np.zeros(4, np.int64), SGD(), dropout_key(0, 0, 0, 0))
    del tiny
    gc.collect()

    base = bc.rss_bytes()
    reset_ok = bc.reset_peak_rss()
    t0 = time.perf_counter()
    model = bc.build_mlp(widths, args.epsilon, seed=0)
    build_s = time.perf_counter() - t0
    gc.collect()
    after_build = bc.rss_bytes()
    nnz = model.nnz
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], args.batch).astype(np.int64)
    sgd = SGD(0.01, 0.9)
    times = []
    for s in range(args.steps):
        t1 = time.perf_counter()
        model.train_step(x, y, sgd, dropout_key(0, s, 0, 0))
        times.append(time.perf_counter() - t1)
    gc.collect()
    peak = bc.vm_hwm_bytes() if reset_ok else bc.peak_rss_bytes()
    held = bc.rss_bytes()
    act_bytes = model._bufs(args.batch).nbytes()  # activations, deltas, sign bits, logits, kernel scratch
    weights_dense = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    plans = model.blocking_plans(args.batch)
    arrays = sum(l.weight.data.nbytes + l.weight.indices.nbytes + l.weight.indptr.nbytes + l.w_velocity.nbytes
                 + 2 * l.bias.nbytes
                 + sum(a.nbytes for j in {p.forward_blocks, p.n_blocks} for a in l.part_index(j, threads))
                 for l, p in zip(model.layers, plans))
    bc.emit({
        "bench": "memory", "widths": widths, "epsilon": args.epsilon, "batch": args.batch, "threads": threads,
        "nnz": nnz,
        "bytes_per_nnz": (peak - base) / nnz,
        "held_bytes_per_nnz_after_training": (held - base) / nnz,
        "model_array_bytes_per_nnz": arrays / nnz,
        "activation_buffer_bytes": act_bytes,
        "peak_rss_above_baseline_bytes": peak - base,
        "rss_after_build_bytes_per_nnz": (after_build - base) / nnz,
        "baseline_rss_bytes": base, "peak_rss_bytes": peak,
        "peak_measure": "VmHWM after clear_refs" if reset_ok else "ru_maxrss",
        "dense_bytes": 4 * weights_dense,
        "dense_bytes_with_momentum": 8 * weights_dense,
        "build_seconds": build_s, "ms_per_step": 1e3 * float(np.median(times)),
        "target_bytes_per_nnz": 24,
    })


if __name__ == "__main__":
    main()
