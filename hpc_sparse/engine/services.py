"""What every command that trains or reads a model needs, besides the engine itself: numba's
thread count, the dataset as a run sees it, and the (collective) evaluation of a model."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import numpy as np

from hpc_sparse.config import Config
from hpc_sparse.data import Dataset, block_bounds, load_recipe
from hpc_sparse.data.recipes import make_recipe
from hpc_sparse.engine.failure import agreed
from hpc_sparse.parallel import comm as pc
from hpc_sparse.parallel import node_build
from hpc_sparse.sparse import SparseMLP


def configure_threads(cfg: Config, comm: Any) -> int:
    """Set numba's thread count: config, else HPC_SPARSE_THREADS, else cores/ranks on the node."""
    import numba

    on_node = pc.ranks_on_node(comm)  # a collective: on every rank, whatever the environment says
    n = cfg.train.threads or int(os.environ.get("HPC_SPARSE_THREADS", "0") or 0) or pc.default_threads(on_node)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def load_data(cfg: Config, comm: Any = None) -> Dataset:
    """The dataset ``cfg.data`` describes, loaded and preprocessed as a run sees it
    (:func:`~hpc_sparse.data.load_dataset`). Collective over
    ``comm`` (None: this process alone): a missing cache entry is built once per node (or
    once, on a folder every rank sees) while the other ranks wait, then every rank maps it."""
    args = asdict(cfg.data)
    augment, cache_dir = args.pop("augment"), args.pop("cache_dir")
    if comm is None:
        return load_recipe(make_recipe(**args), augment, cache_dir)
    # Finding the sources takes no collective, so its errors (a missing folder or file) are
    # agreed before the cache's collectives: one line and status 2, not one line per rank.
    recipe = agreed(comm, lambda: make_recipe(**args))
    return load_recipe(recipe, augment, cache_dir, node_build.coordinator(comm))


def evaluate(model: SparseMLP, data: Dataset, comm: Any, batch_size: int, polled: bool = False
             ) -> tuple[float, float]:
    """Mean test loss and accuracy (a fraction) of ``model`` on ``data.x_test``.

    Each rank of ``comm`` evaluates its block of the test set, in batches of ``batch_size``
    samples, with its own ``model`` (a replica, or its own model); the sums of loss, hits and
    counts are reduced exactly (``polled``: with a polled reduction), so any number of ranks
    reports the same figures for a replica. Collective: every rank of ``comm`` must call it."""
    lo, hi = block_bounds(data.x_test.shape[0], comm.Get_size(), comm.Get_rank())
    r = model.evaluate(data.x_test[lo:hi], data.y_test[lo:hi], batch_size)
    tot = np.array([r.loss_sum, r.correct, r.count], np.float64)
    if polled:
        pc.allreduce_sum_polled(comm, tot, "the other ranks' test figures")
    else:
        pc.allreduce_sum_(comm, tot)
    return float(tot[0] / max(tot[2], 1)), float(tot[1] / max(tot[2], 1))
