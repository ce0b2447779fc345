"""Which connections exist: Erdős–Rényi init, SET/RigL evolution, importance pruning, schedules.

Never sees a communicator. Where a decision needs data that differs between ranks
(RigL's gradient scores), the caller passes a ``gather`` function that concatenates
every rank's candidate arrays (the MPI one lives in :mod:`hpc_sparse.parallel`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hpc_sparse.sparse.mlp import SparseMLP
from hpc_sparse.topology import rigl
from hpc_sparse.topology.evolution import evolve_set, grow, prune_by_mask, set_keep_mask
from hpc_sparse.topology.importance import prune_neurons
from hpc_sparse.topology.init import erdos_renyi, init_values

Gather = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, int]]


def _serial_gather(lin: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    return lin, val, 1


def topology_rng(seed: int, evolution: int, layer: int) -> np.random.Generator:
    """The shared RNG stream of one layer's update: the same on every rank."""
    return np.random.default_rng([seed, 0x5E7, evolution, layer])


def evolve_model(model: SparseMLP, *, zeta: float, growth: str, seed: int, evolution: int, init: str,
                 block_rows: int = 256, gather: Gather = _serial_gather) -> list[int]:
    """Evolve every hidden weight matrix (W^1..W^{L-1}; the output matrix is never evolved,
    as in the paper's code). Returns the number of connections replaced per layer.

    growth='random' is SET; growth='gradient' is RigL growth from the last training batch
    (new weights start at 0, as in RigL).
    """
    replaced = []
    batch = model.last_batch() if growth == "gradient" else None
    if growth == "gradient" and batch is None:
        raise RuntimeError("RigL growth needs a training step first (no batch activations)")
    for l, layer in enumerate(model.layers[:-1]):
        rng = topology_rng(seed, evolution, l)
        if growth == "random":
            replaced.append(evolve_set(layer, zeta, rng, init))
            continue
        inputs, deltas = batch  # type: ignore[misc]
        pruned = prune_by_mask(layer, set_keep_mask(layer.weight.data, zeta))
        lin, val = rigl.candidates(pruned, inputs[l], deltas[l], pruned.removed, block_rows)
        all_lin, all_val, n_ranks = gather(lin, val)
        chosen = rigl.select_growth(all_lin, all_val, pruned.removed, n_ranks)
        rows, cols = np.divmod(chosen, layer.shape[1])
        grow(layer, pruned, rows, cols, np.zeros(rows.size, np.float32))
        replaced.append(pruned.removed)
    return replaced


__all__ = ["Gather", "erdos_renyi", "evolve_model", "init_values", "prune_neurons", "topology_rng"]
