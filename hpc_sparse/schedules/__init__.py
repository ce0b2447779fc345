"""Training modes as schedules on the one engine (:mod:`hpc_sparse.engine`).

A schedule decides who trains which batch and when replicas meet; everything else is the
engine's. ``parallel.mode`` picks one: :func:`schedule_for`.
"""

from __future__ import annotations

from hpc_sparse.engine import Schedule
from hpc_sparse.schedules.sync import SyncSchedule


def schedule_for(mode: str) -> Schedule:
    """The schedule of ``parallel.mode``: "sync" (:class:`SyncSchedule`) or "wasap"
    (:class:`~hpc_sparse.schedules.wasap.WasapSchedule`)."""
    if mode == "sync":
        return SyncSchedule()
    if mode == "wasap":
        from hpc_sparse.schedules.wasap import WasapSchedule

        return WasapSchedule()
    raise ValueError(f"unknown parallel.mode {mode!r}")


__all__ = ["Schedule", "SyncSchedule", "schedule_for"]
