"""Train steps of a very large truly sparse network and report its size, speed and memory.

The default is 784-2M-2M-2M-2M-2M-10 (10 M hidden neurons, 200 M connections) at epsilon
10, batch 64, on the 2-core, 24 GiB machine, trained with float32 and then with bfloat16
activations (``train.activation_dtype``): one JSON line per dtype, each with the peak RSS of
its own phase (the kernel's peak-RSS counter is reset in between, where Linux allows it). A
dense version would need ~64 TB of float32 weights alone. ``x_traffic_bound`` compares the step with its traffic bound: the DRAM bytes no
execution of the step can avoid, at the fastest memory bandwidth measured in the same run
(``_bench_common.step_bound_bytes`` says which bytes and why).

    python tools/bench_largest.py
    python tools/bench_largest.py --widths 784,4000000,4000000,10 --epsilon 10 --batch 64 --steps 5
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
    ap.add_argument("--widths", default="784,2000000,2000000,2000000,2000000,2000000,10")
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=0, help="0 = all")
    ap.add_argument("--activation-dtypes", default="float32,bfloat16",
                    help="comma list of train.activation_dtype values, timed one after the other on the same network")
    args = ap.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    threads = args.threads or bc.max_threads()
    bc.set_threads(threads)

    from hpc_sparse.sparse import SGD, dropout_key
    from hpc_sparse.sparse.blocking import last_level_cache_bytes
    from hpc_sparse.sparse.profile import PhaseTimer

    machine = bc.machine_bound(threads)
    bc.set_threads(threads)

    base = bc.rss_bytes()
    t0 = time.perf_counter()
    model = bc.build_mlp(widths, args.epsilon, seed=0, dropout=args.dropout)
    build_s = time.perf_counter() - t0
    gc.collect()
    model_rss = bc.rss_bytes()
    ms_by_dtype: dict[str, float] = {}
    for dt in [d.strip() for d in args.activation_dtypes.split(",")]:
        model.set_activation_dtype(dt)  # drops the other dtype's buffers
        gc.collect()
        peak_reset = bc.reset_peak_rss()  # this dtype's peak, not the previous one's
        rng = np.random.default_rng(0)
        sgd = SGD(0.01, 0.9)
        times, losses = [], []
        for s in range(args.steps):
            x = rng.standard_normal((args.batch, widths[0]), dtype=np.float32)
            y = rng.integers(0, widths[-1], args.batch).astype(np.int64)
            t1 = time.perf_counter()
            r = model.train_step(x, y, sgd, dropout_key(0, s, 0, 0))
            times.append(time.perf_counter() - t1)
            losses.append(r.loss_sum / r.count)
        peak = bc.vm_hwm_bytes() if peak_reset else bc.peak_rss_bytes()
        timer = PhaseTimer()
        model.profile = timer
        model.train_step(x, y, sgd, dropout_key(0, args.steps, 0, 0))
        model.profile = None
        weights_dense = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        cache = last_level_cache_bytes()
        bound_bytes = bc.model_bound_bytes(model, args.batch, act_bytes=2 if dt == "bfloat16" else 4)
        ms = 1e3 * float(np.median(times[1:] if len(times) > 2 else times))
        ms_by_dtype[dt] = ms
        bound_ms = 1e3 * bound_bytes / (machine["bound_GBps"] * 1e9)
        plans = model.blocking_plans(args.batch)
        rec = {
            "bench": "largest", "widths": widths, "epsilon": args.epsilon, "batch": args.batch, "steps": args.steps,
            "threads": threads, "dropout": args.dropout, "activation_dtype": dt,
            "hidden_neurons": int(sum(widths[1:-1])), "nnz": model.nnz,
            "ms_per_step": ms,
            "ms_first_step": 1e3 * times[0],
            "samples_per_second": args.batch / (ms / 1e3),
            "traffic_bound_ms": bound_ms, "x_traffic_bound": (ms / bound_ms) if bound_ms > 0 else None,
            "bound_bytes": bound_bytes, "bound_GBps": machine["bound_GBps"],
            "bound_cache_bytes": bc.onchip_cache_bytes(),
            "stream_triad_GBps": machine["stream_triad_GBps"], "llc_bytes": cache,
            "blocking": [p.describe(args.batch) for p in plans],
            "predicted_bytes": sum(p.stream_bytes for p in plans),
            "predicted_ms": 1e3 * sum(p.seconds for p in plans) / threads,
            "phase_ms_one_step": {k: round(1e3 * v, 1) for k, v in timer.by_kind().items()},
            "peak_rss_bytes": peak, "baseline_rss_bytes": base, "model_rss_bytes": model_rss,
            "peak_rss_is_this_dtype_only": peak_reset,
            "bytes_per_nnz": (peak - base) / model.nnz,
            "build_seconds": build_s,
            "loss_first": losses[0], "loss_last": losses[-1], "finite": bool(np.all(np.isfinite(losses))),
            "dense_weight_bytes": 4 * weights_dense,
            "machine_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        }
        if dt != "float32" and "float32" in ms_by_dtype:
            rec["speedup_vs_float32"] = ms_by_dtype["float32"] / ms
        bc.emit(rec)
        gc.collect()


if __name__ == "__main__":
    main()
