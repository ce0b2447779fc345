"""Cost per connection as layers widen: one training step of 784-W-W-10 (epsilon 20) per width.

Every width's network is built first, once per activation dtype (``train.activation_dtype``,
float32 and bfloat16 by default), and their steps (and a STREAM triad pass) are timed in
interleaved rounds, so the ratios between widths and dtypes come from the same stretch of time.
Prints one JSON line per width and dtype with ``width``, ``activation_dtype``, ``nnz``, ``batch``,
``threads``,
``ms_per_step`` (median of ``SparseMLP.train_step``), ``ns_per_connection``
(``ms * threads * 1e6 / (nnz * batch)``: the time one thread spends per stored weight and
sample), ``cost_growth`` (``ns_per_connection`` over the 1000-wide line of the same run and dtype),
``speedup_vs_float32`` on bfloat16 lines,
``traffic_bound_ms`` and ``x_traffic_bound`` (``ms_per_step / traffic_bound_ms``), plus the
blocking the product chose, what its traffic model predicts for that plan (``predicted_bytes``:
sequential DRAM bytes, ``predicted_row_bytes``: bytes of rows touched at random,
``predicted_ms``: its time estimate, per thread divided by the thread count; see
``hpc_sparse/sparse/blocking.py``) and the phase breakdown.

The traffic bound is a lower bound on the time of the step: the DRAM bytes that no execution
of the step can avoid (compulsory traffic given every cache of the machine), at the fastest
memory bandwidth measured in the same run (read-only and triad passes timed in the same
interleaved rounds as the steps). The bytes it counts and why none can be avoided are written
out in ``_bench_common.step_bound_bytes``. Where a step's data fit in the caches nothing is
compulsory: ``traffic_bound_ms`` is 0 and ``x_traffic_bound`` null. The gap above 1 is what the
kernels spend beyond compulsory DRAM traffic: compute, cache traffic, latency, and the
re-streaming their blocking plan chooses.

    python tools/bench_width.py                       # W in 1000,10000,30000,95000,300000,1000000
    python tools/bench_width.py --widths 1000,95000 --threads 2 --repeats 5
    python tools/bench_width.py > width.jsonl && python tools/bench_width.py --plot docs/width.png --from width.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402

MEMORY_LIMIT_FRACTION = 0.6  # of RAM, for the model plus activation buffers


def step_bytes_estimate(widths: list[int], nnz: int, batch: int) -> int:
    """Model arrays (12 B/nnz) plus activation buffers (13 B per neuron and sample)."""
    return 12 * nnz + 13 * sum(widths) * batch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="1000,10000,30000,95000,300000,1000000")
    ap.add_argument("--epsilon", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=0, help="timed steps per width (0: by size, >= 3)")
    ap.add_argument("--activation-dtypes", default="float32,bfloat16",
                    help="comma list of train.activation_dtype values; each width is timed with each, interleaved")
    ap.add_argument("--plot", default=None, help="draw ns_per_connection against width into this PNG")
    ap.add_argument("--from", dest="from_jsonl", default=None,
                    help="with --plot: draw the lines of this earlier run's output instead of measuring")
    args = ap.parse_args(argv)
    if args.from_jsonl:
        if not args.plot:
            ap.error("--from needs --plot")
        with open(args.from_jsonl) as f:
            plot(json_lines(f), args.plot)
        return
    threads = min(args.threads, bc.max_threads())
    from hpc_sparse.sparse import SGD, dropout_key
    from hpc_sparse.sparse.blocking import last_level_cache_bytes
    from hpc_sparse.sparse.profile import PhaseTimer

    bc.set_threads(threads)
    cache = last_level_cache_bytes()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = MEMORY_LIMIT_FRACTION * ram
    dtypes = [d.strip() for d in args.activation_dtypes.split(",")]
    runs = []  # every width's models are built first, so their steps can be timed in interleaved rounds
    for w in [int(x) for x in args.widths.split(",")]:
        widths = [784, w, w, 10]
        batch = args.batch
        est_nnz = int(args.epsilon * (784 + 2 * w + w)) + 10 * w
        note = None
        while len(dtypes) * step_bytes_estimate(widths, est_nnz, batch) > budget and batch > 16:
            batch //= 2
            note = f"batch lowered from {args.batch} to {batch} to fit in {ram / 2**30:.0f} GiB of RAM"
        budget -= len(dtypes) * step_bytes_estimate(widths, est_nnz, batch)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 784), dtype=np.float32)
        y = rng.integers(0, 10, batch).astype(np.int64)
        for dt in dtypes:
            model = bc.build_mlp(widths, args.epsilon, seed=0)
            model.set_activation_dtype(dt)
            gc.collect()
            runs.append(dict(width=w, dtype=dt, widths=widths, batch=batch, note=note, model=model, x=x, y=y))

    def stepper(run: dict):
        sgd, counter, model = SGD(0.01, 0.9), [0], run["model"]

        def step() -> None:
            counter[0] += 1
            model.train_step(run["x"], run["y"], sgd, dropout_key(0, counter[0], 0, 0))
        return step

    def name(run: dict) -> str:
        return f"{run['width']}/{run['dtype']}"

    steps = {name(r): stepper(r) for r in runs}
    counts = {name(r): args.repeats or max(3, min(30, int(2e9 / max(r["model"].nnz * r["batch"], 1))))
              for r in runs}
    probe = bc.BandwidthProbe()
    counts["read"] = counts["triad"] = max(counts.values())
    steps["read"], steps["triad"] = probe.read, probe.triad
    bc.set_threads(threads)
    med = bc.interleaved_median_ms(steps, counts)
    bw = probe.bound_bps()
    onchip = bc.onchip_cache_bytes()
    ref_ns: dict[str, float] = {}
    records = []
    for run in runs:
        model, batch, w, dt = run["model"], run["batch"], run["width"], run["dtype"]
        ms = med[name(run)]
        timer = PhaseTimer()
        model.profile = timer
        steps[name(run)]()
        model.profile = None
        phases = {k: round(1e3 * v, 3) for k, v in timer.by_kind().items()}
        nnz = model.nnz
        ns = ms * threads * 1e6 / (nnz * batch)
        if w == 1000:
            ref_ns[dt] = ns
        bytes_needed = bc.model_bound_bytes(model, batch, act_bytes=2 if dt == "bfloat16" else 4)
        tb_ms = 1e3 * bytes_needed / bw
        plans = model.blocking_plans(batch)
        rec = {
            "bench": "width", "width": w, "widths": run["widths"], "nnz": nnz, "batch": batch, "threads": threads,
            "activation_dtype": dt,
            "ms_per_step": ms, "ns_per_connection": ns,
            "cost_growth": (ns / ref_ns[dt]) if dt in ref_ns else None,
            "traffic_bound_ms": tb_ms, "x_traffic_bound": (ms / tb_ms) if tb_ms > 0 else None,
            "bound_bytes": bytes_needed, "bound_GBps": bw / 1e9, "bound_cache_bytes": onchip,
            "stream_triad_GBps": 24e-6 * probe.n / med["triad"], "llc_bytes": cache,
            "blocking": [p.describe(batch) for p in plans],
            # the plan's traffic model (sparse/blocking.py): what it predicts for this step
            "predicted_bytes": sum(p.stream_bytes for p in plans),
            "predicted_row_bytes": sum(p.row_bytes for p in plans),
            "predicted_ms": 1e3 * sum(p.seconds for p in plans) / threads,
            "phase_ms_one_step": phases, "repeats": counts[name(run)],
        }
        if dt != "float32" and f"{w}/float32" in med:
            rec["speedup_vs_float32"] = med[f"{w}/float32"] / ms
        if run["note"]:
            rec["note"] = run["note"]
        if dt not in ref_ns:
            rec["cost_growth_note"] = "no 1000-wide line in this run"
        bc.emit(rec)
        records.append(rec)
    if args.plot:
        plot(records, args.plot)


def json_lines(lines) -> list[dict]:  # noqa: ANN001
    """The ``"bench": "width"`` records among ``lines`` (other lines are skipped)."""
    out = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("bench") == "width":
                out.append(rec)
    return out


def plot(records: list[dict], path: str) -> None:
    """ns per connection·sample·thread against width (log x), annotated with the cost growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["width"])
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for dt in sorted({r.get("activation_dtype", "float32") for r in records}, reverse=True):
        mine = [r for r in records if r.get("activation_dtype", "float32") == dt]
        ax.plot([r["width"] for r in mine], [r["ns_per_connection"] for r in mine], marker="o", label=dt)
        for r in mine:
            if r.get("cost_growth"):
                ax.annotate(f"x{r['cost_growth']:.2f}", (r["width"], r["ns_per_connection"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.legend(title="activations", fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("hidden width W of 784-W-W-10 (epsilon 20)")
    ax.set_ylabel("ns per connection, sample and thread")
    ax.set_title(f"one train_step, batch {records[0]['batch']}, {records[0]['threads']} threads", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
