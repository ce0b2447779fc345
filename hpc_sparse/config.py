"""Typed, self-validating run configuration.

A run is described by one TOML file plus ``--set section.key=value`` overrides.
Precedence is CLI > file > defaults. Unknown keys, wrong types and values out of
range raise :class:`~hpc_sparse.errors.UserError` naming the key and the fix,
before any training starts.

Every field's ``help`` metadata is its documentation; ``hpc-sparse config-help``
and the configuration reference (docs/configuration-reference.md, by tools/gen_reference_docs.py) are generated from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, get_type_hints

from hpc_sparse.errors import UserError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    """Which dataset, where its files are, how it is preprocessed (see Datasets)."""

    name: str = _f("synthetic", "dataset: synthetic | fashion-mnist | mnist | cifar10 | madelon | higgs | file",
                   choices=("synthetic", "fashion-mnist", "mnist", "cifar10", "madelon", "higgs", "file"))
    path: str = _f("", "folder of idx/idx.gz files (fashion-mnist, mnist; default: the folder of "
                       "Debian's dataset-fashion-mnist); of the publisher's files (cifar10: "
                       "cifar-10-batches-bin, madelon: madelon_*.data/.labels, higgs: HIGGS.csv[.gz]); "
                       "or the training .npz/.h5 file (file)")
    test_path: str = _f("", "test .npz/.h5 file for data.name='file' (X, y datasets)")
    preprocess: str = _f("auto", "auto | standardize | scale | none. auto: per-feature standardisation "
                                 "(training mean/std) for fashion-mnist, synthetic and file; /255 for mnist",
                         choices=("auto", "standardize", "scale", "none"))
    n_train: int = _f(6000, "synthetic: number of training samples", min=1)
    n_test: int = _f(0, "test samples: synthetic generates this many, higgs takes the file's last "
                        "n_test rows; 0 = the dataset's default (synthetic 2000, higgs 500000)", min=0)
    n_features: int = _f(500, "synthetic: total features (informative + redundant + noise)", min=2)
    n_informative: int = _f(20, "synthetic: informative features (Madelon uses 5 of 500 plus 15 "
                                "redundant; here informative includes both)", min=1)
    n_classes: int = _f(4, "synthetic: number of classes", min=2)
    seed: int = _f(1234, "synthetic: seed of the generated dataset (independent of the run seed)", min=0)
    noise: float = _f(0.5, "synthetic: std of the Gaussian noise added to the informative features", min=0.0)
    augment: bool = _f(False, "cifar10: shift each training image by up to 3 pixels (10%; edge pixels "
                              "repeated) and flip it left-right with probability 1/2, a pure function of "
                              "(seed, epoch, sample), so resume stays exact")
    cache_dir: str = _f("", "folder of the dataset cache (the preprocessed float32 arrays, memory-mapped "
                            "read-only so the ranks of a node share one copy): '' = a hpc_sparse-cache "
                            "folder beside the source if writable (not under /usr), else "
                            "$XDG_CACHE_HOME/hpc_sparse or ~/.cache/hpc_sparse; 'off' = no cache, every "
                            "rank holds its own copy")


@dataclass
class ModelConfig:
    """The network: widths, Erdős–Rényi sparsity, activation, initialisation, dropout."""

    layers: list[int] = _f([500, 400, 100, 400, 4], "all layer widths, input first, output last "
                                                    "(e.g. [784, 1000, 1000, 1000, 10])")
    epsilon: float = _f(20.0, "Erdos-Renyi sparsity: each connection exists with probability "
                              "epsilon*(n_in+n_out)/(n_in*n_out), so nnz ~ epsilon*(n_in+n_out)", min=0.0,
                        exclusive_min=True)
    activation: str = _f("allrelu", "hidden activation: allrelu | relu | leaky_relu | tanh | sigmoid",
                         choices=("allrelu", "relu", "leaky_relu", "tanh", "sigmoid"))
    alpha: float = _f(0.6, "All-ReLU negative slope magnitude: hidden layer k (1-based) uses -alpha "
                           "if k is odd and +alpha if k is even (paper: 0.6 for (F)MNIST, 0.75 for CIFAR-10); "
                           "also the LeakyReLU slope", min=0.0)
    init: str = _f("he_uniform", "weight init: he_uniform U(-sqrt(6/n_in), +) | xavier_uniform "
                                 "U(-sqrt(6/(n_in+n_out)), +) | normal N(0,1)/10",
                   choices=("he_uniform", "xavier_uniform", "normal"))
    dropout: float = _f(0.3, "inverted dropout rate on hidden outputs (training only)", min=0.0, max=0.95)


@dataclass
class TrainConfig:
    """The optimizer, batch sizes, length of the run, threads and cache blocking."""

    epochs: int = _f(10, "number of passes over the training set", min=1)
    batch_size: int = _f(128, "samples per step per rank", min=1)
    lr: float = _f(0.01, "SGD learning rate", min=0.0, exclusive_min=True)
    momentum: float = _f(0.9, "SGD momentum mu in v <- mu*v - lr*g", min=0.0, max=0.999)
    nesterov: bool = _f(False, "Nesterov momentum: w <- w + mu*v - lr*g instead of w <- w + v")
    weight_decay: float = _f(0.0, "L2 weight decay lambda, added to the gradient as lambda*w (PyTorch's "
                                  "SGD convention; the paper's code subtracts lambda*w unscaled by lr)",
                             min=0.0, max=0.1)
    eval_batch_size: int = _f(1000, "samples per evaluation batch", min=1)
    threads: int = _f(0, "compute threads per rank; 0 = cores on the node / ranks on the node "
                         "(HPC_SPARSE_THREADS overrides)", min=0)
    max_steps: int = _f(0, "stop after this many steps in total (0 = no limit); for smoke tests", min=0)
    batch_chunk: int = _f(0, "cache blocking: samples per kernel pass (0 = automatic, see block_columns; "
                             "fewer than the batch is rounded down to a multiple of 16)", min=0)
    block_columns: int = _f(0, "cache blocking: output columns per block, forward and backward pass "
                               "(0 = automatic: the traffic model of sparse/blocking.py chooses the chunk "
                               "and each pass's blocks, with at least 2 entries per input row and block "
                               "on average)", min=0)
    activation_dtype: str = _f("float32", "how activations, pre-activations and deltas are stored between "
                                          "the kernels: float32 | bfloat16 (half the bytes per gathered or "
                                          "streamed row; every product and sum is still accumulated in "
                                          "float32, and weights, momentum, biases and checkpoints stay float32)",
                               choices=("float32", "bfloat16"))


@dataclass
class TopologyConfig:
    """How connections evolve (SET or RigL) and the N:M structure they keep."""

    growth: str = _f("random", "regrowth rule after pruning: random (SET) | gradient (RigL)",
                     choices=("random", "gradient"))
    zeta: float = _f(0.3, "fraction of each hidden weight matrix's connections pruned and regrown "
                          "per evolution (RigL: the initial fraction, cosine-decayed)", min=0.0, max=1.0)
    evolve_every: int = _f(1, "evolve the topology after every this many epochs (never after the "
                              "last epoch); 0 = never", min=0)
    rigl_end_fraction: float = _f(0.75, "RigL: the drop fraction decays to 0 at this fraction of "
                                        "the epochs", min=0.0, max=1.0, exclusive_min=True)
    rigl_block_rows: int = _f(256, "RigL: rows per block when scoring missing connections, which "
                                   "bounds the scratch memory to block_rows*n_out floats", min=1)
    structure: str = _f("unstructured", "sparsity pattern of every weight matrix except the output one: "
                                        "unstructured | nm (at most nm_n non-zeros per output neuron in "
                                        "every block of nm_m consecutive inputs) | nm_transposable (also at "
                                        "most nm_n per input neuron in every block of nm_m consecutive "
                                        "outputs: each nm_m x nm_m block has <= nm_n per row and column). "
                                        "model.epsilon still sets the nnz; N:M is a cap (see docs/structured-sparsity.md)",
                        choices=("unstructured", "nm", "nm_transposable"))
    nm_n: int = _f(2, "N of N:M: non-zeros allowed per block (1 <= nm_n < nm_m); used when structure is "
                      "nm or nm_transposable", min=1)
    nm_m: int = _f(4, "M of N:M: block length; a last, shorter block (width not a multiple of nm_m) counts "
                      "as zero-padded to nm_m, i.e. also holds at most nm_n", min=2)


@dataclass
class ImportanceConfig:
    """Importance pruning of weak hidden neurons while training: removed (the layers shrink) or
    with their incoming connections emptied (the paper's form), see ``mode``."""

    enabled: bool = _f(False, "prune hidden neurons whose importance (sum of |incoming weights|) "
                              "is at or below the layer's percentile (see importance.mode)")
    mode: str = _f("remove", "remove: the neuron is deleted (its column, bias and outgoing row; its "
                             "constant output folded into the next bias), so the layers really shrink | "
                             "empty (the paper's): only its incoming column is emptied; the neuron keeps "
                             "its bias and outgoing weights, counts in the next percentile, and SET/RigL "
                             "regrowth may connect it again", choices=("remove", "empty"))
    start_epoch: int = _f(200, "prune only after epochs > start_epoch (0-based; paper: 200)", min=0)
    every: int = _f(20, "prune at epochs that are multiples of this (paper: 20 parallel, 10 "
                        "sequential)", min=1)
    percentile: float = _f(10.0, "q: neurons with importance <= the q-th percentile of their layer "
                                 "are pruned (paper: 10 parallel, 20 sequential)", min=0.0, max=100.0)
    min_neurons: int = _f(1, "never prune more than width - min_neurons neurons of a hidden layer "
                             "(remove: the layer keeps at least this width)", min=1)


@dataclass
class ParallelConfig:
    """The training mode over MPI ranks and how often replicas are averaged."""

    mode: str = _f("sync", "sync: collective replica averaging (default) | wasap: the paper's "
                           "asynchronous parameter-server phase then local training and a final merge",
                   choices=("sync", "wasap"))
    sync_every: int = _f(4, "average weights, biases and momentum across ranks every this many local "
                            "steps (an epoch end is always a sync point)", min=1)
    lr_scaling: str = _f("linear", "linear: multiply train.lr by the number of ranks, since P ranks take "
                                   "P times fewer steps per epoch with a P times larger effective batch "
                                   "(Goyal et al. 2017) | none: use train.lr as given",
                         choices=("none", "linear"))
    async_fraction: float = _f(0.7, "wasap: fraction of the epochs spent in the asynchronous phase",
                               min=0.0, max=1.0)


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = _f(0, "save every this many steps (0 = off); rounded up to a sync point", min=0)
    every_seconds: float = _f(0.0, "save when this many seconds have passed since the last save "
                                   "(0 = off)", min=0.0)
    keep: int = _f(2, "keep the newest this many committed checkpoints", min=2)
    at_end: bool = _f(True, "save a checkpoint when training finishes")


@dataclass
class Config:
    """A whole run: the top-level ``seed`` and one section per table of the TOML file.
    Build it with :func:`load_config` (file + overrides, validated), or :func:`config_from_dict`."""

    seed: int = _f(42, "seed for init, data order, dropout and topology updates", min=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_value(where: str, value: Any, ftype: Any, meta: dict[str, Any]) -> Any:
    """Coerce ``value`` to ``ftype`` and check the field's bounds; raise UserError naming ``where``."""
    if ftype is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{where}' must be true or false, got {value!r}; fix: set {where}=true")
        return value
    if ftype is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"config key '{where}' must be an integer, got {value!r}; fix: e.g. {where}=10")
        value = int(value)
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{where}' must be a number, got {value!r}; fix: e.g. {where}=0.5")
        value = float(value)
        if value != value:
            raise UserError(f"config key '{where}' is NaN; fix: give a finite number")
    elif ftype is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{where}' must be a string, got {value!r}; fix: quote it, "
                            f"e.g. {where}=\"...\"")
    elif ftype == list[int]:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"config key '{where}' must be a list of integers, got {value!r}; "
                            f"fix: e.g. {where}=[784,1000,10]")
        value = list(value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"config key '{where}' is {value!r}, which is not one of {', '.join(map(repr, choices))}; "
                        f"fix: pick one of them")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
        op = ">" if meta.get("exclusive_min") else ">="
        raise UserError(f"config key '{where}' is {value!r} but must be {op} {lo}; fix: set a value in range")
    if hi is not None and value > hi:
        raise UserError(f"config key '{where}' is {value!r} but must be <= {hi}; fix: set a value in range")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise UserError(f"unknown config key '{where}'; fix: remove it or use one of: {known}")
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise UserError(f"config key '{where}' must be a [{where}] table; fix: write it as a section")
            kwargs[key] = _build(ftype, value, f"{where}.")
        else:
            kwargs[key] = _check_value(where, value, ftype, dict(fields[key].metadata))
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as a TOML value, or kept as a bare string."""
    if "=" not in item:
        raise UserError(f"--set '{item}' is not of the form section.key=value; fix: e.g. --set train.lr=0.05")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.split("."), value


def validate(cfg: Config) -> Config:
    """Cross-field checks that no single field can express."""
    layers = cfg.model.layers
    if len(layers) < 2:
        raise UserError(f"model.layers={layers} needs at least an input and an output width; "
                        "fix: e.g. model.layers=[784,1000,10]")
    if any(n < 1 for n in layers):
        raise UserError(f"model.layers={layers} has a width < 1; fix: use positive widths")
    if cfg.data.name == "synthetic" and cfg.data.n_informative > cfg.data.n_features:
        raise UserError(f"data.n_informative={cfg.data.n_informative} exceeds data.n_features="
                        f"{cfg.data.n_features}; fix: lower data.n_informative")
    if cfg.data.augment and cfg.data.name != "cifar10":
        raise UserError("data.augment=true works with data.name='cifar10' only; fix: set data.augment=false")
    _validate_structure(cfg)
    if cfg.data.name == "file" and not cfg.data.path:
        raise UserError("data.name='file' needs data.path (training .npz/.h5 with X and y); "
                        "fix: --set data.path=train.npz data.test_path=test.npz")
    return cfg


def _validate_structure(cfg: Config) -> None:
    """N:M: 1 <= N < M; every constrained layer's Erdős–Rényi density must fit under N/M."""
    top = cfg.topology
    if top.structure == "unstructured":
        return
    if top.nm_n >= top.nm_m:
        raise UserError(f"topology.nm_n={top.nm_n} must be smaller than topology.nm_m={top.nm_m} (N:M needs "
                        "1 <= N < M); fix: e.g. topology.nm_n=2 topology.nm_m=4")
    if cfg.parallel.mode == "wasap":
        raise UserError(f"topology.structure='{top.structure}' is not supported with parallel.mode='wasap' (its "
                        "final merge does not keep N:M); fix: use parallel.mode='sync' or "
                        "topology.structure='unstructured'")
    ratio = top.nm_n / top.nm_m
    layers = cfg.model.layers
    for l, (a, b) in enumerate(zip(layers[:-2], layers[1:-1])):  # the output layer is not constrained
        p = min(1.0, cfg.model.epsilon * (a + b) / (a * b))
        if p > ratio:
            raise UserError(f"model.epsilon={cfg.model.epsilon} gives layer {l} ({a}x{b}) density {p:.4g}, above "
                            f"the {top.nm_n}:{top.nm_m} cap {ratio:.4g}; fix: set model.epsilon <= "
                            f"{largest_nm_epsilon(layers, top.nm_n, top.nm_m):g} or a larger topology.nm_n/nm_m")


