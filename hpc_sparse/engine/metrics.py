"""The metrics record of one epoch: one dataclass, written by one writer (:meth:`Engine.record`).

``metrics.jsonl`` holds one :meth:`EpochRecord.to_json` line per epoch; the checkpoints'
``history`` and ``summary.json`` are built from the same lines. A schedule adds its own
figures as one of the optional groups (they appear as flat keys; an absent group adds none):

* :class:`Traffic`: sync mode's replica averaging (``comm_share``, ``bytes_per_sync``);
* :class:`AsyncFigures`: a server epoch of WASAP-SGD's asynchronous phase;
* :class:`MergeFigures`: the epoch that ends with WASAP-SGD's merge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Traffic:
    """Sync mode's averaging during one epoch."""

    comm_share: float
    """Share of the epoch's training time spent in the averaging Allreduce."""
    bytes_per_sync: int
    """float32 bytes each rank reduces per sync point."""


@dataclass(frozen=True)
class AsyncFigures:
    """A server epoch of WASAP-SGD's asynchronous phase (rank 0's view)."""

    updates: int
    """Updates applied in the server epoch (rank 0's own steps and the workers' gradients)."""
    stale_updates: int
    """Workers' gradients computed on an older topology (carried over to the current one)."""
    dropped_updates: int
    """Workers' gradients whose layer widths no longer exist (importance pruning since)."""
    server_wait_share: float
    """Share of the epoch rank 0 spent waiting (polling with back-off)."""
    bytes_per_update: float
    """Message bytes rank 0 sent and received per update."""


@dataclass(frozen=True)
class MergeFigures:
    """WASAP-SGD's merge at the end of the last epoch."""

    merge_seconds: float
    merge_repruned_fraction: float
    """Mean fraction (over layers) of the union's entries the re-pruning to the phase-1 nnz removed."""
    local_test_loss: float
    """The local models' test figures just before the merge (each rank's on its block, summed)."""
    local_test_accuracy: float


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's metrics (losses are means per sample, accuracies fractions, times seconds)."""

    epoch: int
    """1-based number of the epoch just trained."""
    step: int
    train_loss: float
    train_accuracy: float | None
    """None when some updates did not report their hits (WASAP-SGD's workers)."""
    test_loss: float
    test_accuracy: float
    nnz: int
    neurons: int
    """Hidden neurons."""
    widths: list[int]
    epoch_seconds: float
    train_seconds: float
    evolve_seconds: float
    samples_per_second: float
    ranks: int
    phase: str | None = None
    """The schedule's phase ("async", "local", "merge"); None where a schedule has none."""
    traffic: Traffic | None = None
    asynchronous: AsyncFigures | None = None
    merge: MergeFigures | None = None

    def to_json(self) -> dict[str, Any]:
        """The metrics.jsonl line: every field that is not None, the groups' fields flattened."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in ("traffic", "asynchronous", "merge"):
                out.update(asdict(value))
            else:
                out[f.name] = value
        return out

    def details(self) -> str:
        """The log line's schedule-specific ending."""
        out = ""
        if self.traffic is not None and self.ranks > 1:
            out += f", comm {100 * self.traffic.comm_share:.1f}%, {self.traffic.bytes_per_sync:,} B/sync"
        if self.asynchronous is not None:
            a = self.asynchronous
            out += f", {a.updates} updates, {a.stale_updates} stale, {a.dropped_updates} dropped"
        if self.merge is not None:
            out += f", merged; the local models had test_acc {self.merge.local_test_accuracy:.4f}"
        return out


def describe(entry: dict[str, Any], details: str, epochs: int) -> str:
    """The log line of one record (``entry``: its JSON)."""
    tag = f" ({entry['phase']})" if entry.get("phase") else ""
    return (f"epoch {entry['epoch']}/{epochs}{tag}: train_loss {entry['train_loss']:.4f} "
            f"test_loss {entry['test_loss']:.4f} test_acc {entry['test_accuracy']:.4f} nnz {entry['nnz']:,} "
            f"neurons {entry['neurons']:,} {entry['epoch_seconds']:.2f}s "
            f"({entry['samples_per_second']:.0f} samples/s{details})")


def diverged(where: str, lr: float) -> str:
    """The message of a training run whose loss became NaN or inf ``where`` ("at step 12",
    "in epoch 3")."""
    return (f"training diverged {where} (loss is NaN or inf); fix: lower train.lr (now {lr}); the last good "
            "checkpoint is kept")
