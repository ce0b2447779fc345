"""hpc_sparse's kernels against Intel MKL, torch and scipy, one operation at a time, side by side.

Per width W (default 10,000 and 95,000) it builds the network W-W-W (two W x W Erdős–Rényi
layers at epsilon 20, All-ReLU, dropout 0.3), runs one ``SparseMLP.gradients`` and one
``SparseMLP.train_step`` on a batch (128 samples) so that the product's own buffers hold
real activations and deltas, and times on them:

* ``forward``: ``z = W^T a + b`` of layer 1 (``kernels_forward.forward_linear``; a hidden
  layer runs the same scatter with the activation fused in, ``forward_act``);
* ``sddmm``: ``g_ij = x_i . delta_j`` at the stored positions of layer 0, the weight gradient
  of ``SparseMLP.gradients`` (``kernels_backward.sddmm_grad``);
* ``backward``: layer 1's training backward (``kernels_backward.backward_act_sgd``): the
  gradient into layer 0 ``(W delta) * f'(z) * mask / (1 - p)`` fused with the SDDMM and the
  SGD-momentum step. The contenders do only ``W delta`` and the SDDMM (no derivative, mask
  or SGD step), which favours them.

hpc_sparse is called as ``SparseMLP`` calls it (same kernels, plans and arguments: see
:class:`HpcOps`); before timing, each op's result is checked to be bit-identical to what
``train_step`` / ``gradients`` produced. Contenders, each checked against hpc_sparse's result
first (tolerance in :func:`check`): torch CSR (``torch.mm`` on a CSR tensor,
``torch.sparse.sampled_addmm``), Intel MKL sparse through sparse-dot-mkl (SpMM only: it has
no SDDMM, so its backward uses torch's), scipy.sparse (CSR ``@``; the SDDMM as a numpy
gather-and-dot, scipy has none). A contender that is not installed prints a line with the
reason instead. Every library runs at ``--threads`` threads (scipy.sparse has no threads); all
steps are timed in interleaved rounds (medians), each call after a pause so that no library's
threads still spin.

One JSON line per (width, op, contender) with ``ms``, ``ratio_to_hpc`` (contender ms over
hpc_sparse ms for the same op in the same run), ``hpc_ms``, width, nnz, batch, threads::

    python tools/bench_kernels.py
    python tools/bench_kernels.py --widths 10000 --threads 2 --repeats 20
    pip install -e '.[bench,mkl]'    # torch, sparse-dot-mkl and Intel's MKL wheel
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402

OPS = ("forward", "sddmm", "backward")
LR, MOMENTUM, DROPOUT = 0.01, 0.9, 0.3
MKL_SETTLE_SECONDS = 0.3
"""Intel OpenMP's workers (MKL) spin 200 ms after a parallel region (KMP_BLOCKTIME), as long as
the default pause: with MKL loaded, every timed call waits this long instead."""


# ------------------------------------------------------------------------ hpc_sparse
class HpcOps:
    """The kernels ``SparseMLP._forward`` / ``_backward`` run for one layer, with the same plans
    and arguments, so that one operation can be timed alone. Keep in step with
    ``hpc_sparse/sparse/mlp.py``: :meth:`check_product_path` fails when they drift apart."""

    def __init__(self, model: Any, batch: int) -> None:
        self.model = model
        self.buf = model._bufs(batch)  # the buffers of the product's last step at this batch

    def _layer(self, l: int, forward: bool = False) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        import numba

        layer, plan = self.model.layers[l], self.buf.plans[l]
        bounds, seg = layer.part_index(plan.forward_blocks if forward else plan.n_blocks, numba.get_num_threads())
        return layer, plan, bounds, seg

    def forward(self, l: int, a_in: np.ndarray, z: np.ndarray) -> None:
        """``z = W_l^T a_in + b_l`` as for the output layer (a_in (n_in, B), z (n_out, B))."""
        from hpc_sparse.sparse import kernels_forward as kf

        layer, plan, bounds, seg = self._layer(l, forward=True)
        w = layer.weight
        kf.forward_linear(seg, bounds, plan.forward_blocks, w.indices, w.data, a_in, layer.bias, plan.chunk, z)

    def sddmm(self, l: int, delta: np.ndarray, a_prev: np.ndarray, grads: np.ndarray) -> None:
        """The weight gradient of a first layer, into ``grads`` (nnz,), as ``gradients()``."""
        from hpc_sparse.sparse import kernels_backward as kb

        layer, plan, _, seg = self._layer(l)
        w = layer.weight
        kb.sddmm_grad(seg, plan.n_blocks, w.indices, w.data, grads, delta, a_prev, plan.chunk)

    def backward(self, l: int, delta: np.ndarray, out: np.ndarray, gbias: np.ndarray, data: np.ndarray,
                 velocity: np.ndarray, lr: float, momentum: float) -> None:
        """The fused backward + SGD step of hidden-input layer ``l`` on ``data`` and ``velocity``
        (the layer's own arrays, or copies), reading the buffers of the step: a[l-1], zinfo[l-1]
        (the sign bits of z) and the dropout key; writes ``out`` (n_in, B, float32, its own
        accumulator) and ``gbias`` (n_in,)."""
        from hpc_sparse.sparse import kernels_backward as kb

        layer, plan, _, seg = self._layer(l)
        f, buf = self.model.activations[l - 1], self.buf
        use_dropout = self.model.dropout > 0
        scale = np.float32(1.0 / (1.0 - self.model.dropout)) if use_dropout else np.float32(1.0)
        threshold = np.uint64(int(self.model.dropout * 2.0 ** 32)) if use_dropout else np.uint64(0)
        key = buf.keys[l - 1] if use_dropout else np.uint64(0)
        kb.backward_act_sgd(seg, plan.n_blocks, layer.weight.indices, data, velocity, np.empty(0, np.float32),
                            delta, buf.a[l - 1], buf.zinfo[l - 1], f.kind, np.float32(f.slope), scale, key, threshold,
                            np.float32(lr), np.float32(momentum), np.float32(0.0), False, plan.chunk, out, out, gbias)


@dataclass
class Case:
    """One width's network, the inputs of each op (the product's buffers) and hpc_sparse's results."""

    width: int
    batch: int
    model: Any
    ops: HpcOps
    x: np.ndarray        # (W, B) input of layer 0, as the product stores it
    a0: np.ndarray       # (W, B) activation of layer 0 = input of layer 1
    delta0: np.ndarray   # (W, B) dL/dz of layer 0
    delta1: np.ndarray   # (W, B) dL/dz of layer 1
    z_fwd: np.ndarray    # hpc results for the checks
    g_sddmm: np.ndarray
    out_bwd: np.ndarray
    g_bwd: np.ndarray


