"""Build a :class:`SparseMLP` from a config, or from a checkpoint's arrays, with clear errors."""

from __future__ import annotations

import numpy as np

from hpc_sparse.config import Config
from hpc_sparse.errors import UserError
from hpc_sparse.sparse import SparseLinear, SparseMLP, hidden_activations
from hpc_sparse.topology import NMStructure, erdos_renyi
from hpc_sparse.topology.structure import check_structure, log10_mask_diversity, violations


def check_data_shape(cfg: Config, n_features: int, n_classes: int) -> None:
    """The config's input/output widths must match the data (a UserError naming the fix)."""
    layers = cfg.model.layers
    if layers[0] != n_features:
        raise UserError(f"model.layers starts with {layers[0]} inputs but the {cfg.data.name} data has "
                        f"{n_features} features; fix: --set model.layers=[{n_features},...]")
    if layers[-1] < n_classes:
        raise UserError(f"model.layers ends with {layers[-1]} outputs but the {cfg.data.name} data has "
                        f"{n_classes} classes; fix: make the last width {n_classes}")


def layer_structure(cfg: Config) -> NMStructure | None:
    """The N:M constraint of the config (``topology.structure``), or None if unstructured. It
    applies to every weight matrix except the output one (W^1..W^{L-1}, the evolved ones)."""
    top = cfg.topology
    if top.structure == "unstructured":
        return None
    return NMStructure(top.nm_n, top.nm_m, transposable=top.structure == "nm_transposable")


def check_model_structure(cfg: Config, model: SparseMLP, source: str) -> None:
    """Refuse a model whose constrained layers violate the config's N:M structure (O(nnz))."""
    s = layer_structure(cfg)
    if s is None:
        return
    for l, layer in enumerate(model.layers[:-1]):
        try:
            check_structure(layer.weight, s, f"layer {l}")
        except ValueError as exc:
            raise UserError(f"{source}: {exc}; fix: use the run's own topology.structure/nm_n/nm_m, or convert "
                            "the model first") from exc


def build_model(cfg: Config) -> SparseMLP:
    """A fresh Erdős–Rényi network; identical on every rank for the same ``cfg.seed``. With an
    N:M ``topology.structure`` every layer but the output one is sampled under it (same nnz)."""
    widths = cfg.model.layers
    structure = layer_structure(cfg)
    layers = []
    for l, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        rng = np.random.default_rng([cfg.seed, 0x1417, l])
        s = structure if l < len(widths) - 2 else None
        try:
            w = erdos_renyi(rng, n_in, n_out, cfg.model.epsilon, cfg.model.init, s)
        except ValueError as exc:
            raise UserError(f"layer {l}: {exc}; fix: lower model.epsilon or use a larger topology.nm_n/nm_m") from exc
        layers.append(SparseLinear(w))
    acts = hidden_activations(cfg.model.activation, cfg.model.alpha, len(widths) - 2)
    return _with_blocking(cfg, SparseMLP(layers, acts, cfg.model.dropout))


def _with_blocking(cfg: Config, model: SparseMLP) -> SparseMLP:
    """Apply the config's kernel settings: the cache blocking overrides (``train.batch_chunk``,
    ``train.block_columns``) and the activation storage (``train.activation_dtype``)."""
    model.configure_blocking(cfg.train.batch_chunk, cfg.train.block_columns)
    model.set_activation_dtype(cfg.train.activation_dtype)
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
    model = SparseMLP.from_state_dict(state, acts, cfg.model.dropout)
    check_model_structure(cfg, model, f"checkpoint {source}")
    return _with_blocking(cfg, model)


def describe_blocking(model: SparseMLP, batch: int) -> str:
    """One log line: each layer's cache blocking at ``batch`` samples (see ``sparse/blocking.py``)."""
    plans = model.blocking_plans(batch)
    if all(p.n_blocks == 1 and p.chunk == batch for p in plans):
        return f"cache blocking: none needed at batch {batch} (every layer's output rows fit in the cache)"
    return "cache blocking: " + "; ".join(f"layer {l}: {p.describe(batch)}" for l, p in enumerate(plans))


def describe_structure(cfg: Config, model: SparseMLP) -> list[str]:
    """``hpc-sparse info`` lines for an N:M run: per constrained layer (all but the output one),
    the groups that violate the constraint (0 expected; O(nnz) check) and log10 of the mask
    diversity (Hubara et al. 2021; see :func:`log10_mask_diversity`). Empty if unstructured."""
    s = layer_structure(cfg)
    if s is None:
        return []
    lines = [f"structure: {s.name} on layers 0..{len(model.layers) - 2} (the output layer is unconstrained)",
             f"  {'layer':>5} {'violations':>10} {'log10 mask diversity':>22}"]
    for l, layer in enumerate(model.layers[:-1]):
        w = layer.weight
        md = log10_mask_diversity(w.shape, s)
        lines.append(f"  {l:>5} {violations(w, s):>10,} "
                     f"{'n/a (M too large)' if md is None else f'{md:,.1f}':>22}")
    return lines
