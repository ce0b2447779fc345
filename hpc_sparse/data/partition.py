"""Pure functions for the data order: one global permutation per (seed, epoch), cut into rank blocks.

Each rank trains on the contiguous block ``block_bounds(n, size, rank)`` of the epoch's
permutation, in batches of ``batch_size``. Every rank runs the same number of steps per
epoch (:func:`steps_per_epoch`); a rank whose block is shorter gets a smaller (possibly
empty) last batch. So each sample is seen exactly once per epoch across all ranks, for
any number of ranks.
"""

from __future__ import annotations

import numpy as np


def block_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s block when ``n`` items are split into ``size`` blocks
    whose lengths differ by at most one (the first ``n % size`` blocks are longer)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside [0, {size})")
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of ``epoch``: a permutation of ``range(n)`` (int64), a pure
    function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, 0xDA7A, epoch]).permutation(n)


def steps_per_epoch(n: int, size: int, batch_size: int) -> int:
    """Steps every rank runs per epoch: enough batches for the longest block."""
    longest = -(-n // size)
    return max(1, -(-longest // batch_size))


def batch_indices(perm: np.ndarray, size: int, rank: int, batch_size: int, step: int) -> np.ndarray:
    """Sample indices of rank ``rank``'s batch number ``step`` (0-based within the epoch)."""
    lo, hi = block_bounds(perm.size, size, rank)
    start = min(hi, lo + step * batch_size)
    return perm[start:min(hi, start + batch_size)]
