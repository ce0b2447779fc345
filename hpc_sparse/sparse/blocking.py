"""Cache blocking of a layer's random-access side, chosen by a traffic model.

Both hot kernels of a layer ``W (n_in, n_out)`` touch the *output* side at random: the
forward pass scatters ``z[j, :] += w_ij * a[i, :]`` into float32 accumulator rows and the
backward pass gathers ``delta[j, :]`` (stored in the activation dtype) for every stored
``w_ij``. Each touch moves one row of the batch. Once the rows a kernel touches exceed the
last-level cache, every touch is a DRAM access and the step is bound by random traffic.

The cure is to split the output side into **column blocks** whose rows fit in the cache;
each kernel then streams the dense input side once per block. More blocks mean fewer misses
but more streaming (the input rows, and in the backward pass the float32 sums ``acc`` that
wait across blocks) and more row visits; chunks of the batch shrink the rows but stream the
weights once per chunk. :func:`layer_cost` counts what each choice moves, on both sides:

* **streamed bytes** (DRAM, sequential): the weights (CSR index and values 8 B per weight and
  chunk in the forward pass; index, values and momentum 16 B per weight and chunk in the
  backward pass, plus the new values once), the part pointers, the input side once per column
  block (activations, plus in the backward pass the float32 sums read and written), the
  output side once (activations, sign bits, deltas);
* **row bytes** (random, in the cache if the block's rows fit): one accumulator row of float32
  per weight in the forward pass, one delta row of the activation dtype in the backward pass;
* **visits**: weights per chunk and input rows per block and chunk, each with a fixed cost;
* **flops** and the **element-wise** work (activation and dropout hash per output element,
  derivative and mask per input element), which no plan changes.

Its time estimate (:class:`CostModel`, per thread) weighs them with rates measured on this
project's 2-core VM; :func:`plan_layer` picks the chunk and, separately for the forward and
the backward pass, the column blocks with the smallest estimate. ``train.batch_chunk`` and
``train.block_columns`` override the choice. :class:`LayerPlan` records it with the model's
predicted bytes and time, which ``tools/bench_width.py`` prints beside the measured time.

The plan is a function of the layer's shape, its nnz, the batch, the activation dtype and
the cache size, recomputed every step, so a resumed run uses the plan the uninterrupted run
used. The forward result does not depend on the plan at all (each ``z[j, b]`` receives its
terms in the same order); the backward's per-row sums depend on the column blocks and its
weight gradients on the chunk, at round-off level. No decision here depends on the thread
count, so results never do.
"""

from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass

import numpy as np

LINE_FLOATS = 16
"""float32 values per 64-byte cache line: the smallest useful chunk."""

CACHE_FRACTION = 4
"""Rows of one block up to ``1 / CACHE_FRACTION`` of the last-level cache count as cache hits
at full rate (:class:`CostModel`); the streams and the other tenants of this VM's shared 32 MB
L3 need the rest. Measured here on a 95,000-wide layer: blocks of 6-8 MB were fastest, 12 MB
blocks 20% slower and 16 MB blocks 35% slower."""

MAX_BLOCKS = 64
"""Upper bound on the automatic block count."""

MIN_ROW_RUN = 2
"""Fewest entries per input row and column block, on average, that the automatic plan allows:
every block visits every input row. On this VM, one step of 784-W-W-10 at epsilon 20 (40
entries per row), batch 128, 2 threads, in interleaved repeats: at W = 1,000,000, 8 or 16
whole-batch blocks (5 and 2.5 entries per row) took 30 and 29 s, 20 blocks 35 s, and 31 blocks
in two 64-sample chunks (1.3 per row and chunk) 55 s; the model alone does not see why 20
blocks lose there, so the cap stays."""


@dataclass(frozen=True)
class CostModel:
    """Rates of the time estimate, per thread, measured on this project's 2-core VM (AMD EPYC,
    Zen 3, 32 MB L3) in CPU time at one thread, on 10,000- and 95,000-wide layers at batch 128
    (docs/performance.md, "Cost per connection as layers widen", has the predicted and
    measured times of every width). Only their ratios decide a plan."""

    stream_bps: float = 20e9
    """Sequential DRAM bytes per second (the input side streamed 3, 6 or 12 times per pass cost
    what this rate predicts)."""
    row_bps: float = 20e9
    """Bytes per second of rows touched at random that hit the cache (a block within the
    budget); the forward pass reads and writes its float32 rows, the backward pass reads."""
    excess_bps: float = 10e9
    """The same for the part of a block beyond the budget that still fits in half the
    last-level cache (a 16 MB block of a 95,000-wide layer: 194 ms against 152 ms for 8 MB)."""
    miss_bps: float = 4e9
    """The same for rows beyond that: latency-bound DRAM lines."""
    flops: float = 30e9
    """Multiply-adds of the row products (2 flops each) per second."""
    visit_s: float = 5e-9
    """Fixed cost of visiting one weight in one chunk, or one input row in one block and chunk
    (index and pointer loads, loop set-up; fitted to 1-16 blocks x 16-128 samples at 10,000)."""
    chunked_weight_s: float = 50e-9
    """Extra cost per weight and chunk of a chunked backward pass (the momentum is read and
    written per chunk, the gradient reduced per chunk): 16-22 ns on a 10,000-wide layer (1 x 128
    against 2 x 64 and 4 x 32 samples), 54 ns on a 1,000,000-wide one (16 blocks, 2 x 64
    against 1 x 128 samples: 11.1 s against 6.8 s)."""
    forward_element_s: float = 1.5e-9
    """Activation, dropout hash, sign bit and store of one hidden output element."""
    backward_element_s: float = 2.5e-9
    """Derivative from the sign bit, recomputed dropout mask, store and bias sum of one
    element of the layer below."""


