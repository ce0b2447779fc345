"""Shared helpers for the benchmark tools: thread control, the machine's measured bound
(memory bandwidth, float32 GEMM peak, the traffic bound of a training step), RSS readings,
timing and JSON output.

Every figure here is *measured on this machine in the same run*; nothing is a datasheet
number. Tools print one JSON line per result.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
from numba import njit, prange

# ---------------------------------------------------------------------------- threads
_BLAS_SETTER: Callable[[int], None] | None = None


def _find_blas_setter() -> Callable[[int], None] | None:
    """openblas_set_num_threads of numpy's bundled OpenBLAS (scipy-openblas), via ctypes."""
    global _BLAS_SETTER
    if _BLAS_SETTER is not None:
        return _BLAS_SETTER
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*.so*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                _BLAS_SETTER = lambda n, fn=fn: fn(int(n))  # noqa: E731
                return _BLAS_SETTER
    return None


def set_threads(n: int) -> dict[str, Any]:
    """Set numba's, numpy-BLAS's and (if imported) torch's thread counts to ``n``."""
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    blas = _find_blas_setter()
    if blas is not None:
        blas(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return {"numba": numba.get_num_threads(), "blas_set": blas is not None}


def max_threads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


# ---------------------------------------------------------------------- machine bound
@njit(parallel=True, cache=True, fastmath=True)
def _triad(a, b, c, s):  # pragma: no cover - numba
    n = a.shape[0]
    nchunk = 64
    step = (n + nchunk - 1) // nchunk
    for t in prange(nchunk):
        lo = t * step
        hi = min(n, lo + step)
        for i in range(lo, hi):
            a[i] = b[i] + s * c[i]


@njit(parallel=True, cache=True, fastmath=True)
def _read_sum(b):  # pragma: no cover - numba
    n = b.shape[0]
    nchunk = 64
    step = (n + nchunk - 1) // nchunk
    part = np.zeros(nchunk)
    for t in prange(nchunk):
        lo = t * step
        hi = min(n, lo + step)
        s = 0.0
        for i in range(lo, hi):
            s += b[i]
        part[t] = s
    return part.sum()


class BandwidthProbe:
    """Streaming passes over float64 arrays of ``n`` elements (256 MiB each by default, far above
    any cache) at the current numba thread count, to be timed beside the steps they bound.
    Each pass times itself and the probe keeps every kind's fastest pass.

    * ``read``: a sum over one array, 8 B per element and nothing written: the purest measure
      of how fast the memory system delivers bytes to these cores.
    * ``triad``: STREAM's ``a = b + s*c``. STREAM counts 24 B per element, but a normal store
      first reads the line it writes (write-allocate), so the memory moved 32 B per element;
      :meth:`bound_bps` counts 32, :meth:`triad_stream_bps` reports STREAM's 24.
    """

    def __init__(self, n: int = 1 << 25) -> None:
        self.n = n
        self.a, self.b, self.c = np.zeros(n), np.ones(n), np.full(n, 2.0)
        self.best = {"read": math.inf, "triad": math.inf}
        _read_sum(self.b)  # compile or load, and fault the pages in
        _triad(self.a, self.b, self.c, 3.0)

    def _timed(self, kind: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        fn()
        self.best[kind] = min(self.best[kind], time.perf_counter() - t0)

    def read(self) -> None:
        self._timed("read", lambda: _read_sum(self.b))

    def triad(self) -> None:
        self._timed("triad", lambda: _triad(self.a, self.b, self.c, 3.0))

    def triad_stream_bps(self) -> float:
        """The fastest triad in STREAM's convention (24 B per element), bytes/second."""
        return 24.0 * self.n / self.best["triad"]

    def bound_bps(self) -> float:
        """The bandwidth the traffic bound divides by: the larger of the fastest read pass and
        the fastest triad counted with its write-allocate reads (32 B per element), bytes/second.
        Fastest, not median: the bound needs the most the memory delivered at this thread
        count in this run, and a load spike only ever slows a pass down."""
        return max(8.0 * self.n / self.best["read"], 32.0 * self.n / self.best["triad"])


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best-of float32 ``numpy.matmul`` of two n x n matrices at the current BLAS thread
    count (set by :func:`set_threads`). Returns flop/second (2 n^3 per product)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def gemm_step(n: int = 2048) -> tuple[Callable[[], None], float]:
    """One float32 n x n matmul at the current BLAS thread count, as a closure, and its flops."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * n ** 3


def machine_bound(threads: int, repeats: int = 7) -> dict[str, float]:
    """At ``threads`` threads, measured now: the best STREAM triad (``stream_triad_GBps``, 24 B per
    element), the bandwidth the traffic bound uses (``bound_GBps``, :class:`BandwidthProbe`) and
    the GEMM peak."""
    set_threads(threads)
    probe = BandwidthProbe()
    for _ in range(repeats):
        for step in (probe.read, probe.triad):
            time.sleep(SETTLE_SECONDS)
            step()
    return {"stream_triad_GBps": probe.triad_stream_bps() / 1e9, "bound_GBps": probe.bound_bps() / 1e9,
            "gemm_peak_GFLOPps": gemm_peak() / 1e9}


# -------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Current resident set size of this process (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Lifetime peak RSS (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to /proc/self/clear_refs).
    Returns True if it worked; then /proc/self/status VmHWM restarts from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


# -------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    gc.collect()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


SETTLE_SECONDS = 0.2
"""Pause before each timed call in :func:`interleaved_median_ms`. After a parallel call,
OpenBLAS's and OpenMP's worker threads spin-wait for up to ~0.1 s (2^28 cycles in OpenBLAS);
a contender timed right after another library's parallel call shares the 2 cores with those
spinning threads (a 2-thread train_step of workload A measured 8 ms that way, 3.3 ms alone)."""


def interleaved_median_ms(steps: dict[str, Callable[[], Any]], repeats: dict[str, int], warmup: int = 2
                          ) -> dict[str, float]:
    """Median wall time in ms of each callable, timed in interleaved rounds (round r runs every
    step whose ``repeats`` exceed r, one call each), so that a change in the machine's load
    during the measurement hits every contender alike. Each timed call follows a pause of
    :data:`SETTLE_SECONDS` so that no other library's threads still spin."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    gc.collect()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(max(repeats.values())):
        for k, fn in steps.items():
            if r < repeats[k]:
                time.sleep(SETTLE_SECONDS)
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (floats rounded to 4 significant digits) and flush."""
    def fix(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, (np.floating,)):
            return fix(float(v))
        return v
    print(json.dumps(fix(record)), flush=True)


def build_mlp(widths: list[int], epsilon: float | list[float], seed: int = 0, activation: str = "allrelu",
              alpha: float = 0.6, dropout: float = 0.3, init: str = "he_uniform"):
    """A SparseMLP with Erdős–Rényi layers (the same construction as ``model_builder``);
    ``epsilon`` may be a list (one per layer)."""
    from hpc_sparse.sparse import SparseLinear, SparseMLP, hidden_activations
    from hpc_sparse.topology import erdos_renyi

    eps = epsilon if isinstance(epsilon, (list, tuple)) else [epsilon] * (len(widths) - 1)
    layers = []
    for l, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        rng = np.random.default_rng([seed, 0x1417, l])
        layers.append(SparseLinear(erdos_renyi(rng, n_in, n_out, eps[l], init)))
        gc.collect()
    acts = hidden_activations(activation, alpha, len(widths) - 2)
    return SparseMLP(layers, acts, dropout)


def epsilon_for_density(n_in: int, n_out: int, density: float) -> float:
    """The Erdős–Rényi epsilon that gives ``density`` on an (n_in, n_out) layer."""
    return density * n_in * n_out / (n_in + n_out)


# ---------------------------------------------------------------------- traffic bound


def onchip_cache_bytes() -> int:
    """Every data or unified cache of the CPUs this process may run on, all levels, each
    shared cache counted once (sysfs); 64 MiB when sysfs says nothing. It ignores
    ``HPC_SPARSE_CACHE_BYTES``, which shrinks the product's blocking budget but not the chip."""
    seen: set[tuple[str, str, str]] = set()
    total = 0
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = list(range(os.cpu_count() or 1))
    for cpu in cpus:
        for index in glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/cache/index*"):
            try:
                fields = {k: open(os.path.join(index, k)).read().strip()
                          for k in ("level", "type", "size", "shared_cpu_list")}
            except OSError:
                continue
            key = (fields["level"], fields["type"], fields["shared_cpu_list"])
            text = fields["size"]
            if fields["type"] == "Instruction" or key in seen or not text.rstrip("KMGkmg").isdigit():
                continue
            seen.add(key)
            total += int(text.rstrip("KMGkmg")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return total or 64 << 20


def _step_values(shapes: list[tuple[int, int, int]], batch: int, act_bytes: int, index_bytes: int
                 ) -> list[tuple[float, int, tuple[int, ...], bool]]:
    """The values of one step as ``(bytes, phase that makes it or -1, phases that use it, used
    by the next step)``; phase ``l`` is forward[l], phase ``2L-1-l`` is backward[l]."""
    n_layers = len(shapes)
    fwd = list(range(n_layers))
    bwd = [2 * n_layers - 1 - l for l in range(n_layers)]
    e = act_bytes
    vals = [(float(e * shapes[0][0] * batch), -1, (fwd[0], bwd[0]), False)]  # the batch
    for l, (n_in, n_out, nnz) in enumerate(shapes):
        vals.append((float(index_bytes * nnz + 4 * (nnz + n_out)), -1, (fwd[l], bwd[l]), False))
        vals.append((float(4 * (nnz + n_out)), -1, (bwd[l],), False))
        vals.append((float(8 * (nnz + n_out)), bwd[l], (), True))
        if l < n_layers - 1:
            vals.append((float(e * n_out * batch), fwd[l], (fwd[l + 1], bwd[l + 1]), False))
        else:
            vals.append((float(e * n_out * batch), fwd[l], (bwd[l],), False))
        if l > 0:
            vals.append((float(e * n_in * batch), bwd[l], (bwd[l - 1],), False))
    return vals


def step_bound_bytes(shapes: list[tuple[int, int, int]], batch: int, cache: int | None = None,
                     act_bytes: int = 4, index_bytes: int = 4) -> float:
    """Lower bound on the DRAM bytes of one training step.

    ``shapes``: per layer ``(n_in, n_out, nnz)``; ``cache``: bytes of cache credited to each
    window (default :func:`onchip_cache_bytes`); ``act_bytes``: bytes per stored activation or
    delta element; ``index_bytes``: bytes per column index.

    The traffic bound is a lower bound on the DRAM traffic of one training step, divided by the
    highest memory bandwidth measured in the same run at the same thread count.

    Which executions it covers: every execution of the product's step in its storage format:
    layer by layer, the forward pass of layers 0..L-1, then the softmax loss, then the backward
    pass of layers L-1..0 (each layer's backward = gradient into the layer below, SDDMM weight
    gradient, SGD-momentum step), with the forward activations stored for the backward pass (not
    recomputed); float32 weight values, momentum and biases, ``index_bytes`` per column index
    (int32: 4), activations and deltas at ``act_bytes`` per element (float32: 4, bfloat16: 2).
    Within a layer's pass anything goes: any order, blocking, batch chunking, fusion, thread count.

    Which bytes: the 2L passes are *phases*; a window is a run of consecutive phases. A window
    must read every value it uses that was made before it (by an earlier phase, or before the
    step: weights, momentum, the batch) and must leave in memory every value it makes that is
    used after it (by a later phase, or by the next step: the updated weights and momentum).
    Per layer (n_in, n_out, nnz), batch B, ``e = act_bytes``:

        made before the step, used by forward[l] and backward[l]:
            column indices        index_bytes * nnz
            weights and bias      4 * (nnz + n_out)
            the batch (layer 0)   e * n_in * B  (read as float32; e is a floor)
        made before the step, used by backward[l]:   momentum   4 * (nnz + n_out)
        made by backward[l], used by the next step:  weights and momentum   8 * (nnz + n_out)
        made by forward[l], used by forward[l+1] and backward[l+1]:  activation   e * n_out * B
            (the last layer: logits, used by backward[L-1] through the loss)
        made by backward[l] (l > 0), used by backward[l-1]:  delta into the layer below   e * n_in * B

    Not counted, because an execution need not move it: row pointers, the dropout mask (a
    counter hash, recomputable), pre-activations (a piecewise-linear derivative needs one bit,
    and often none), and every re-read of the random-access side: how often a row that does not
    fit in the cache must be fetched depends on the plan, and no plan-independent bound with a
    usable constant is known, so a plan model (blocks x chunks) is a prediction, not a bound.

    Why no execution can move fewer: at the start of a window the caches hold at most ``C``
    bytes, so a window that reads ``D`` bytes made before it reads at least ``D - C`` from
    memory; at its end at most ``C`` of the ``P`` bytes it made for later can still be in cache,
    so it wrote at least ``P - C`` to memory. Windows are disjoint in time, so for any partition
    of the 2L phases into windows

        bytes >= sum over windows of max(0, D - C) + max(0, P - C)

    and the bound is the best partition (dynamic programming over the phases). ``C`` is every
    data cache the OS reports for this process's CPUs, all levels added up
    (:func:`onchip_cache_bytes`): counting more cache than there is only lowers the bound. When
    a step's data fit in the caches the bound is 0 bytes and no DRAM traffic is compulsory.

    At what bandwidth: :meth:`BandwidthProbe.bound_bps`, the fastest streaming pass of the same
    run at the same thread count (read-only, or triad counted with its write-allocate reads).
    No access pattern moves data between DRAM and these cores faster than streaming does;
    measured in the same run, under the same load, the division gives a time that the step
    cannot beat unless the machine's speed changed between the two measurements.
    """
    cache = onchip_cache_bytes() if cache is None else cache
    vals = _step_values(shapes, batch, act_bytes, index_bytes)
    n_phases = 2 * len(shapes)

    def window(p: int, q: int) -> float:
        before = sum(b for b, made, used, _ in vals if made < p and any(p <= u <= q for u in used))
        later = sum(b for b, made, used, kept in vals if p <= made <= q and (kept or any(u > q for u in used)))
        return max(0.0, before - cache) + max(0.0, later - cache)

    best = [0.0] + [-math.inf] * n_phases  # best[j]: best partition of phases 0..j-1
    for j in range(1, n_phases + 1):
        best[j] = max(best[i] + window(i, j - 1) for i in range(j))
    return best[n_phases]


def model_bound_bytes(model, batch: int, act_bytes: int = 4) -> float:  # noqa: ANN001
    """:func:`step_bound_bytes` of a SparseMLP (its index dtype, the machine's caches)."""
    shapes = [(l.shape[0], l.shape[1], l.nnz) for l in model.layers]
    index_bytes = min(l.weight.indices.itemsize for l in model.layers)
    return step_bound_bytes(shapes, batch, act_bytes=act_bytes, index_bytes=index_bytes)
