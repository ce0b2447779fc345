"""A timing hook for :class:`~hpc_sparse.sparse.mlp.SparseMLP`: wall seconds per phase of a step.

Attach one as ``model.profile = PhaseTimer()``; the model then records every phase of
``train_step``, ``gradients`` and the evaluation forward. Detached (``None``, the default),
it costs one attribute test per phase.
"""

from __future__ import annotations

import time
from collections import defaultdict


class PhaseTimer:
    """Accumulated wall seconds per phase name (``"forward[1]"``, ``"backward[1]"``, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def lap(self, name: str, t0: float) -> float:
        """Charge ``now - t0`` to ``name``; returns now (the start of the next phase)."""
        t = time.perf_counter()
        self.seconds[name] += t - t0
        return t

    def by_kind(self) -> dict[str, float]:
        """Seconds summed over layers: ``{"forward": ..., "backward": ...}``."""
        out: dict[str, float] = defaultdict(float)
        for name, s in self.seconds.items():
            out[name.split("[")[0]] += s
        return dict(out)

    def reset(self) -> None:
        self.seconds.clear()