def build_case(width: int, epsilon: float, batch: int) -> Case:
    """Run the product once (gradients, then train_step) and check :class:`HpcOps` against it."""
    from hpc_sparse.sparse import SGD, dropout_key
    from hpc_sparse.sparse.buffers import aligned_empty

    model = bc.build_mlp([width, width, width], epsilon, seed=0, dropout=DROPOUT)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, width), dtype=np.float32)
    y = rng.integers(0, width, batch).astype(np.int64)
    key = dropout_key(0, 1, 0, 0)
    params = model.parameter_arrays()
    saved = [p.copy() for p in params]
    _, grads, _ = model.gradients(x, y, key)
    ops = HpcOps(model, batch)
    buf, layer1 = ops.buf, model.layers[1]
    g0 = np.empty(model.layers[0].nnz, np.float32)
    ops.sddmm(0, buf.delta[0], buf.x, g0)
    same = np.array_equal(g0, grads[0])
    model.train_step(x, y, SGD(LR, MOMENTUM), key)  # the same forward pass (same key), then the update
    stepped = layer1.weight.data.copy(), layer1.w_velocity.copy()
    for p, v in zip(params, saved):
        p[:] = v
    z = aligned_empty((width, batch), np.float32)
    ops.forward(1, buf.a[0], z)
    out = aligned_empty((width, batch), np.float32)
    gbias = np.empty(width, np.float32)
    data, vel = layer1.weight.data.copy(), layer1.w_velocity.copy()
    ops.backward(1, buf.delta[1], out, gbias, data, vel, LR, MOMENTUM)
    if not (same and np.array_equal(z, buf.logits) and np.array_equal(out, buf.delta[0])
            and np.array_equal(data, stepped[0]) and np.array_equal(vel, stepped[1])):
        raise RuntimeError("bench_kernels: HpcOps no longer computes what SparseMLP.train_step/gradients compute; "
                           "bring HpcOps in tools/bench_kernels.py in step with hpc_sparse/sparse/mlp.py")
    # the references for the contenders, on the buffers of the train_step and the weights before it
    ops.sddmm(0, buf.delta[0], buf.x, g0)
    data, vel = layer1.weight.data.copy(), np.zeros_like(layer1.w_velocity)
    ops.backward(1, buf.delta[1], out, gbias, data, vel, 1.0, 0.0)  # lr 1, no momentum: the velocity is -g
    return Case(width, batch, model, ops, buf.x, buf.a[0], buf.delta[0], buf.delta[1], z, g0, out, -vel)


