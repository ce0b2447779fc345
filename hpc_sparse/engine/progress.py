"""Where a run is: a few integers (and the epoch's running loss sums), which with the
counter-based RNGs (data order, dropout and topology are pure functions of the seed and
these counters) are the whole RNG state a checkpoint needs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """The run's position. A schedule may count ``step`` its own way (WASAP-SGD: batches
    over all ranks); checkpoint folders are named after it, so it only grows."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    evolutions: int = 0
    last_save_step: int = 0
    # global (all-rank) sums of the current epoch's training loss so far
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_count: int = 0

    def complete(self, epochs: int, max_steps: int = 0) -> bool:
        """True once the run has trained ``epochs`` epochs (and no step of the next), or
        ``max_steps`` steps (0: no limit). The one test of "the run is complete", for a
        training run and for a checkpoint's saved progress alike."""
        return (self.epoch >= epochs and self.step_in_epoch == 0) or (max_steps > 0 and self.step >= max_steps)
