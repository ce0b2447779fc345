"""Time one training step (median ms) of hpc_sparse and of two baselines, side by side.

Baselines, run in the same process on the same sparsity pattern:

1. ``masked_dense``: PyTorch CPU, dense ``nn.Linear`` weights times a fixed binary mask
   (forward uses ``W*mask``; backward; SGD momentum step; mask re-applied), the standard
   way sparse training is simulated.
2. ``scipy``: the same step written with scipy.sparse products (forward ``W^T a``,
   backward ``W delta``); scipy has no SDDMM, so the gradient at the stored positions is
   a numpy gather-and-dot in chunks; momentum update on the ``data`` vector with numpy.

It also measures the machine's bound in the same run: memory bandwidth (read-only and STREAM
triad passes) and the float32 GEMM peak (numpy matmul) at the same thread count, and derives
the step's minimum flops (``6 * nnz * batch``: forward, backward, SDDMM) and bytes (the
compulsory DRAM traffic of ``_bench_common.step_bound_bytes``), then
``bound_ms = max(flops/peak, bytes/bandwidth)`` and ``x_bound = ms_per_step / bound_ms``.

Every contender (hpc_sparse's ``SparseMLP.train_step``, the baselines, one triad pass, one
GEMM) is timed in interleaved rounds and reported as a median, so that the machine's load
moving during the run hits all of them alike; the ratios are the figures to trust.

Both activation dtypes (``train.activation_dtype``: float32 and bfloat16) are timed in the same
interleaved rounds; the bfloat16 line carries ``speedup_vs_float32``, the ratio of the two.
One JSON line per (workload, thread count, activation dtype)::

    python tools/bench_step.py --workloads A,B,C,D --threads 1,2 --repeats 20
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402

WORKLOADS = {
    "A": dict(widths=[784, 1000, 1000, 1000, 10], epsilon=20.0, density=None, batch=128, all_threads_only=False),
    "B": dict(widths=[784, 10000, 10000, 10], epsilon=20.0, density=None, batch=128, all_threads_only=False),
    "C": dict(widths=[3072, 1024, 512, 10], epsilon=None, density=0.01, batch=100, all_threads_only=False),
    "D": dict(widths=[784, 95000, 95000, 10], epsilon=20.0, density=None, batch=128, all_threads_only=True),
}
ALPHA, DROPOUT, LR, MOMENTUM = 0.6, 0.3, 0.01, 0.9
# masked dense needs W, mask, grad and momentum (4 x float32) per dense weight
MASKED_DENSE_BYTES_PER_WEIGHT = 16
MASKED_DENSE_MAX_BYTES = 8 << 30


# ------------------------------------------------------------------------ the bound
def step_min_bytes(model, batch: int, act_bytes: int = 4) -> float:
    """DRAM bytes no execution of the step can avoid (``_bench_common.step_bound_bytes``), with
    activations and deltas stored at ``act_bytes`` per element (float32 4, bfloat16 2)."""
    return bc.model_bound_bytes(model, batch, act_bytes)


def step_flops(model, batch: int) -> int:
    return 6 * model.nnz * batch


# -------------------------------------------------------------------- hpc_sparse
def _breakdown(phases: dict[str, float]) -> dict[str, float]:
    """The product's phase names (``forward[l]``, ``backward[l]``, ...) in this tool's keys."""
    out = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "sddmm_update": 0.0}
    for name, s in phases.items():
        if name == "input" or name.startswith("forward"):
            out["forward"] += s
        elif name == "loss":
            out["loss"] += s
        elif name in ("backward[0]", "bias_update"):
            out["sddmm_update"] += s
        else:
            out["backward"] += s
    return out


def hpc_step(model, x, y):
    """One ``SparseMLP.train_step`` (fresh dropout masks each call), as a closure."""
    from hpc_sparse.sparse import SGD, dropout_key

    sgd = SGD(LR, MOMENTUM)
    counter = [0]

    def step():
        counter[0] += 1
        model.train_step(x, y, sgd, dropout_key(0, counter[0], 0, 0))

    return step


def hpc_breakdown(model, step, ms: float, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """The same step with the product's own phase timer attached: a breakdown by kind (this
    tool's keys) and per phase."""
    from hpc_sparse.sparse.profile import PhaseTimer

    timer = PhaseTimer()
    model.profile = timer
    runs = []
    for _ in range(max(3, repeats)):
        timer.reset()
        step()
        runs.append(dict(timer.seconds))
    model.profile = None
    names = sorted({k for r in runs for k in r})
    per_phase = {k: 1e3 * float(np.median([r.get(k, 0.0) for r in runs])) for k in names}
    br = {k: 1e3 * float(np.median([_breakdown(r)[k] for r in runs])) for k in _breakdown({})}
    br["glue"] = max(0.0, ms - sum(br.values()))
    return br, per_phase