# ------------------------------------------------------------------------- checks
U32 = 2.0 ** -24


def check(ours: np.ndarray, theirs: np.ndarray, magnitude: np.ndarray, terms: int) -> float:
    """Largest ``|ours - theirs|`` over its tolerance (<= 1 passes), elementwise.

    Both are float32 sums of at most ``terms`` products; whatever the order of summation, with
    or without FMA, each is within ``gamma_k * sum|products|`` of the exact value, ``gamma_k =
    k u / (1 - k u)``, ``u = 2**-24`` (Higham, Accuracy and Stability of Numerical Algorithms,
    section 3.1). So two correct results differ by at most ``2 gamma_k`` times ``magnitude``,
    the sum of the products' absolute values (computed in float64); ``k = terms + 2`` covers
    the epilogue's roundings (bias, derivative, mask scale)."""
    k = terms + 2
    tol = 2 * k * U32 / (1 - k * U32) * np.asarray(magnitude, np.float64)
    err = np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))
    if np.any(err[tol == 0] > 0):
        return float("inf")
    return float(np.max(err[tol > 0] / tol[tol > 0], initial=0.0))


def numpy_sddmm(rows: np.ndarray, cols: np.ndarray, a: np.ndarray, d: np.ndarray, out: np.ndarray,
                chunk: int = 1 << 15) -> np.ndarray:
    """``out[k] = a[rows[k]] . d[cols[k]]`` in chunks of gathered rows (a, d: (n, B))."""
    for lo in range(0, rows.size, chunk):
        hi = min(rows.size, lo + chunk)
        np.einsum("kb,kb->k", a[rows[lo:hi]], d[cols[lo:hi]], out=out[lo:hi])
    return out


def csr_rows(w: sp.csr_matrix) -> np.ndarray:
    """The row of every stored entry of ``w``, in storage order."""
    return np.repeat(np.arange(w.shape[0], dtype=w.indices.dtype), np.diff(w.indptr))