def largest_nm_epsilon(layers: list[int], n: int, m: int) -> float:
    """The largest epsilon (rounded down to 3 decimals) whose Erdős–Rényi density fits under
    N/M in every constrained layer (all but the output layer) of a network of ``layers`` widths."""
    largest = min(n / m * x * y / (x + y) for x, y in zip(layers[:-2], layers[1:-1]))
    return math.floor(largest * 1000) / 1000


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (optional), apply ``--set`` overrides, validate, return a :class:`Config`.

    Raises :class:`UserError` for a missing file, bad TOML, unknown keys, wrong types or
    out-of-range values.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file '{p}' not found; fix: pass an existing file, e.g. "
                            "--config configs/synthetic-quick.toml")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file '{p}' is not valid TOML ({exc}); fix: correct the syntax") from exc
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set '{item}': '{k}' is not a section; fix: check the key name")
        node[keys[-1]] = value
    return validate(_build(Config, raw, ""))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A validated :class:`Config` from nested dicts, one per TOML table, e.g.
    ``{"model": {"layers": [20, 64, 3]}, "train": {"epochs": 4}}``. Keys left out keep their
    defaults; :meth:`Config.to_dict` output (e.g. from a checkpoint) round-trips. Raises
    :class:`UserError` like :func:`load_config`."""
    return validate(_build(Config, raw, ""))


def iter_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """Every config key in declaration order, sections included depth first, as
    ``(dotted name, dataclass field, type, default value)``; the field's ``metadata`` holds
    ``help`` and the bounds (``choices``, ``min``, ``max``, ``exclusive_min``)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield prefix + f.name, f, hints[f.name], default


def describe() -> list[tuple[str, str, str]]:
    """Every key as ``(name, default as JSON, help)``, for docs and ``hpc-sparse config-help``."""
    return [(key, json.dumps(default), f.metadata.get("help", "")) for key, f, _, default in iter_keys()]
