"""The epoch-end topology update, the same for every schedule: importance pruning (with its
log line), the RigL refresh after a pruning, SET/RigL evolution.

Used through :meth:`hpc_sparse.engine.Engine.update_topology` and
:meth:`~hpc_sparse.engine.Engine.prune`; sees the config, the model and the run's log only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hpc_sparse.config import Config
from hpc_sparse.log import RunLog
from hpc_sparse.model_builder import layer_structure
from hpc_sparse.sparse import SparseMLP
from hpc_sparse.topology import Gather, evolve_model, prune_neurons
from hpc_sparse.topology.importance import describe_pruning
from hpc_sparse.topology.schedule import drop_fraction, evolve_after_epoch, prune_neurons_after_epoch

Batch = tuple[np.ndarray, np.ndarray]


@dataclass
class TopologyUpdate:
    """What one epoch-end topology update did."""

    pruned: list[int] | None
    """Neurons pruned per hidden layer (:func:`~hpc_sparse.topology.prune_neurons`), None if
    no pruning was done."""
    evolved: bool
    evolve_seconds: float

    @property
    def changed(self) -> bool:
        return self.pruned is not None or self.evolved


def configured_shapes(cfg: Config) -> list[tuple[int, int]]:
    """The (n_in, n_out) of every weight matrix as configured: SET draws regrown values for
    these shapes, whatever importance pruning has removed since (README, "Where this differs")."""
    w = cfg.model.layers
    return list(zip(w[:-1], w[1:]))


def pruning_due(cfg: Config, epoch: int) -> bool:
    """Importance pruning is scheduled after 0-based ``epoch``."""
    imp = cfg.importance
    return prune_neurons_after_epoch(epoch, cfg.train.epochs, imp.enabled, imp.start_epoch, imp.every)


def prune(cfg: Config, log: RunLog, model: SparseMLP, when: str) -> list[int]:
    """Importance-prune ``model`` as configured and log it ("importance pruning {when}: ...")."""
    before = (list(model.widths), model.nnz)
    imp = cfg.importance
    pruned = prune_neurons(model, imp.percentile, imp.min_neurons, layer_structure(cfg), imp.mode)
    log.info(f"importance pruning {when}: " + describe_pruning(model, imp.mode, pruned, before))
    return pruned


def update_topology(cfg: Config, log: RunLog, model: SparseMLP, epoch: int, evolution: int,
                    last_batch: Callable[[], Batch | None], gather: Gather | None, prune_now: bool,
                    who: str) -> TopologyUpdate:
    """Importance pruning after 0-based ``epoch`` (if scheduled and ``prune_now``), then
    SET/RigL evolution (if scheduled) with RNG stream ``evolution``.

    RigL scores missing connections from the buffers of the model's last training step.
    Importance pruning clears them (the widths or the emptied neurons' outputs changed), so
    before evolving they are recomputed from ``last_batch()`` (x, y of this rank's last
    training batch) on the pruned model. ``gather`` exchanges RigL candidates between ranks
    that share the model (None: this rank decides alone). ``who`` names the epoch in the log ("server": "after server epoch 3")."""
    pruned = None
    if prune_now and pruning_due(cfg, epoch):
        pruned = prune(cfg, log, model, f"after {who + ' ' if who else ''}epoch {epoch + 1}")
    evolved = evolve_after_epoch(epoch, cfg.train.epochs, cfg.topology.evolve_every)
    t0 = time.perf_counter()
    if evolved:
        if cfg.topology.growth == "gradient" and model.last_batch() is None:
            batch = last_batch()
            if batch is None:
                raise RuntimeError(f"RigL growth after epoch {epoch + 1} needs a training batch of this rank, "
                                   "and it has trained none; this is a bug")
            model.gradients(*batch)  # RigL scores need this batch's activations at the new widths
        top = cfg.topology
        zeta = drop_fraction(top.growth, epoch, cfg.train.epochs, top.zeta, top.rigl_end_fraction)
        kwargs = {} if gather is None else {"gather": gather}
        evolve_model(model, zeta=zeta, growth=top.growth, seed=cfg.seed, evolution=evolution, init=cfg.model.init,
                     block_rows=top.rigl_block_rows, structure=layer_structure(cfg),
                     init_shapes=configured_shapes(cfg), **kwargs)
    return TopologyUpdate(pruned, evolved, time.perf_counter() - t0)
