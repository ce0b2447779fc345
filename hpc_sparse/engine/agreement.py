"""The one agreement of the ranks at a meeting point: stop, save, divergence, and sums.

At every meeting point of a schedule (sync mode's sync points, WASAP-SGD's rounds and
snapshots, every epoch end) the ranks agree with one SUM reduction of a float64 vector laid
out here once: the flags ``stop`` (some rank was asked to stop), ``save_due`` (a checkpoint
is due, on the step count or on rank 0's clock) and ``nonfinite`` (some rank's training loss
is NaN or inf), then whatever figures the caller sums over the ranks. A flag is true when
any rank set it.

The reduction is blocking (``Allreduce``, when the ranks arrive together, as replicas that
average do) or polled (``Iallreduce`` + sleeping back-off, when they may arrive far apart, as
in WASAP-SGD's local phase, so that an early rank does not spin a core): the same fields
either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hpc_sparse.parallel import comm as pc

_FLAGS = 3  # stop, save_due, nonfinite


@dataclass(frozen=True)
class Agreement:
    """What the ranks agreed at a meeting point (the same on every rank)."""

    stop: bool
    """Some rank was asked to stop (SIGUSR1/SIGTERM)."""
    save_due: bool
    """A checkpoint is due (``checkpoint.every_steps``, or ``every_seconds`` on rank 0's clock)."""
    nonfinite: bool
    """Some rank's training loss is NaN or inf."""
    figures: np.ndarray
    """float64: the element-wise sums over the ranks of the figures each rank passed."""


def agree(comm: object, *, stop: bool, save_due: bool, nonfinite: bool = False, figures: Sequence[float] = (),
          polled: bool = False) -> Agreement:
    """One SUM reduction over ``comm`` of this rank's flags and ``figures``; see the module
    docstring. Collective: every rank passes the same number of figures."""
    buf = np.array([float(stop), float(save_due), float(nonfinite), *figures], np.float64)
    if polled:
        pc.allreduce_sum_polled(comm, buf, "the other ranks at a meeting point")
    else:
        pc.allreduce_sum_(comm, buf)
    return Agreement(bool(buf[0]), bool(buf[1]), bool(buf[2]), buf[_FLAGS:])
