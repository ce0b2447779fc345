"""Momentum SGD hyperparameters. The state (velocities) lives in each layer, aligned to its nnz."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SGD:
    """``v <- mu*v - lr*g``; ``w <- w + v - decay*w`` (Nesterov: ``w + mu*v - lr*g - decay*w``).

    ``decay`` is not scaled by ``lr``, as in the paper's code (PAPER.md §0). Biases use
    the same rule. ``lr`` may be changed between steps (e.g. by a warm-up schedule).
    """

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
