"""Momentum SGD hyperparameters. The state (velocities) lives in each layer, aligned to its nnz."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_sparse.sparse import kernels_backward


@dataclass
class SGD:
    """``v <- (mu*v - lr*weight_decay*w) - lr*g``; ``w <- w + v`` (Nesterov: ``w + mu*v - lr*(g + weight_decay*w)``).

    Weight decay is the usual coupled L2 term (as PyTorch's SGD), not the paper code's
    ``w <- w - lambda*w`` unscaled by lr (see docs/paper-differences.md: at lambda=2e-4 that form shrinks the
    weights ~9% per Fashion-MNIST epoch and measured lower accuracy). Biases use the same
    rule. ``lr`` may be changed between steps.

    The rule has one definition, ``kernels_backward.sgd_step``: the fused training kernels apply
    it (spreading it over the batch chunks of very wide layers), and :meth:`apply_` applies it
    to a gradient computed elsewhere (WASAP-SGD's server).
    """

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0

    def apply_(self, w: np.ndarray, v: np.ndarray, g: np.ndarray) -> None:
        """One step in place on the float32 vectors ``w`` (values), ``v`` (their momentum),
        given the gradient ``g``, all of one length (a layer's nnz, or its n_out for a bias)."""
        if not (w.shape == v.shape == g.shape):
            raise ValueError(f"SGD.apply_: shapes {w.shape}, {v.shape}, {g.shape} differ")
        kernels_backward.dense_sgd_update(g, w, v, np.float32(self.lr), np.float32(self.momentum),
                                 np.float32(self.weight_decay), self.nesterov)