MODEL = CostModel()

DEFAULT_LLC_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Size of this CPU's largest cache in bytes, from sysfs (Linux), else ``DEFAULT_LLC_BYTES``.

    ``HPC_SPARSE_CACHE_BYTES`` overrides it (for tests and for machines whose cache is
    shared with other jobs).
    """
    env = os.environ.get("HPC_SPARSE_CACHE_BYTES", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    best = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
            with open(os.path.join(index, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text.rstrip("KMGkmg")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or DEFAULT_LLC_BYTES


@dataclass(frozen=True)
class PassCost:
    """What one kernel pass moves and the model's time for it (see module doc)."""

    stream_bytes: float
    row_bytes: float
    seconds: float


def _rows_seconds(touched: float, hot: float, cache: float, m: CostModel) -> float:
    """Time of ``touched`` bytes of random rows whose block has ``hot`` bytes of rows, given a
    last-level cache of ``cache`` bytes: full rate up to ``cache / CACHE_FRACTION``, a slower
    one up to half the cache (what stays of a shared cache), then DRAM misses."""
    fit = min(1.0, cache / CACHE_FRACTION / hot) if hot > 0 else 1.0
    llc = max(fit, min(1.0, cache / 2 / hot)) if hot > 0 else 1.0
    return touched * (fit / m.row_bps + (llc - fit) / m.excess_bps + (1.0 - llc) / m.miss_bps)


