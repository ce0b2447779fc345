"""Momentum SGD hyperparameters. The state (velocities) lives in each layer, aligned to its nnz."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SGD:
    """``g <- g + weight_decay*w``; ``v <- mu*v - lr*g``; ``w <- w + v`` (Nesterov: ``w + mu*v - lr*g``).

    Weight decay is the usual coupled L2 term (as PyTorch's SGD), not the paper code's
    ``w <- w - lambda*w`` unscaled by lr (see README: at lambda=2e-4 that form shrinks the
    weights ~9% per Fashion-MNIST epoch and measured lower accuracy). Biases use the same
    rule. ``lr`` may be changed between steps.
    """

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
