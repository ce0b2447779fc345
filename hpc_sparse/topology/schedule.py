"""When the topology changes: pure functions of integer epochs (no floating-point intervals)."""

from __future__ import annotations


from hpc_sparse.topology.rigl import drop_fraction as rigl_drop_fraction


def evolve_after_epoch(epoch: int, epochs: int, evolve_every: int) -> bool:
    """SET/RigL evolution after 0-based ``epoch``: every ``evolve_every`` epochs, never after the last."""
    return evolve_every > 0 and (epoch + 1) % evolve_every == 0 and epoch < epochs - 1


def prune_neurons_after_epoch(epoch: int, epochs: int, enabled: bool, start_epoch: int, every: int) -> bool:
    """Importance pruning after 0-based ``epoch`` (paper: ``epoch % every == 0 and epoch > start``),
    never after the last epoch."""
    return enabled and epoch > start_epoch and epoch % every == 0 and epoch < epochs - 1


def drop_fraction(growth: str, epoch: int, epochs: int, zeta: float, end_fraction: float) -> float:
    """The fraction of connections replaced after ``epoch``: constant ``zeta`` for SET,
    cosine-decayed for RigL growth."""
    if growth == "gradient":
        return rigl_drop_fraction(epoch, epochs, zeta, end_fraction)
    return zeta


def steps_in_epochs(epochs: int, steps_per_epoch: int) -> int:
    """Total steps of a run (integer arithmetic)."""
    return int(epochs) * int(steps_per_epoch)


__all__ = ["drop_fraction", "evolve_after_epoch", "prune_neurons_after_epoch", "steps_in_epochs"]