# ----------------------------------------------------------------- masked dense
def masked_dense_step(model, x, y, threads: int):
    """One masked-dense PyTorch SGD step on the same sparsity pattern, as a closure."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lins, masks = [], []
    for layer in model.layers:
        n_in, n_out = layer.shape
        lin = torch.nn.Linear(n_in, n_out)
        m = torch.from_numpy(layer.weight.T.toarray() != 0).to(torch.float32)  # (n_out, n_in)
        with torch.no_grad():
            lin.weight.mul_(m)
        lins.append(lin)
        masks.append(m)
    params = [p for lin in lins for p in lin.parameters()]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    slopes = [a.slope for a in model.activations]
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(y.astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=False)
        h = xt
        for l, (lin, m) in enumerate(zip(lins, masks)):
            h = F.linear(h, lin.weight * m, lin.bias)
            if l < len(lins) - 1:
                h = F.leaky_relu(h, slopes[l])
                h = F.dropout(h, DROPOUT, training=True)
        loss = F.cross_entropy(h, yt)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for lin, m in zip(lins, masks):
                lin.weight.mul_(m)

    return step


# ------------------------------------------------------------------------ scipy
def scipy_step(model, x, y):
    """One step written with scipy.sparse products, as a closure."""
    import scipy.sparse as sp

    Ws = [l.weight.copy() for l in model.layers]
    Wt = [w.T.tocsr() for w in Ws]  # (n_out, n_in); values refreshed after each update
    # map: CSR position -> CSR-of-transpose position, to refresh Wt's data
    perms = []
    for w in Ws:
        tagged = sp.csr_matrix((np.arange(1, w.nnz + 1, dtype=np.float64), w.indices, w.indptr), shape=w.shape)
        perms.append((tagged.T.tocsr().data - 1).astype(np.int64))
    rows = [np.repeat(np.arange(w.shape[0]), np.diff(w.indptr)) for w in Ws]
    bs = [l.bias.copy() for l in model.layers]
    vel = [np.zeros(w.nnz, np.float32) for w in Ws]
    bvel = [np.zeros_like(b) for b in bs]
    slopes = [np.float32(a.slope) for a in model.activations]
    rng = np.random.default_rng(0)
    nb = x.shape[0]
    chunk = 1 << 15

    def sddmm(r, c, a, d, out):
        for lo in range(0, r.size, chunk):
            hi = min(r.size, lo + chunk)
            out[lo:hi] = np.einsum("kb,kb->k", a[r[lo:hi]], d[c[lo:hi]])

    def step():
        a = np.ascontiguousarray(x.T)
        acts, zs, masks = [a], [], []
        for l, (wt, b) in enumerate(zip(Wt, bs)):
            z = wt @ acts[-1] + b[:, None]
            zs.append(z)
            if l < len(Wt) - 1:
                m = (rng.random(z.shape, dtype=np.float32) >= DROPOUT).astype(np.float32) / (1 - DROPOUT)
                masks.append(m)
                acts.append(np.where(z >= 0, z, slopes[l] * z) * m)
        z = zs[-1]
        e = np.exp(z - z.max(axis=0, keepdims=True))
        p = e / e.sum(axis=0, keepdims=True)
        p[y, np.arange(nb)] -= 1.0
        delta = (p / nb).astype(np.float32)
        for l in range(len(Ws) - 1, -1, -1):
            w = Ws[l]
            g = np.empty(w.nnz, np.float32)
            sddmm(rows[l], w.indices, acts[l], delta, g)
            gb = delta.sum(axis=1)
            if l > 0:
                dz = w @ delta
                delta_next = (dz * np.where(zs[l - 1] >= 0, 1.0, slopes[l - 1]) * masks[l - 1]).astype(np.float32)
            vel[l] *= MOMENTUM
            vel[l] -= LR * g
            w.data += vel[l]
            bvel[l] *= MOMENTUM
            bvel[l] -= LR * gb
            bs[l] += bvel[l]
            Wt[l].data[:] = w.data[perms[l]]
            if l > 0:
                delta = delta_next

    return step


# ------------------------------------------------------------------------ driver
def run(name: str, threads: int, repeats: int, skip_dense: bool, dtypes: list[str]) -> list[dict]:
    """One record per activation dtype; the baselines, the triad and the GEMM are timed once,
    interleaved with every dtype's step, and shared by the records."""
    spec = WORKLOADS[name]
    widths, batch = spec["widths"], spec["batch"]
    if spec["density"] is not None:
        eps = [bc.epsilon_for_density(a, b, spec["density"]) for a, b in zip(widths[:-1], widths[1:])]
    else:
        eps = spec["epsilon"]
    bc.set_threads(threads)
    models = {}
    for dt in dtypes:  # the same network (same seed) once per dtype, so each keeps its own buffers
        models[dt] = bc.build_mlp(widths, eps, seed=0, alpha=ALPHA, dropout=DROPOUT)
        models[dt].set_activation_dtype(dt)
    model = models[dtypes[0]]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], batch).astype(np.int64)

    bc.set_threads(threads)
    flops = step_flops(model, batch)

    dense_weights = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    dense_bytes = MASKED_DENSE_BYTES_PER_WEIGHT * dense_weights
    skip_reason = None
    steps = {f"hpc_{dt}": hpc_step(models[dt], x, y) for dt in dtypes}
    slow = max(3, repeats // 2)
    counts = {f"hpc_{dt}": repeats for dt in dtypes}
    if skip_dense or spec["all_threads_only"] or dense_bytes > MASKED_DENSE_MAX_BYTES:
        skip_reason = (f"dense weights+mask+grad+momentum need {dense_bytes / 2**30:.1f} GiB "
                       f"({dense_weights:,} weights x {MASKED_DENSE_BYTES_PER_WEIGHT} B); not run")
    else:
        try:
            steps["md"], counts["md"] = masked_dense_step(model, x, y, threads), slow
        except ImportError:
            skip_reason = "torch not installed (pip install torch==2.13.0)"
    steps["scipy"], counts["scipy"] = scipy_step(model, x, y), slow
    # the machine's bound, measured between the steps it bounds
    probe = bc.BandwidthProbe()
    steps["read"], steps["triad"] = probe.read, probe.triad
    steps["gemm"], gemm_flops = bc.gemm_step()
    counts["read"] = counts["triad"] = counts["gemm"] = repeats
    bc.set_threads(threads)
    med = bc.interleaved_median_ms(steps, counts)
    md, sc = med.get("md"), med["scipy"]
    bound = {"stream_triad_GBps": 24e-6 * probe.n / med["triad"], "bound_GBps": probe.bound_bps() / 1e9,
             "gemm_peak_GFLOPps": gemm_flops / med["gemm"] / 1e6}
    records = []
    for dt in dtypes:
        nbytes = step_min_bytes(model, batch, 2 if dt == "bfloat16" else 4)
        bound_ms = 1e3 * max(flops / (bound["gemm_peak_GFLOPps"] * 1e9), nbytes / (bound["bound_GBps"] * 1e9))
        ms = med[f"hpc_{dt}"]
        breakdown, per_phase = hpc_breakdown(models[dt], steps[f"hpc_{dt}"], ms, repeats)
        rec: dict = {"workload": name, "widths": widths, "batch": batch, "threads": threads, "nnz": model.nnz,
                     "activation_dtype": dt}
        rec["ms_per_step"] = ms
        rec.update({
            "masked_dense_ms_per_step": md,
            "scipy_ms_per_step": sc,
            "speedup_vs_masked_dense": (md / ms) if md else None,
            "speedup_vs_scipy": sc / ms,
            "bound_ms_per_step": bound_ms,
            "x_bound": ms / bound_ms,
            "compute_bound_ms_per_step": 1e3 * flops / (bound["gemm_peak_GFLOPps"] * 1e9),
            "x_compute_bound": ms / (1e3 * flops / (bound["gemm_peak_GFLOPps"] * 1e9)),
            "bound_kind": "compute" if flops / bound["gemm_peak_GFLOPps"] >= nbytes / bound["bound_GBps"]
            else "bandwidth",
            "min_flops": flops, "min_bytes": nbytes,
            "gemm_peak_GFLOPps": bound["gemm_peak_GFLOPps"], "stream_triad_GBps": bound["stream_triad_GBps"],
            "bound_GBps": bound["bound_GBps"],
            "achieved_GFLOPps": flops / ms / 1e6,
            "breakdown_ms": breakdown,
            "breakdown_per_phase_ms": per_phase,
            "blocking": [p.describe(batch) for p in models[dt].blocking_plans(batch)],
            "breakdown_note": "timed inside SparseMLP.train_step by its PhaseTimer hook: forward = fused scatter "
                              "product+bias+activation+dropout kernels (input transpose included); backward = fused "
                              "kernels of layers L-1..1 (gradient to the layer below + SDDMM + momentum update + bias "
                              "gradient); sddmm_update = layer 0's SDDMM + momentum update and the bias updates; "
                              "glue = step minus the parts (Python, dispatch)",
            "dense_bytes": dense_bytes,
        })
        if dt != "float32" and "float32" in dtypes:
            rec["speedup_vs_float32"] = med["hpc_float32"] / ms  # same run, interleaved
        if md is None:
            rec["masked_dense_skipped"] = skip_reason
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="A,B,C,D", help="comma list of A,B,C,D")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default: 1,all)")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per measurement (median)")
    ap.add_argument("--skip-dense", action="store_true", help="do not run the PyTorch masked-dense baseline")
    ap.add_argument("--activation-dtypes", default="float32,bfloat16",
                    help="comma list of train.activation_dtype values to time, side by side")
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.activation_dtypes.split(",")]
    allt = bc.max_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, allt})
    for name in args.workloads.split(","):
        name = name.strip().upper()
        for t in threads:
            if WORKLOADS[name]["all_threads_only"] and t != allt:
                continue
            for rec in run(name, t, args.repeats, args.skip_dense, dtypes):
                rec["machine"] = bc.machine_info()
                bc.emit(rec)
            gc.collect()


if __name__ == "__main__":
    main()
