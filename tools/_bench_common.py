"""Shared helpers for the benchmark tools: thread control, the machine's measured bound
(STREAM triad bandwidth, float32 GEMM peak), RSS readings, timing and JSON output.

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


def stream_triad_bandwidth(n: int = 1 << 25, repeats: int = 7) -> float:
    """Best-of STREAM triad ``a = b + s*c`` over float64 arrays of ``n`` elements (256 MiB each
    by default, far above any cache), counted as 24 bytes per element (STREAM's rule).
    Runs at the current numba thread count. Returns bytes/second."""
    a = np.zeros(n)
    b = np.ones(n)
    c = np.full(n, 2.0)
    _triad(a, b, c, 3.0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _triad(a, b, c, 3.0)
        best = min(best, time.perf_counter() - t0)
    return 24.0 * n / best


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


def triad_step(n: int = 1 << 25) -> tuple[Callable[[], None], float]:
    """One STREAM triad pass over float64 arrays of ``n`` elements, as a closure, and the bytes
    it counts (24 per element), for timing side by side with other steps."""
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    return (lambda: _triad(a, b, c, 3.0)), 24.0 * n


def gemm_step(n: int = 2048) -> tuple[Callable[[], None], float]:
    """One float32 n x n matmul at the current BLAS thread count, as a closure, and its flops."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * n ** 3


def machine_bound(threads: int) -> dict[str, float]:
    """STREAM-triad bandwidth and GEMM peak at ``threads`` threads, measured now."""
    set_threads(threads)
    return {"stream_triad_GBps": stream_triad_bandwidth() / 1e9, "gemm_peak_GFLOPps": gemm_peak() / 1e9}


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
def layer_bound_bytes(n_in: int, n_out: int, nnz: int, batch: int, cache: int) -> float:
    """Bytes one training step must move for one layer (n_in, n_out, nnz) at ``batch`` samples,
    given a last-level cache of ``cache`` bytes: the best batch chunk ``c`` of the cache-blocked
    scheme, with the output side in column blocks whose rows fit in the cache. The formula is
    written out in ``tools/bench_width.py``'s docstring."""
    best = math.inf
    rows = 13 * n_out * batch
    for c in sorted({*range(16, batch, 16), batch}):
        chunks = batch / c
        if n_out * min(c, 16) * 4 > cache:  # not even one line per row fits: every gather misses
            b = 2 * nnz * (batch / 16) * 64 + 28 * nnz * chunks + 16 * n_in * batch + rows
        else:
            blocks = max(1, math.ceil(n_out * c * 4 / cache))
            b = chunks * 28 * nnz + blocks * 16 * n_in * batch + rows
        best = min(best, b)
    return best
