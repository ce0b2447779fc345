"""Pure functions for the data order: one global permutation per (seed, epoch), cut into rank blocks,
and the batch schedules built on it (the position after a resume, WASAP-SGD's batch sequences).

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


def position_in_epoch(step_in_epoch: int, n: int, old_size: int, old_batch: int, new_size: int,
                      new_batch: int) -> int:
    """The step within the epoch at which a run saved after ``step_in_epoch`` steps on
    ``old_size`` ranks with batch ``old_batch`` continues on ``new_size`` ranks with batch
    ``new_batch``.

    The saved position is converted to the fraction of the longest rank block already
    trained (computed with the *saved* batch size), and the new position is the floor of
    that fraction in new steps: a sample may be trained twice in that epoch, none is ever
    skipped (rounding up could jump over the rest of an epoch). Same ranks and batch size:
    the position is unchanged.
    """
    if (old_size, old_batch) == (new_size, new_batch):
        return step_in_epoch
    old_longest, new_longest = -(-n // old_size), -(-n // new_size)
    done = min(step_in_epoch * old_batch, old_longest)  # samples of the longest old block trained
    # floor(done / old_longest * new_longest / new_batch), in integers
    return min(done * new_longest // (old_longest * new_batch), steps_per_epoch(n, new_size, new_batch))


def updates_per_server_epoch(n: int, size: int, batch_size: int) -> int:
    """WASAP-SGD: non-empty batches of one epoch summed over all ranks, ``sum_r ceil(n_r / batch_size)``."""
    return sum(-(-(hi - lo) // batch_size) for lo, hi in (block_bounds(n, size, r) for r in range(size)))


class AsyncBatches:
    """One rank's batches of WASAP-SGD's asynchronous phase as a sequence.

    Item ``i`` is batch ``s = i % per_epoch`` of epoch ``e = i // per_epoch`` of the rank's
    block, where ``per_epoch = ceil(block / batch_size)`` (its non-empty batches). ``self[i]``
    is ``(epoch, step, indices)`` with the sync trainer's step ``e * spe + s`` (the dropout
    counter). Any rank can compute any rank's items, so the server can take over the tail of
    a worker's sequence, and a position in it is one integer (what a checkpoint stores).
    """

    def __init__(self, n: int, size: int, rank: int, batch_size: int, seed: int, spe: int, epochs: int) -> None:
        lo, hi = block_bounds(n, size, rank)
        self.n, self.size, self.rank, self.batch_size, self.seed, self.spe = n, size, rank, batch_size, seed, spe
        self.per_epoch = -(-(hi - lo) // batch_size)
        self.length = epochs * self.per_epoch
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[int, int, np.ndarray]:
        if not 0 <= i < self.length:
            raise IndexError(f"batch {i} outside [0, {self.length})")
        epoch, s = divmod(i, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, epoch_permutation(self.n, self.seed, epoch)
        return epoch, epoch * self.spe + s, batch_indices(self._perm, self.size, self.rank, self.batch_size, s)


def stealable(limit: int, replied: int) -> int:
    """How many batches at the end of a WASAP worker's sequence the server may take over.

    The worker has taken every batch up to ``replied + 2`` (with one gradient pipelined, it
    computes batch k+1 before it reads the reply to k and k+2 only after). A new limit
    travels in the next reply (to batch ``replied + 1``), read before the worker starts
    batch ``replied + 3``: so batches ``>= replied + 3`` (and ``< limit``) are free."""
    return max(0, limit - (replied + 3))
