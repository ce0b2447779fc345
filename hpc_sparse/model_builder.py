"""Build a :class:`SparseMLP` from a config, or from a checkpoint's arrays, with clear errors."""

from __future__ import annotations

import numpy as np

from hpc_sparse.config import Config
from hpc_sparse.errors import UserError
from hpc_sparse.sparse import SparseLinear, SparseMLP, hidden_activations
from hpc_sparse.topology import erdos_renyi


def check_data_shape(cfg: Config, n_features: int, n_classes: int) -> None:
    """The config's input/output widths must match the data."""
    layers = cfg.model.layers
    if layers[0] != n_features:
        raise UserError(f"model.layers starts with {layers[0]} inputs but the {cfg.data.name} data has "
                        f"{n_features} features; fix: --set model.layers=[{n_features},...]")
    if layers[-1] < n_classes:
        raise UserError(f"model.layers ends with {layers[-1]} outputs but the {cfg.data.name} data has "
                        f"{n_classes} classes; fix: make the last width {n_classes}")


def build_model(cfg: Config) -> SparseMLP:
    """A fresh Erdős–Rényi network; identical on every rank for the same ``cfg.seed``."""
    widths = cfg.model.layers
    layers = []
    for l, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        rng = np.random.default_rng([cfg.seed, 0x1417, l])
        layers.append(SparseLinear(erdos_renyi(rng, n_in, n_out, cfg.model.epsilon, cfg.model.init)))
    acts = hidden_activations(cfg.model.activation, cfg.model.alpha, len(widths) - 2)
    return _with_blocking(cfg, SparseMLP(layers, acts, cfg.model.dropout))


def _with_blocking(cfg: Config, model: SparseMLP) -> SparseMLP:
    """Apply the config's cache blocking overrides (``train.batch_chunk``, ``train.block_columns``)."""
    model.configure_blocking(cfg.train.batch_chunk, cfg.train.block_columns)
    return model


def model_from_state(cfg: Config, state: dict[str, object], source: str) -> SparseMLP:
    """Rebuild the model from checkpoint arrays; refuse one whose architecture contradicts ``cfg``.

    Hidden widths may be smaller than configured (importance pruning shrinks them), but the
    number of layers and the input/output widths must match.
    """
    n_layers = len([k for k in state if k.startswith("layers/") and k.endswith("/W")])
    want = cfg.model.layers
    if n_layers != len(want) - 1:
        raise UserError(f"checkpoint {source} has {n_layers} weight layers but model.layers={want} needs "
                        f"{len(want) - 1}; fix: use the run's original model.layers or a new --run-dir")
    widths = [state["layers/0/W"].shape[0]] + [state[f"layers/{l}/W"].shape[1] for l in range(n_layers)]  # type: ignore[attr-defined]
    bad = (widths[0] != want[0] or widths[-1] != want[-1]
           or any(h > w for h, w in zip(widths[1:-1], want[1:-1])))
    if bad:
        raise UserError(f"checkpoint {source} has layer widths {widths} but the config says model.layers={want}; "
                        "fix: use the run's original model.layers or a new --run-dir")
    acts = hidden_activations(cfg.model.activation, cfg.model.alpha, n_layers - 1)
    return _with_blocking(cfg, SparseMLP.from_state_dict(state, acts, cfg.model.dropout))


def describe_blocking(model: SparseMLP, batch: int) -> str:
    """One log line: each layer's cache blocking at ``batch`` samples (see ``sparse/blocking.py``)."""
    plans = model.blocking_plans(batch)
    if all(p.n_blocks == 1 and p.chunk == batch for p in plans):
        return f"cache blocking: none needed at batch {batch} (every layer's output rows fit in the cache)"
    return "cache blocking: " + "; ".join(f"layer {l}: {p.describe(batch)}" for l, p in enumerate(plans))