def forward_cost(n_in: int, n_out: int, nnz: int, batch: int, chunk: int, blocks: int, elem: int,
                 cache_bytes: int, hidden: bool = True, m: CostModel = MODEL) -> PassCost:
    """The scatter forward pass (:mod:`kernels_forward`): float32 accumulator rows of
    ``chunk`` samples at random, the input side (``elem`` bytes per element) once per block;
    ``hidden``: with activation, sign bits and the activation stored, else float32 logits."""
    chunks = -(-batch // chunk)
    stream = chunks * (8.0 * nnz + 8.0 * n_in * blocks) + blocks * n_in * batch * elem
    stream += n_out * batch * ((2 * elem + 0.25) if hidden else 8)
    touched = float(nnz) * batch * 4
    hot = -(-n_out // blocks) * chunk * 4.0
    seconds = (stream / m.stream_bps + max(2.0 * nnz * batch / m.flops, _rows_seconds(touched, hot, cache_bytes, m))
               + (chunks * (nnz + n_in * blocks)) * m.visit_s + (n_out * batch * m.forward_element_s if hidden else 0))
    return PassCost(stream, touched, seconds)


def backward_cost(n_in: int, n_out: int, nnz: int, batch: int, chunk: int, blocks: int, elem: int,
                  cache_bytes: int, grad_input: bool = True, m: CostModel = MODEL) -> PassCost:
    """The fused backward pass (:mod:`kernels_backward`): delta rows of ``chunk`` samples
    (``elem`` bytes each) gathered at random, the input side once per block (a_prev and, with
    ``grad_input``, the float32 sums read and written), the new values and momentum."""
    chunks = -(-batch // chunk)
    stream = chunks * (16.0 * nnz + 8.0 * n_in * blocks) + 4.0 * nnz + n_out * batch * elem
    stream += blocks * n_in * batch * (elem + (8 if grad_input else 0))
    if grad_input:
        stream += n_in * batch * (0.125 + (4 * elem if elem < 4 else 0))  # sign bits; a separate store
    touched = float(nnz) * batch * elem
    hot = -(-n_out // blocks) * chunk * float(elem)
    flops = (4.0 if grad_input else 2.0) * nnz * batch
    seconds = (stream / m.stream_bps + max(flops / m.flops, _rows_seconds(touched, hot, cache_bytes, m))
               + (chunks * (nnz + n_in * blocks)) * m.visit_s + (chunks * nnz * m.chunked_weight_s if chunks > 1 else 0)
               + (n_in * batch * m.backward_element_s if grad_input else 0))
    return PassCost(stream, touched, seconds)


@dataclass(frozen=True)
class LayerPlan:
    """How a layer's kernels block their random side, and what the traffic model predicts.

    Attributes
    ----------
    chunk : int
        Samples per pass; equals the batch when the batch is not chunked.
    n_blocks : int
        Column blocks of the backward pass.
    block_bytes : int
        Bytes of one backward column block's gathered rows for one chunk.
    forward_blocks : int
        Column blocks of the forward pass (its rows are float32 accumulators, so in bfloat16
        it may want more than the backward pass).
    stream_bytes, row_bytes, seconds : float
        The model's prediction for one training step of this layer (:func:`layer_cost`):
        sequential DRAM bytes, bytes of rows touched at random, time at one thread.
    """

    chunk: int
    n_blocks: int
    block_bytes: int
    forward_blocks: int = 0
    stream_bytes: float = 0.0
    row_bytes: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.forward_blocks == 0:
            object.__setattr__(self, "forward_blocks", self.n_blocks)

    def describe(self, batch: int) -> str:
        chunks = -(-batch // self.chunk)
        blocks = (f"{self.n_blocks} column block(s)" if self.forward_blocks == self.n_blocks
                  else f"{self.forward_blocks} forward / {self.n_blocks} backward column blocks")
        return (f"{blocks} x {chunks} batch chunk(s) of {self.chunk} "
                f"({self.block_bytes / 2**20:.1f} MiB hot)")


@functools.lru_cache(maxsize=1024)
def plan_layer(n_in: int, n_out: int, nnz: int, batch: int, cache_bytes: int, chunk: int = 0,
               block_columns: int = 0, elem_bytes: int = 4, first: bool = False, last: bool = False) -> LayerPlan:
    """Choose the chunk and the column blocks of both passes of a layer ``(n_in, n_out)`` with
    ``nnz`` weights: the smallest time of the traffic model over chunks of 16, 32, ... samples
    and the batch, and 1 .. :data:`MAX_BLOCKS` blocks per pass (at least :data:`MIN_ROW_RUN`
    entries per input row and block).

    Parameters
    ----------
    n_in, n_out : int
        Input width (streamed once per block) and output width (the random-access side).
    nnz : int
        Stored weights.
    batch : int
        Samples in the batch.
    cache_bytes : int
        Last-level cache size.
    chunk, block_columns : int
        Overrides (0 = automatic): samples per chunk (rounded to a multiple of 16 unless it is
        the batch) and columns per block (both passes).
    elem_bytes : int
        Bytes per stored activation element: 4 (float32) or 2 (bfloat16).
    first, last : bool
        The network's first layer (its backward pass has no gradient to pass down) and last
        layer (its forward pass writes float32 logits, without activation).

    A pure function of its arguments, memoised: a plan is recomputed every step, and a layer
    whose nnz changes (topology evolution) gets a new one.
    """
    if 0 < chunk < batch:
        chunks = [max(LINE_FLOATS, chunk // LINE_FLOATS * LINE_FLOATS)]
    elif chunk >= batch:
        chunks = [batch]
    else:
        chunks = sorted({batch, *range(LINE_FLOATS, batch, LINE_FLOATS)})
    if block_columns > 0:
        candidates = [max(1, min(-(-n_out // block_columns), n_out))]
    else:
        cap = min(MAX_BLOCKS, n_out, max(1, nnz // (max(n_in, 1) * MIN_ROW_RUN)))
        candidates = list(range(1, cap + 1))
    best = None
    for c in chunks:
        fwd = min(((forward_cost(n_in, n_out, nnz, batch, c, j, elem_bytes, cache_bytes, not last), j)
                   for j in candidates), key=lambda cj: cj[0].seconds)
        bwd = min(((backward_cost(n_in, n_out, nnz, batch, c, j, elem_bytes, cache_bytes, not first), j)
                   for j in candidates), key=lambda cj: cj[0].seconds)
        total = fwd[0].seconds + bwd[0].seconds
        if best is None or total < best[0]:
            best = (total, c, fwd, bwd)
    total, c, (fc, jf), (bc, jb) = best
    return LayerPlan(c, jb, -(-n_out // jb) * c * elem_bytes, jf, fc.stream_bytes + bc.stream_bytes,
                     fc.row_bytes + bc.row_bytes, total)


def balanced_bounds(col_counts: np.ndarray, n_parts: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Boundaries ``(n_parts + 1,)`` int64 splitting columns ``[lo, hi)`` into ``n_parts`` ranges
    of about equal nnz (``col_counts[j]`` entries in column j); ranges may be empty."""
    hi = col_counts.size if hi is None else hi
    csum = np.concatenate([[0], np.cumsum(col_counts[lo:hi], dtype=np.int64)])
    targets = csum[-1] * np.arange(n_parts + 1, dtype=np.float64) / n_parts
    bounds = lo + np.searchsorted(csum, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = lo, hi
    return np.maximum.accumulate(bounds)


def part_bounds(col_counts: np.ndarray, n_blocks: int, threads: int) -> np.ndarray:
    """Column boundaries ``(n_blocks * threads + 1,)``: ``n_blocks`` blocks balanced by nnz, each
    split into ``threads`` parts balanced by nnz. Block boundaries (every ``threads``-th entry)
    do not depend on ``threads``."""
    blocks = balanced_bounds(col_counts, n_blocks)
    out = [np.array([0], np.int64)]
    for q in range(n_blocks):
        out.append(balanced_bounds(col_counts, threads, int(blocks[q]), int(blocks[q + 1]))[1:])
    return np.concatenate(out)