def expected(case: Case) -> dict[str, tuple]:
    """Per op: hpc_sparse's results, the float64 magnitudes that bound their rounding (see
    :func:`check`), the most terms in one of their sums, and the map from a contender's raw
    results onto hpc_sparse's (the bias; the derivative, mask and scale of the backward)."""
    w0, w1 = case.model.layers[0].weight, case.model.layers[1].weight
    buf = case.ops.buf
    abs1 = abs(w1).astype(np.float64)
    bias = case.model.layers[1].bias.astype(np.float64)[:, None]
    from hpc_sparse.sparse.activations import dropout_keep_mask

    negative = np.unpackbits(buf.zinfo[0], axis=1, bitorder="little")[:, :case.batch].astype(bool)
    d = (np.where(negative, case.model.activations[0].slope, 1.0)
         * dropout_keep_mask(buf.keys[0], negative.shape, DROPOUT) / (1 - DROPOUT))

    def mag_sddmm(w: sp.csr_matrix, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return numpy_sddmm(csr_rows(w), w.indices, np.abs(a, dtype=np.float64), np.abs(b, dtype=np.float64),
                           np.empty(w.nnz))

    return {
        "forward": ((case.z_fwd,), (abs1.T.tocsr() @ np.abs(case.a0, dtype=np.float64) + np.abs(bias),),
                    (int(np.bincount(w1.indices).max()) + 1,), lambda r: (r[0] + bias,)),
        "sddmm": ((case.g_sddmm,), (mag_sddmm(w0, case.x, case.delta0),), (case.batch,), lambda r: r),
        "backward": ((case.out_bwd, case.g_bwd),
                     ((abs1 @ np.abs(case.delta1, dtype=np.float64)) * np.abs(d), mag_sddmm(w1, case.a0, case.delta1)),
                     (int(np.diff(w1.indptr).max()), case.batch), lambda r: (r[0] * d, r[1])),
    }


# ---------------------------------------------------------------------- contenders
@dataclass
class Contender:
    name: str
    description: str
    steps: dict[str, Callable[[], Any]]  # op -> call returning its result (numpy-convertible)
    skipped: dict[str, str]              # op -> why not


def _np(v: Any) -> np.ndarray:
    return v.numpy() if hasattr(v, "numpy") else np.asarray(v)


def scipy_contender(case: Case) -> Contender:
    w0, w1 = case.model.layers[0].weight, case.model.layers[1].weight
    w1t = w1.T.tocsr()
    rows0, rows1 = csr_rows(w0), csr_rows(w1)
    g0, g1 = np.empty(w0.nnz, np.float32), np.empty(w1.nnz, np.float32)
    import scipy

    return Contender("scipy", f"scipy {scipy.__version__} (one thread: scipy.sparse has no threads): CSR @ dense; SDDMM "
                     "as a numpy gather-and-dot in chunks (scipy has none)", {
                         "forward": lambda: w1t @ case.a0,
                         "sddmm": lambda: numpy_sddmm(rows0, w0.indices, case.x, case.delta0, g0),
                         "backward": lambda: (w1 @ case.delta1, numpy_sddmm(rows1, w1.indices, case.a0, case.delta1, g1)),
                     }, {})


def _torch_csr(torch: Any, w: sp.csr_matrix) -> Any:
    return torch.sparse_csr_tensor(torch.from_numpy(w.indptr), torch.from_numpy(w.indices), torch.from_numpy(w.data),
                                   w.shape)


def _torch_sddmm(torch: Any, w: sp.csr_matrix, a: np.ndarray, d: np.ndarray) -> Callable[[], Any]:
    """``torch.sparse.sampled_addmm`` at w's pattern of ``a (n_in, B) @ d^T (B, n_out)``, into a
    preallocated result."""
    pattern, ta, tdt = _torch_csr(torch, w), torch.from_numpy(a), torch.from_numpy(d).T
    out = torch.sparse.sampled_addmm(pattern, ta, tdt, beta=0.0, alpha=1.0)
    return lambda: torch.sparse.sampled_addmm(pattern, ta, tdt, beta=0.0, alpha=1.0, out=out).values()


def torch_contender(case: Case) -> Contender:
    try:
        import torch
    except ImportError:
        reason = "torch not installed (pip install -e '.[bench]')"
        return Contender("torch", "", {}, {op: reason for op in OPS})
    import warnings

    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "beta state", invariant checks
    w0, w1 = case.model.layers[0].weight, case.model.layers[1].weight
    w1t, tw1 = _torch_csr(torch, w1.T.tocsr()), _torch_csr(torch, w1)
    ta0, td1 = torch.from_numpy(case.a0), torch.from_numpy(case.delta1)
    z, out = torch.empty(w1.shape[1], case.batch), torch.empty(w1.shape[0], case.batch)
    sddmm0 = _torch_sddmm(torch, w0, case.x, case.delta0)
    sddmm1 = _torch_sddmm(torch, w1, case.a0, case.delta1)
    return Contender("torch", f"torch {torch.__version__}: torch.mm(CSR, dense, out=); torch.sparse.sampled_addmm", {
        "forward": lambda: torch.mm(w1t, ta0, out=z),
        "sddmm": sddmm0,
        "backward": lambda: (torch.mm(tw1, td1, out=out), sddmm1()),
    }, {})


def load_mkl(threads: int) -> tuple[Any, str | None]:
    """sparse_dot_mkl with MKL at ``threads`` threads, or None and why not. Intel's PyPI wheel
    ``mkl`` puts libmkl_rt.so.N in ``<prefix>/lib``, where the loader does not look:
    ``MKL_RT`` (sparse-dot-mkl's own setting) is pointed at it unless already set."""
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    if "MKL_RT" not in os.environ:
        found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
        if found:
            os.environ["MKL_RT"] = found[-1]
    try:
        import sparse_dot_mkl
    except ImportError as exc:
        return None, f"sparse-dot-mkl not usable ({str(exc).splitlines()[0]}); pip install -e '.[mkl]'"
    sparse_dot_mkl.mkl_set_num_threads(threads)
    return sparse_dot_mkl, None


def mkl_contender(case: Case, mkl: Any, why_not: str | None) -> Contender:
    if mkl is None:
        return Contender("mkl", "", {}, {op: why_not or "" for op in OPS})
    w1 = case.model.layers[1].weight
    w1t = w1.T.tocsr()
    z, out = np.empty((w1.shape[1], case.batch), np.float32), np.empty((w1.shape[0], case.batch), np.float32)
    spmm = lambda a, b, o: mkl.dot_product_mkl(a, b, out=o, out_scalar=0.0)  # noqa: E731
    steps = {"forward": lambda: spmm(w1t, case.a0, z)}
    skipped = {"sddmm": "sparse-dot-mkl has no SDDMM"}
    try:
        import torch
    except ImportError:
        skipped["backward"] = "needs torch's sampled_addmm for the SDDMM (pip install -e '.[bench]')"
    else:
        sddmm1 = _torch_sddmm(torch, w1, case.a0, case.delta1)
        steps["backward"] = lambda: (spmm(w1, case.delta1, out), sddmm1())
    version = re.search(r"Version (\S+)", mkl.mkl_get_version_string())
    return Contender("mkl", f"Intel MKL {version.group(1) if version else '?'} via sparse-dot-mkl {mkl.__version__}: "
                     "mkl_sparse_s_mm (inspector-executor, no optimize hint); backward SDDMM by torch", steps, skipped)


# --------------------------------------------------------------------------- driver
def library_threads(mkl: Any) -> dict[str, int]:
    """Each library's thread count as it reports it (all set by :func:`main`)."""
    import numba

    out = {"numba": numba.get_num_threads()}
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    if mkl is not None:
        out["mkl"] = int(mkl.mkl_get_max_threads())
    return out


def run_width(width: int, args: argparse.Namespace, threads: int, mkl: Any, mkl_why: str | None) -> None:
    """Build, check and time one width; print its lines."""
    case = build_case(width, args.epsilon, args.batch)
    bc.set_threads(threads)
    layer1 = case.model.layers[1]
    fwd_out, bwd_out = np.empty_like(case.z_fwd), np.empty_like(case.out_bwd)
    sddmm_out, bwd_gbias = np.empty_like(case.g_sddmm), np.empty(width, np.float32)
    hpc = Contender("hpc_sparse", "hpc_sparse's kernels as SparseMLP calls them (checked bit-identical to its step)", {
        "forward": lambda: case.ops.forward(1, case.a0, fwd_out),
        "sddmm": lambda: case.ops.sddmm(0, case.delta0, case.x, sddmm_out),
        "backward": lambda: case.ops.backward(1, case.delta1, bwd_out, bwd_gbias, layer1.weight.data,
                                              layer1.w_velocity, LR, MOMENTUM),
    }, {})
    contenders = [hpc, torch_contender(case), mkl_contender(case, mkl, mkl_why), scipy_contender(case)]

    want = expected(case)
    checks: dict[tuple[str, str], float] = {}
    for c in contenders[1:]:
        for op, call in c.steps.items():
            ours, mags, terms, to_ours = want[op]
            raw = call()
            got = to_ours([_np(v) for v in (raw if isinstance(raw, tuple) else (raw,))])
            ratio = max(check(*args) for args in zip(ours, got, mags, terms))
            checks[(op, c.name)] = ratio
            if not ratio <= 1.0:
                raise RuntimeError(f"bench_kernels: {c.name}'s {op} differs from hpc_sparse's at width {width} "
                                   f"({ratio:.3g} x the rounding tolerance)")
    del want
    gc.collect()

    steps, counts = {}, {}
    for c in contenders:
        for op, call in c.steps.items():
            steps[f"{op}/{c.name}"] = call
            counts[f"{op}/{c.name}"] = max(1, args.repeats // 3) if c.name == "scipy" else args.repeats
    bc.set_threads(threads)
    if mkl is not None:
        bc.SETTLE_SECONDS = max(bc.SETTLE_SECONDS, MKL_SETTLE_SECONDS)
    med = bc.interleaved_median_ms(steps, counts, warmup=1)
    base = {"bench": "kernels", "width": width, "batch": args.batch, "threads": threads, "epsilon": args.epsilon,
            "library_threads": library_threads(mkl), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    nnz = {"forward": layer1.nnz, "backward": layer1.nnz, "sddmm": case.model.layers[0].nnz}
    for op in OPS:
        hpc_ms = med[f"{op}/hpc_sparse"]
        for c in contenders:
            rec = {**base, "op": op, "contender": c.name, "description": c.description, "nnz": nnz[op]}
            if op in c.steps:
                ms = med[f"{op}/{c.name}"]
                rec.update(ms=ms, hpc_ms=hpc_ms, ratio_to_hpc=ms / hpc_ms, repeats=counts[f"{op}/{c.name}"],
                           check=({"bit_identical_to_product": True} if c is hpc else
                                  {"passed": True, "max_err_over_tolerance": checks[(op, c.name)]}))
            else:
                rec.update(ms=None, hpc_ms=hpc_ms, ratio_to_hpc=None, skipped=c.skipped[op])
            bc.emit(rec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="10000,95000")
    ap.add_argument("--epsilon", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per op and contender (scipy: a third)")
    args = ap.parse_args(argv)
    threads = min(args.threads, bc.max_threads())
    mkl, mkl_why = load_mkl(threads)
    try:
        import torch  # noqa: F401  (imported before set_threads so that it sets torch's pool too)
    except ImportError:
        pass
    bc.set_threads(threads)
    for w in [int(v) for v in args.widths.split(",")]:
        run_width(w, args, threads, mkl, mkl_why)
        gc.collect()


if __name__ == "__main__":
    main()
