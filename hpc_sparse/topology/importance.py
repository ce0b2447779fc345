"""Importance pruning of hidden neurons (Curci, Mocanu, Pechenizkiy 2021).

Metric (PAPER.md §3, from the paper's code ``wasap_sgd/train/model.py``): the importance
of neuron j of hidden layer k is the absolute sum of its incoming weights,
``I_j = sum_i |W^k_ij|`` (a column sum of the layer's weight). Neurons with
``I_j <= t``, t being the q-th percentile (numpy, linear interpolation) of I over the
layer (empty neurons included), are pruned.

The paper's code only empties a pruned neuron's incoming column. Here the neuron is then
removed: its column in ``W^k``, its bias, and its row in ``W^{k+1}``. A neuron without
incoming weights outputs the constant ``f(b_j)`` at evaluation, so
``f(b_j) * W^{k+1}[j, :]`` is folded into ``b^{k+1}`` first: the evaluation output of the
network is the same as with the paper's emptied columns, and the widths really shrink.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from hpc_sparse.sparse.activations import Activation
from hpc_sparse.sparse.linear import SparseLinear
from hpc_sparse.sparse.mlp import SparseMLP
from hpc_sparse.topology.structure import NMStructure, enforce_structure


def neuron_importance(layer: SparseLinear) -> np.ndarray:
    """``I_j = sum_i |W_ij|`` for every output neuron of ``layer``: (n_out,) float64."""
    w = layer.weight
    return np.bincount(w.indices, weights=np.abs(w.data.astype(np.float64)), minlength=w.shape[1])


def select_pruned(importance: np.ndarray, percentile: float, min_neurons: int) -> np.ndarray:
    """Indices of neurons with importance <= the percentile, keeping at least ``min_neurons``
    (the most important ones, ties by lower index)."""
    n = importance.size
    if n == 0:
        return np.empty(0, np.int64)
    t = np.percentile(importance, percentile)
    pruned = np.flatnonzero(importance <= t)
    max_prune = max(0, n - min_neurons)
    if pruned.size > max_prune:
        order = np.lexsort((pruned, importance[pruned]))  # least important first
        pruned = np.sort(pruned[order[:max_prune]])
    return pruned


def _drop_columns(w: sp.csr_matrix, velocity: np.ndarray, cols: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    keep_col = np.ones(w.shape[1], bool)
    keep_col[cols] = False
    new_index = np.cumsum(keep_col) - 1
    keep = keep_col[w.indices]
    n_in = w.shape[0]
    row_of = np.repeat(np.arange(n_in), np.diff(w.indptr))
    indptr = np.zeros(n_in + 1, np.int64)
    np.cumsum(np.bincount(row_of[keep], minlength=n_in), out=indptr[1:])
    out = sp.csr_matrix((w.data[keep], new_index[w.indices[keep]], indptr),
                        shape=(n_in, int(keep_col.sum())))
    return out, velocity[keep]


def _drop_rows(w: sp.csr_matrix, velocity: np.ndarray, rows: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    keep_row = np.ones(w.shape[0], bool)
    keep_row[rows] = False
    counts = np.diff(w.indptr)
    keep = np.repeat(keep_row, counts)
    indptr = np.zeros(int(keep_row.sum()) + 1, np.int64)
    np.cumsum(counts[keep_row], out=indptr[1:])
    return sp.csr_matrix((w.data[keep], w.indices[keep], indptr), shape=(indptr.size - 1, w.shape[1])), velocity[keep]


def empty_incoming(layer: SparseLinear, neurons: np.ndarray) -> None:
    """The paper's action: drop every incoming connection (and its momentum) of ``neurons``."""
    w = layer.weight
    keep = ~np.isin(w.indices, neurons)
    row_of = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    indptr = np.zeros(w.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(row_of[keep], minlength=w.shape[0]), out=indptr[1:])
    layer.set_weight(sp.csr_matrix((w.data[keep], w.indices[keep], indptr), shape=w.shape),
                     layer.w_velocity[keep])


def remove_neurons(below: SparseLinear, above: SparseLinear, f: Activation, neurons: np.ndarray) -> None:
    """Remove hidden ``neurons`` between ``below`` (their incoming weights, columns) and
    ``above`` (their outgoing weights, rows). Their incoming columns must already be empty;
    their constant output ``f(b_j)`` is folded into ``above.bias``."""
    if neurons.size == 0:
        return
    w_in = below.weight
    if np.isin(w_in.indices, neurons).any():
        raise ValueError("remove_neurons: neurons still have incoming connections; empty them first")
    const = f(below.bias[neurons].astype(np.float32)).astype(np.float64)
    outgoing = above.weight[neurons]  # (len(neurons), n_out) sparse rows
    above.bias = (above.bias + outgoing.T.dot(const)).astype(np.float32)

    new_in, vel_in = _drop_columns(w_in, below.w_velocity, neurons)
    keep = np.ones(w_in.shape[1], bool)
    keep[neurons] = False
    below.bias = below.bias[keep].copy()
    below.b_velocity = below.b_velocity[keep].copy()
    below.set_weight(new_in, vel_in)
    new_out, vel_out = _drop_rows(above.weight, above.w_velocity, neurons)
    above.set_weight(new_out, vel_out)


def prune_neurons(model: SparseMLP, percentile: float, min_neurons: int,
                  structure: NMStructure | None = None) -> list[int]:
    """Importance-prune every hidden layer of ``model`` in place; returns the removed counts.

    Importance is read from each layer before it is changed, so one layer's removal does
    not influence the next layer's selection within the same call.

    With ``structure`` (the N:M constraint of W^1..W^{L-1}): removing neurons shifts the
    indices behind them, so connections change blocks and a group can end up over-full.
    Afterwards every constrained layer is repaired by :func:`enforce_structure` (the
    smallest-magnitude excess of each over-full group is dropped, with its momentum).
    """
    removed = []
    selections = [select_pruned(neuron_importance(model.layers[k]), percentile, min_neurons)
                  for k in range(len(model.layers) - 1)]
    for k, neurons in enumerate(selections):
        empty_incoming(model.layers[k], neurons)
        remove_neurons(model.layers[k], model.layers[k + 1], model.activations[k], neurons)
        removed.append(int(neurons.size))
    if structure is not None:
        for layer in model.layers[:-1]:
            w, vel, dropped = enforce_structure(layer.weight, layer.w_velocity, structure)
            if dropped:
                layer.set_weight(w, vel)
    model.topology_changed()
    return removed
