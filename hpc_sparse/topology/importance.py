"""Importance pruning of hidden neurons (Curci, Mocanu, Pechenizkiy 2021).

Metric (PAPER.md §3, from the paper's code ``wasap_sgd/train/model.py``): the importance
of neuron j of hidden layer k is the absolute sum of its incoming weights,
``I_j = sum_i |W^k_ij|`` (a column sum of the layer's weight). Neurons with
``I_j <= t``, t being the q-th percentile (numpy, linear interpolation) of I over the
layer (empty neurons included), are pruned. Two actions (``importance.mode``):

``empty`` (the paper's): the pruned neuron's incoming column is emptied, with its momentum.
The neuron stays, with its bias and outgoing weights; it outputs the constant ``f(b_j)``,
counts (with I = 0) in the next percentile, and SET/RigL regrowth may connect it again.
The widths never change.

``remove``: after emptying, the neuron is removed: its column in ``W^k``, its bias, and its
row in ``W^{k+1}``. Its constant output ``f(b_j) * W^{k+1}[j, :]`` is folded into
``b^{k+1}`` first, so the evaluation output is the same as with the emptied column, and
the widths really shrink. The percentile is then taken over the remaining neurons, and
regrowth can no longer reach a removed one.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from hpc_sparse.sparse.activations import Activation
from hpc_sparse.sparse.linear import SparseLinear
from hpc_sparse.sparse.mlp import SparseMLP
from hpc_sparse.topology.structure import NMStructure, enforce_structure


PRUNE_MODES = ("remove", "empty")


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
                  structure: NMStructure | None = None, mode: str = "remove") -> list[int]:
    """Importance-prune every hidden layer of ``model`` in place (``mode`` "remove" or
    "empty", see the module docstring). Returns, per hidden layer, the neurons removed
    ("remove") or the neurons whose incoming column was emptied by this call and had
    connections before ("empty": an already empty neuron is selected again, but not counted).

    Importance is read from each layer before it is changed, so one layer's pruning does
    not influence the next layer's selection within the same call. ``min_neurons``: at
    most ``width - min_neurons`` neurons of a layer are selected (the least important).

    With ``structure`` (the N:M constraint of W^1..W^{L-1}): emptying columns only drops
    entries, which never breaks the constraint. Removing neurons shifts the indices behind
    them, so connections change blocks and a group can end up over-full; after "remove"
    every constrained layer is repaired by :func:`enforce_structure` (the smallest-magnitude
    excess of each over-full group is dropped, with its momentum).
    """
    if mode not in PRUNE_MODES:
        raise ValueError(f"unknown importance pruning mode {mode!r}; expected one of {PRUNE_MODES}")
    hidden = model.layers[:-1]
    selections = [select_pruned(neuron_importance(layer), percentile, min_neurons) for layer in hidden]
    newly_empty = [int(np.count_nonzero(np.bincount(layer.weight.indices, minlength=layer.shape[1])[neurons]))
                   for layer, neurons in zip(hidden, selections)]
    # every layer is emptied before any neuron is removed: a removed neuron's constant output
    # must be folded through the next layer's emptied columns, as in the emptied network
    for layer, neurons in zip(hidden, selections):
        empty_incoming(layer, neurons)
    if mode == "empty":
        model.topology_changed()
        return newly_empty
    for k, neurons in enumerate(selections):
        remove_neurons(model.layers[k], model.layers[k + 1], model.activations[k], neurons)
    if structure is not None:
        for layer in model.layers[:-1]:
            w, vel, dropped = enforce_structure(layer.weight, layer.w_velocity, structure)
            if dropped:
                layer.set_weight(w, vel)
    model.topology_changed()
    return [int(neurons.size) for neurons in selections]


def neurons_without_inputs(model: SparseMLP) -> list[int]:
    """Per hidden layer, the neurons with no incoming connection (emptied by importance
    pruning in "empty" mode and not regrown since, or never connected)."""
    return [int(layer.shape[1] - np.count_nonzero(np.bincount(layer.weight.indices, minlength=layer.shape[1])))
            for layer in model.layers[:-1]]


def describe_pruning(model: SparseMLP, mode: str, counts: list[int], before: tuple[list[int], int]) -> str:
    """One log line for a :func:`prune_neurons` call in ``mode`` that returned ``counts``,
    ``before`` being (widths, nnz) of ``model`` before it."""
    widths, nnz = before
    if mode == "remove":
        return f"removed {counts} neurons; widths {widths} -> {list(model.widths)}; nnz {nnz:,} -> {model.nnz:,}"
    return (f"emptied the incoming connections of {counts} neurons; neurons without inputs now "
            f"{neurons_without_inputs(model)} of {list(model.widths[1:-1])}; nnz {nnz:,} -> {model.nnz:,}")
