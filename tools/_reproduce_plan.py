"""The studies of tools/reproduce.py as data: cells, runs, and how a finished run is recognised.

A *cell* is one setting of a study (e.g. "ReLU"); it is run once per seed. A *run* is one
invocation of the product's CLI: a rank count plus ``--set`` overrides on a base config.
Cells of different studies that resolve to the same configuration (the base setting appears
in every study) share their runs. A finished run is recognised by its resolved
``config.json`` and its ``summary.json``'s rank count, never by its folder name, so run
folders can come from anywhere (this machine, a SLURM sweep).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# config keys that say where or how fast a run executes, not what it computes
ENVIRONMENT_KEYS = {("data", "path"), ("data", "test_path"), ("train", "threads"), ("train", "eval_batch_size"),
                    ("checkpoint", "every_steps"), ("checkpoint", "every_seconds"), ("checkpoint", "keep"),
                    ("checkpoint", "at_end")}

# the paper's parallel code (wasap_sgd/train/model.py) prunes neurons with q = 10 when epoch % 20 == 0 and epoch > 200
# (0-based), in runs of E ~ 500 epochs (an inference from the schedule and the code's history).
PAPER_EPOCHS, PAPER_PRUNE_START, PAPER_PRUNE_EVERY, PAPER_PRUNE_Q = 500, 200, 20, 10


def scaled_importance_schedule(epochs: int) -> tuple[int, int]:
    """(start_epoch, every) of the paper's pruning schedule scaled to a run of ``epochs``:
    start after 200/500 = 40% of the epochs, then every 20/500 = 4% of them (at least 1),
    in integer arithmetic. 10 epochs -> (4, 1): pruning after 0-based epochs 5, 6, 7, 8."""
    start = PAPER_PRUNE_START * epochs // PAPER_EPOCHS
    every = max(1, (PAPER_PRUNE_EVERY * epochs + PAPER_EPOCHS // 2) // PAPER_EPOCHS)
    return start, every


@dataclass(frozen=True)
class Cell:
    """One setting of a study: ``ranks`` processes, ``sets`` overrides on the base config."""

    study: str
    label: str
    ranks: int
    sets: tuple[str, ...] = ()


@dataclass
class Study:
    name: str
    title: str
    claim: str  # what the paper claims, to compare against
    cells: list[Cell]
    exclusive: bool  # its timings matter: run alone on the machine
    extra_metric: str | None = None  # a third figure panel: "seconds_per_epoch" | "nnz" | "curve_nnz"
    notes: list[str] = field(default_factory=list)


STRUCTURES = ((2, 4), (1, 16))  # the N:M constraints of the structure study


def structure_notes(base: Any) -> list[str]:
    """The structure study's notes, computed from the base config ``base`` (a Config): the
    Erdős–Rényi density each constrained layer gets from model.epsilon, and how full that
    leaves each N:M cap."""
    from hpc_sparse.topology.init import er_probability

    eps, widths = base.model.epsilon, base.model.layers
    dens = [er_probability(a, b, eps) for a, b in zip(widths[:-2], widths[1:-1])]  # all but the output layer
    lo, hi = min(dens), max(dens)
    caps = "; ".join(f"{n}:{m} allows {100 * n / m:g}%, so the layers are filled to {lo * m / n:.0%}-{hi * m / n:.0%} "
                     "of the cap" for n, m in STRUCTURES)
    return [f"Every cell keeps the base model.epsilon ({eps:g} in the base config), which sets the nnz: a structured "
            "layer draws the same Binomial nnz as the unstructured layer of the same seed, so all cells have "
            "exactly the same nnz per seed; N:M is only a cap. The constrained layers (all but the output layer) "
            f"have expected densities {lo:.1%}-{hi:.1%} (Erdős–Rényi, from model.epsilon); {caps}."]


def studies(epochs: int, base: Any = None) -> dict[str, Study]:
    """Every study, for runs of ``epochs`` epochs. ``base``: the resolved base Config, for
    the notes that depend on it (left out when None)."""
    start, every = scaled_importance_schedule(epochs)
    prune = ("importance.enabled=true", f"importance.start_epoch={start}", f"importance.every={every}",
             f"importance.percentile={PAPER_PRUNE_Q}")
    n_prunes = sum(1 for e in range(epochs - 1) if e > start and e % every == 0)
    return {s.name: s for s in [
        Study("parallel", "Sequential vs data-parallel training (equal epochs)",
              "WASAP-SGD trains in parallel faster than sequential training, at comparable accuracy",
              [Cell("parallel", "sequential (1 rank)", 1),
               Cell("parallel", "sync averaging, P=2", 2, ("parallel.mode=sync",)),
               Cell("parallel", "WASAP-SGD, P=2", 2, ("parallel.mode=wasap",)),
               Cell("parallel", "WASAP-SGD, P=3", 3, ("parallel.mode=wasap",))],
              exclusive=True, extra_metric="seconds_per_epoch",
              notes=["--quick runs every rank with 1 thread; where P exceeds the machine's cores (P=3 on 2 "
                     "cores), the time per epoch says little about speed.",
                     "sync mode multiplies the learning rate by P (parallel.lr_scaling=linear); WASAP-SGD "
                     "uses it unscaled, as the paper's code does."]),
        Study("activation", "All-ReLU vs ReLU vs LeakyReLU",
              "All-ReLU (alternating negative slope) gives higher accuracy than ReLU and LeakyReLU",
              [Cell("activation", "All-ReLU", 1, ("model.activation=allrelu",)),
               Cell("activation", "ReLU", 1, ("model.activation=relu",)),
               Cell("activation", "LeakyReLU", 1, ("model.activation=leaky_relu",))],
              exclusive=False,
              notes=["LeakyReLU uses the same slope magnitude as All-ReLU (model.alpha), so the comparison "
                     "isolates the alternating sign."]),
        Study("topology", "SET vs RigL vs static sparse (same nnz)",
              "evolving the topology (SET) beats a static sparse network of the same size",
              [Cell("topology", "SET (random regrowth)", 1, ("topology.growth=random",)),
               Cell("topology", "RigL (gradient regrowth)", 1, ("topology.growth=gradient",)),
               Cell("topology", "static sparse (no evolution)", 1, ("topology.evolve_every=0",))],
              exclusive=False, extra_metric="nnz"),
        Study("importance", "Importance pruning on vs off",
              "importance pruning removes hidden neurons, shrinking the network and the time per epoch, "
              "without losing accuracy",
              [Cell("importance", "pruning off", 1, ("importance.enabled=false",)),
               Cell("importance", "pruning on: remove neurons", 1, (*prune, "importance.mode=remove")),
               Cell("importance", "pruning on: empty columns (paper)", 1, (*prune, "importance.mode=empty"))],
              exclusive=True, extra_metric="curve_nnz",
              notes=[f"The paper's schedule (q = {PAPER_PRUNE_Q}, after epoch {PAPER_PRUNE_START} every "
                     f"{PAPER_PRUNE_EVERY} of ~{PAPER_EPOCHS}) scaled to {epochs} epochs: start after "
                     f"{PAPER_PRUNE_START}/{PAPER_EPOCHS} of the epochs (importance.start_epoch={start}), then "
                     f"every {PAPER_PRUNE_EVERY}/{PAPER_EPOCHS} of them, at least 1 (importance.every={every}): "
                     f"{n_prunes} pruning(s), never after the last epoch, against the paper's 14.",
                     "remove (importance.mode=remove): pruned neurons are deleted, the percentile is taken over "
                     "the remaining ones. empty (importance.mode=empty, the paper's): a pruned neuron's incoming "
                     "connections are dropped, the neuron stays (hidden neurons do not change), counts in the "
                     "next percentile, and SET may connect it again; 'without inputs' counts the neurons that "
                     "have no incoming connection at the end."]),
        Study("density", "Density: epsilon 5, 10, 20, 40",
              "sparse networks keep most of the accuracy at a fraction of the connections",
              [Cell("density", f"epsilon {e}", 1, (f"model.epsilon={e}",)) for e in (5, 10, 20, 40)],
              exclusive=False, extra_metric="nnz"),
        Study("structure", "Unstructured vs N:M vs transposable N:M (same nnz)",
              "(Hubara et al. 2021) a transposable N:M mask, which also serves W^T in the backward pass, "
              "trains about as well as a plain N:M mask, while having fewer masks to choose from",
              [Cell("structure", "unstructured", 1, ("topology.structure=unstructured",)),
               *[Cell("structure", f"{'transposable ' if t else ''}{n}:{m}", 1,
                      (f"topology.structure={'nm_transposable' if t else 'nm'}", f"topology.nm_n={n}",
                       f"topology.nm_m={m}"))
                 for n, m in STRUCTURES for t in (False, True)]],
              exclusive=False, extra_metric="nnz",
              notes=structure_notes(base) if base is not None else []),
        Study("precision", "float32 vs bfloat16 activations",
              "(issue 17) storing activations, pre-activations and deltas in bfloat16, with every product and "
              "sum accumulated in float32, keeps the mean test accuracy within 0.3 points of float32",
              [Cell("precision", dt, 1, (f"train.activation_dtype={dt}",)) for dt in ("float32", "bfloat16")],
              exclusive=False,
              notes=["Weights, momentum, biases and checkpoints are float32 in both cells; bfloat16 rounds to "
                     "nearest even where a kernel stores an activation or a delta."]),
    ]}


@dataclass(frozen=True)
class Run:
    """One CLI invocation: base config + sets + seed + epochs, on ``ranks`` processes."""

    ranks: int
    sets: tuple[str, ...]
    seed: int
    exclusive: bool

    def name(self) -> str:
        """A readable folder name, unique per (ranks, sets, seed)."""
        body = "-".join(re.sub(r"[^A-Za-z0-9_.=]+", "_", s) for s in self.sets
                        if not s.startswith(("seed=", "train.epochs=")))
        digest = hashlib.sha256(json.dumps([self.ranks, self.sets]).encode()).hexdigest()[:6]
        return f"p{self.ranks}-{body or 'base'}-{digest}-s{self.seed}"


def signature(config: dict[str, Any], ranks: int) -> str:
    """What a run computes: its resolved config without the environment keys, and its ranks."""
    kept = {sec: ({k: v for k, v in val.items() if (sec, k) not in ENVIRONMENT_KEYS} if isinstance(val, dict) else val)
            for sec, val in config.items()}
    return json.dumps([kept, ranks], sort_keys=True)


@dataclass
class Plan:
    """Runs to do, each with the (study, cell, seed) triples it serves."""

    base_config: Path
    epochs: int
    seeds: list[int]
    studies: dict[str, Study]
    runs: list[Run]
    serves: dict[Run, list[tuple[str, Cell, int]]]
    signatures: dict[str, Run]  # signature -> run


def make_plan(base_config: Path, epochs: int, seeds: list[int], names: list[str]) -> Plan:
    """Resolve every (cell, seed) of the named studies through the product's config loader and
    merge those that resolve to the same configuration."""
    from hpc_sparse.config import load_config

    base = load_config(base_config, [f"train.epochs={epochs}"])
    chosen = {k: v for k, v in studies(epochs, base).items() if k in names}
    by_sig: dict[str, Run] = {}
    serves: dict[Run, list[tuple[str, Cell, int]]] = {}
    for study in chosen.values():
        for cell in study.cells:
            for seed in seeds:
                sets = (f"seed={seed}", f"train.epochs={epochs}", *cell.sets)
                cfg = load_config(base_config, list(sets))
                sig = signature(cfg.to_dict(), cell.ranks)
                if sig not in by_sig:
                    by_sig[sig] = Run(cell.ranks, sets, seed, study.exclusive)
                run = by_sig[sig]
                if study.exclusive and not run.exclusive:  # a shared run whose timing a study reports
                    upgraded = Run(run.ranks, run.sets, run.seed, True)
                    serves[upgraded] = serves.pop(run, [])
                    by_sig[sig] = run = upgraded
                serves.setdefault(run, []).append((study.name, cell, seed))
    runs = list(serves)
    return Plan(base_config, epochs, seeds, chosen, runs, serves, {s: r for s, r in by_sig.items()})


def sweep_lines(plan: Plan, config_arg: str, environment: tuple[str, ...] | list[str] = ()
                ) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The plan as jobs/sweep.sbatch lines (config path, then k=v words, then ``environment``:
    overrides of ENVIRONMENT_KEYS such as data.path), ordered by rank count, and the
    (ranks, first index, last index) ranges to submit with ``--ntasks=ranks``."""
    lines: list[str] = []
    ranges: list[tuple[int, int, int]] = []
    for ranks in sorted({r.ranks for r in plan.runs}):
        first = len(lines)
        for run in sorted((r for r in plan.runs if r.ranks == ranks), key=lambda r: (r.sets[2:], r.seed)):
            if any(" " in s for s in run.sets):
                raise ValueError(f"override {run.sets} has a space; sweep files split words on spaces")
            lines.append(" ".join([config_arg, *run.sets, *environment]))
        ranges.append((ranks, first, len(lines) - 1))
    return lines, ranges
