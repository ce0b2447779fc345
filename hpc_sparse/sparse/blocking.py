"""Cache blocking of a layer's random-access side: which columns and samples a kernel pass covers.

Both hot kernels of a layer ``W (n_in, n_out)`` touch the *output* side at random: the
forward pass scatters ``z[j, :] += w_ij * a[i, :]`` and the backward pass gathers
``delta[j, :]`` for every stored ``w_ij``. Each touch moves one row of the batch
(``batch * 4`` bytes). Once ``n_out * batch * 4`` exceeds the last-level cache, every touch
is a DRAM access and the step is bound by random traffic.

The cure is to split the output side into **column blocks** whose rows fit in the cache;
each kernel then streams the dense input-side rows once per block, sequentially. A
:class:`LayerPlan` records that choice:

* ``n_blocks``: how many column blocks (balanced by nnz) so that a block's rows fill at most a
  quarter of the last-level cache (:data:`CACHE_FRACTION`), but never so many that a block
  holds fewer than :data:`MIN_ROW_RUN` entries per input row on average: every block visits
  every input row, and below that the visits cost more than the cache misses they save;
* ``chunk``: samples per pass, the whole batch unless ``train.batch_chunk`` asks for fewer
  (a multiple of 16, one cache line of float32). Chunking lets very wide layers use smaller
  blocks, but every measured chunked plan was slower than the whole batch (see
  :data:`MIN_ROW_RUN`), so it is never chosen automatically.

The plan is a function of the layer's shape, its nnz and the batch, recomputed every step,
so a resumed run uses the plan the uninterrupted run used. The forward scatter result does
not depend on the plan at all (each ``z[j, b]`` receives its terms in the same order); the
backward's per-row sums depend on the column blocks and its weight gradients on the chunk,
at round-off level. No decision here depends on the thread count, so results never do.
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
"""A block's rows may fill ``1 / CACHE_FRACTION`` of the last-level cache. Measured on this
project's 2-core VM, whose 32 MB L3 is shared with other machines: on a 95,000-wide layer,
blocks of 6-8 MB were fastest, 12 MB blocks 20% slower and 16 MB blocks 35% slower; the streams
and the other tenants need the rest."""

MIN_ROW_RUN = 2
"""Fewest entries per input row and column block, on average, that the automatic plan allows.
On this VM, one step of 784-W-W-10 at epsilon 20 (40 entries per row), batch 128, 2 threads,
in interleaved repeats: at W = 1,000,000, 8 or 16 whole-batch blocks (5 and 2.5 entries per
row) took 30 and 29 s, 20 blocks 35 s, and the former plan, 31 blocks in two 64-sample chunks
(1.3 per row and chunk), 55 s; at W = 300,000, 19 blocks (2.1 per row) took 5.0 s against
5.5-6.3 s for 1-8 blocks."""

MAX_BLOCKS = 32
"""Upper bound on the automatic block count."""

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
class LayerPlan:
    """How a layer's kernels block their random side (see module doc).

    Attributes
    ----------
    chunk : int
        Samples per pass; equals the batch when the batch is not chunked.
    n_blocks : int
        Number of column blocks.
    block_bytes : int
        Bytes of one block's rows for one chunk (``n_out / n_blocks * chunk * 4``).
    """

    chunk: int
    n_blocks: int
    block_bytes: int

    def describe(self, batch: int) -> str:
        chunks = -(-batch // self.chunk)
        return (f"{self.n_blocks} column block(s) x {chunks} batch chunk(s) of {self.chunk} "
                f"({self.block_bytes / 2**20:.1f} MiB hot)")


def plan_layer(n_in: int, n_out: int, nnz: int, batch: int, cache_bytes: int, chunk: int = 0,
               block_columns: int = 0) -> LayerPlan:
    """Choose the chunk and column blocks for a layer ``(n_in, n_out)`` with ``nnz`` weights.

    Parameters
    ----------
    n_in, n_out : int
        Input width (streamed once per block) and output width (the random-access side).
    nnz : int
        Stored weights; with ``n_in`` it bounds the block count (:data:`MIN_ROW_RUN`).
    batch : int
        Samples in the batch.
    cache_bytes : int
        Last-level cache size; a block's rows may use ``1 / CACHE_FRACTION`` of it.
    chunk, block_columns : int
        Overrides (0 = automatic): samples per chunk (rounded to a multiple of 16 unless it is
        the batch) and columns per block.
    """
    budget = max(cache_bytes // CACHE_FRACTION, 1 << 16)
    c = batch
    if 0 < chunk < batch:
        c = max(LINE_FLOATS, chunk // LINE_FLOATS * LINE_FLOATS)
    if block_columns > 0:
        n_blocks = -(-n_out // block_columns)
    else:
        fit = -(-(n_out * c * 4) // budget)
        n_blocks = min(fit, max(1, nnz // (max(n_in, 1) * MIN_ROW_RUN)), MAX_BLOCKS)
    n_blocks = max(1, min(n_blocks, n_out))
    return LayerPlan(c, n_blocks, -(-n_out // n_blocks) * c * 4)


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
