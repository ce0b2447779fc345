"""Finished runs -> per-study markdown table, JSON file and PNG figure (tools/reproduce.py).

A run's figures come only from its own files: ``config.json`` (what it computed),
``summary.json`` (final accuracy, nnz, hidden neurons, ranks, model_sha256) and
``metrics.jsonl`` (per-epoch accuracy, neurons, nnz and seconds). Every cell is the mean and
the sample standard deviation (ddof = 1) over its seeds.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _reproduce_plan import Plan, Run, Study, signature


class NotARun(Exception):
    """A folder with a summary.json that is not a finished training run of ``hpc-sparse train``;
    the message says why."""


def read_run(run_dir: Path) -> dict[str, Any]:
    """The figures of one finished training run folder; :class:`NotARun` (saying why) otherwise."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    except (OSError, ValueError) as exc:
        raise NotARun(f"no readable config.json, summary.json and metrics.jsonl ({exc})") from None
    if "converted_from" in summary:
        raise NotARun("an `hpc-sparse convert` output, not a training run")
    try:
        epochs = config["train"]["epochs"]
        if not metrics or summary["epochs_completed"] != epochs:
            # stopped early (max_steps, a signal not yet resumed): not a finished run
            raise NotARun(f"unfinished ({summary['epochs_completed']} of {epochs} epochs)")
        initial_hidden = sum(config["model"]["layers"][1:-1])
        seconds = [m["epoch_seconds"] for m in metrics]
        return {
            "run_dir": str(run_dir), "signature": signature(config, int(summary["ranks"])),
            "test_accuracy": float(summary["test_accuracy"]),
            "best_test_accuracy": float(summary["best_test_accuracy"]),
            "nnz": int(summary["nnz"]), "hidden_neurons": int(summary["hidden_neurons"]),
            "neurons_removed": initial_hidden - int(summary["hidden_neurons"]),
            "neurons_without_inputs": summary.get("neurons_without_inputs"),  # None: written before it existed
            "seconds_per_epoch": statistics.median(seconds),
            "late_seconds_per_epoch": statistics.fmean(seconds[-3:]),
            "model_sha256": summary["model_sha256"],
            "curve_test_accuracy": [m["test_accuracy"] for m in metrics],
            "curve_hidden_neurons": [m["neurons"] for m in metrics],
            "curve_nnz": [m.get("nnz") for m in metrics],
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise NotARun(f"its files lack {exc!r} (not written by `hpc-sparse train`?)") from None


@dataclass
class Collected:
    """What :func:`collect` found: the run used for each planned run, every folder that
    matched one (the used one first), and the folders it skipped, with the reason."""

    found: dict[Run, dict[str, Any]] = field(default_factory=dict)
    matches: dict[Run, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    other: int = 0  # finished training runs of another configuration

    def report(self, plan: Plan) -> list[str]:
        """Lines for the user: skipped folders, duplicates and which one is used."""
        lines = [f"reproduce: skipped {d}: {why}" for d, why in self.skipped]
        for run, recs in self.matches.items():
            if len(recs) > 1:
                cells = ", ".join(sorted({f"{s}/{c.label}" for s, c, _ in plan.serves[run]}))
                same = len({r["model_sha256"] for r in recs}) == 1
                lines.append(f"reproduce: {len(recs)} finished runs match {cells}, seed {run.seed} "
                             f"({'the same' if same else 'different'} model_sha256); using {recs[0]['run_dir']}, "
                             f"not {', '.join(r['run_dir'] for r in recs[1:])}")
        if self.other:
            lines.append(f"reproduce: {self.other} finished run(s) of other configurations or rank counts ignored")
        return lines


def collect(plan: Plan, roots: list[Path]) -> Collected:
    """Find the plan's finished runs under ``roots`` (any depth), matched by configuration.
    When several folders match one run, the first by sorted path is used."""
    out = Collected()
    for root in roots:
        for summary in sorted(root.rglob("summary.json")):
            try:
                rec = read_run(summary.parent)
            except NotARun as exc:
                out.skipped.append((str(summary.parent), str(exc)))
                continue
            run = plan.signatures.get(rec["signature"])
            if run is None:
                out.other += 1
                continue
            out.matches.setdefault(run, []).append(rec)
            out.found.setdefault(run, rec)
    return out


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std of the known values (None: a run that did not record the metric)."""
    known = [v for v in values if v is not None]
    return {"mean": statistics.fmean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else None, "values": values}


METRICS = ("test_accuracy", "best_test_accuracy", "nnz", "hidden_neurons", "neurons_removed",
           "neurons_without_inputs", "seconds_per_epoch", "late_seconds_per_epoch")
CURVES = ("curve_test_accuracy", "curve_hidden_neurons", "curve_nnz")


def aggregate(plan: Plan, study: Study, collected: Collected) -> list[dict[str, Any]]:
    """One record per cell: its seeds' figures (with each seed's model_sha256 and, if several
    folders matched, all of them), mean and std of each metric, mean curves."""
    found = collected.found
    cells = []
    for cell in study.cells:
        runs = sorted(((seed, run) for run, uses in plan.serves.items() for (s, c, seed) in uses
                       if s == study.name and c == cell and run in found), key=lambda t: t[0])
        recs = [(seed, found[run]) for seed, run in runs]
        out = {"label": cell.label, "ranks": cell.ranks, "overrides": list(cell.sets),
               "seeds": [s for s, _ in recs], "n": len(recs), "missing_seeds": sorted(
                   set(plan.seeds) - {s for s, _ in recs}), "run_dirs": [r["run_dir"] for _, r in recs],
               "model_sha256": [r["model_sha256"] for _, r in recs],
               "duplicate_run_dirs": {str(seed): [r["run_dir"] for r in collected.matches[run][1:]]
                                      for seed, run in runs if len(collected.matches[run]) > 1}}
        for m in METRICS:
            out[m] = _mean_std([r[m] for _, r in recs])
        for curve in CURVES:
            rows = [r[curve] for _, r in recs if None not in r[curve]]
            out[curve] = {"mean": [statistics.fmean(v) for v in zip(*rows)] if rows else [],
                          "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*rows)] if rows else []}
        cells.append(out)
    return cells


def _fmt(stat: dict[str, Any], digits: int, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "–"
    mean = stat["mean"] * scale
    if stat["std"] is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown(study: Study, cells: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The study's table with its claim, setup and notes (the importance study also counts the
    hidden neurons left without inputs)."""
    inputs = study.name == "importance"
    lines = [f"### {study.title}", "",
             f"Paper's claim: {study.claim}.", "",
             "| setting | ranks | test accuracy (%) | best test accuracy (%) | nnz | hidden neurons | removed | "
             + ("without inputs | " if inputs else "") + "s/epoch (median) | s/epoch (last 3) | seeds |",
             "|---" * (11 if inputs else 10) + "|"]
    for c in cells:
        seeds = f"{c['n']}" + (f" (missing: {', '.join(map(str, c['missing_seeds']))})" if c["missing_seeds"] else "")
        lines.append(f"| {c['label']} | {c['ranks']} | {_fmt(c['test_accuracy'], 2, 100)} | "
                     f"{_fmt(c['best_test_accuracy'], 2, 100)} | {_fmt(c['nnz'], 0)} | {_fmt(c['hidden_neurons'], 0)} | "
                     f"{_fmt(c['neurons_removed'], 0)} | "
                     + (f"{_fmt(c['neurons_without_inputs'], 0)} | " if inputs else "")
                     + f"{_fmt(c['seconds_per_epoch'], 2)} | {_fmt(c['late_seconds_per_epoch'], 2)} | {seeds} |")
    lines += ["", f"Mean ± sample std over seeds {', '.join(map(str, meta['seeds']))}; {meta['epochs']} epochs of "
              f"`{meta['config']}`; test accuracy after the last epoch. "
              + ("Runs of this study ran alone on the machine." if study.exclusive else
                 f"Runs of this study ran {meta['jobs']} at a time (1 thread each), so their times are "
                 "not comparable with other studies'.")]
    lines += [f"{n}" for n in study.notes]
    return "\n".join(lines) + "\n"


def figure(study: Study, cells: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy per epoch (mean ± std band), final accuracy bars, and the study's extra metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = 3 if study.extra_metric else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0))
    labels = [c["label"] for c in cells]
    for c in cells:
        mean, std = c["curve_test_accuracy"]["mean"], c["curve_test_accuracy"]["std"]
        epochs = range(1, len(mean) + 1)
        axes[0].plot(epochs, [100 * v for v in mean], marker="o", ms=3, label=c["label"])
        axes[0].fill_between(epochs, [100 * (m - s) for m, s in zip(mean, std)],
                             [100 * (m + s) for m, s in zip(mean, std)], alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (mean ± std)")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)

    def bars(ax: Any, metric: str, scale: float, ylabel: str) -> None:
        means = [(c[metric]["mean"] or 0) * scale for c in cells]
        stds = [(c[metric]["std"] or 0) * scale for c in cells]
        ax.bar(range(len(cells)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(cells))])
        ax.set_xticks(range(len(cells)), labels, rotation=20, ha="right", fontsize=8)
        ax.set(ylabel=ylabel)
        ax.grid(axis="y", alpha=0.3)
        finite = [m for m in means if m]
        if metric == "test_accuracy" and finite:
            lo = min(m - s for m, s in zip(means, stds) if m)
            ax.set_ylim(max(0.0, lo - 2.0), min(100.0, max(m + s for m, s in zip(means, stds)) + 1.0))

    bars(axes[1], "test_accuracy", 100, "final test accuracy (%)")
    axes[1].set_title("after the last epoch (mean ± std)")
    if study.extra_metric == "curve_nnz":  # the network shrinking, epoch by epoch
        for c in cells:
            mean = c["curve_nnz"]["mean"]
            axes[2].plot(range(1, len(mean) + 1), mean, marker="o", ms=3, label=c["label"])
        axes[2].set(xlabel="epoch", ylabel="nnz (connections)", title="connections after each epoch (mean)")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].legend(fontsize=8)
        axes[2].grid(alpha=0.3)
    elif study.extra_metric:
        names = {"seconds_per_epoch": "s/epoch (median)", "nnz": "nnz (connections) at the end"}
        bars(axes[2], study.extra_metric, 1.0, names[study.extra_metric])
        axes[2].set_title(names[study.extra_metric])
    fig.suptitle(study.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study(plan: Plan, study: Study, collected: Collected, out: Path, meta: dict[str, Any]) -> str:
    """Write ``out/<study>.md``, ``.json`` and ``.png``; return the markdown."""
    cells = aggregate(plan, study, collected)
    text = markdown(study, cells, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study.name}.md").write_text(text)
    (out / f"{study.name}.json").write_text(json.dumps(
        {"study": study.name, "title": study.title, "paper_claim": study.claim, "notes": study.notes, **meta,
         "cells": cells}, indent=1) + "\n")
    figure(study, cells, out / f"{study.name}.png")
    return text
