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
from hpc_sparse.topology.evolution import Pruned, evolve_set, grow, prune_by_mask, removed_coordinates, set_keep_mask
from hpc_sparse.topology.importance import prune_neurons
from hpc_sparse.topology.init import erdos_renyi, init_values
from hpc_sparse.topology.structure import NMStructure, full_group_slots
from hpc_sparse.topology.structured_growth import accept_in_order, group_slots, pattern_coordinates, random_valid_slots

Gather = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, int]]


def _serial_gather(lin: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    return lin, val, 1


def topology_rng(seed: int, evolution: int, layer: int) -> np.random.Generator:
    """The shared RNG stream of one layer's update: the same on every rank."""
    return np.random.default_rng([seed, 0x5E7, evolution, layer])


def evolve_model(model: SparseMLP, *, zeta: float, growth: str, seed: int, evolution: int, init: str,
                 block_rows: int = 256, gather: Gather = _serial_gather,
                 structure: NMStructure | None = None,
                 init_shapes: list[tuple[int, int]] | None = None) -> list[int]:
    """Evolve every hidden weight matrix (W^1..W^{L-1}; the output matrix is never evolved,
    as in the paper's code). Returns the number of connections replaced per layer.

    growth='random' is SET, its new values drawn from ``init`` for the layer's shape in
    ``init_shapes`` (the configured shapes, whatever importance pruning removed; None: the
    current shapes); growth='gradient' is RigL growth from the last training batch (new
    weights start at 0, as in RigL). With ``structure`` every evolved layer keeps that N:M
    constraint: see :func:`evolve_set` and :func:`_structured_rigl_growth`.
    """
    replaced = []
    batch = model.last_batch() if growth == "gradient" else None
    if growth == "gradient" and batch is None:
        raise RuntimeError("RigL growth needs a training step first (no batch activations)")
    for l, layer in enumerate(model.layers[:-1]):
        rng = topology_rng(seed, evolution, l)
        if growth == "random":
            replaced.append(evolve_set(layer, zeta, rng, init, structure, init_shapes[l] if init_shapes else None))
            continue
        inputs, deltas = batch  # type: ignore[misc]
        keep = set_keep_mask(layer.weight.data, zeta)
        removed = removed_coordinates(layer, keep) if structure is not None else None
        pruned = prune_by_mask(layer, keep)
        if structure is None:
            lin, val = rigl.candidates(pruned, inputs[l], deltas[l], pruned.removed, block_rows)
            all_lin, all_val, n_ranks = gather(lin, val)
            chosen = rigl.select_growth(all_lin, all_val, pruned.removed, n_ranks)
            rows, cols = np.divmod(chosen, layer.shape[1])
        else:
            def full(r0: int, r1: int, p=pruned) -> tuple[np.ndarray, np.ndarray]:
                return full_group_slots(p.indptr, p.indices, p.shape, structure, r0, r1)

            # twice the candidates: some of them compete for the last room of one group
            lin, val = rigl.candidates(pruned, inputs[l], deltas[l], 2 * pruned.removed, block_rows, full)
            all_lin, all_val, n_ranks = gather(lin, val)
            ranked = rigl.rank_candidates(all_lin, all_val, n_ranks)
            rows, cols = _structured_rigl_growth(rng, pruned, ranked, structure, removed)  # type: ignore[arg-type]
        grow(layer, pruned, rows, cols, np.zeros(rows.size, np.float32))
        replaced.append(pruned.removed)
    return replaced


def _structured_rigl_growth(rng: np.random.Generator, pruned: Pruned, ranked: np.ndarray,
                            structure: NMStructure, removed: tuple[np.ndarray, np.ndarray]
                            ) -> tuple[np.ndarray, np.ndarray]:
    """RigL growth under N:M: walk the ranked candidates (best mean |gradient| first) and take
    each one whose groups still have room, until ``pruned.removed`` are taken; if the lists run
    out first, the rest grow at random valid slots (SET's rule, from the shared ``rng``).
    Depends only on data every rank has (the gathered lists, the pattern, the shared RNG)."""
    n_out = pruned.shape[1]
    occ_r, occ_c = pattern_coordinates((pruned.indptr, pruned.indices))
    r, c = np.divmod(ranked.astype(np.int64), n_out)
    ok = accept_in_order(occ_r, occ_c, r, c, n_out, structure, pruned.removed)
    rows, cols = r[ok], c[ok]
    missing = pruned.removed - rows.size
    if missing > 0:
        occ_r, occ_c = np.concatenate([occ_r, rows]), np.concatenate([occ_c, cols])
        more = random_valid_slots(rng, occ_r, occ_c, pruned.shape, structure, missing,
                                  lambda: group_slots(removed[0], removed[1], pruned.shape, structure), strict=False)
        rows, cols = np.concatenate([rows, more[0]]), np.concatenate([cols, more[1]])
    order = np.argsort(rows * n_out + cols, kind="stable")
    return rows[order], cols[order]


__all__ = ["Gather", "NMStructure", "erdos_renyi", "evolve_model", "init_values", "prune_neurons", "topology_rng"]
