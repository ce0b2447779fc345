#!/usr/bin/env python3
"""Plot a run's loss, accuracy, nnz and hidden neurons against epoch to a PNG.

    python tools/plot_run.py RUN_DIR [--out RUN_DIR/curves.png] [--compare OTHER_RUN_DIR ...]

Needs matplotlib (``pip install -e .[plot]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"plot_run: {path} not found; fix: pass the --run-dir of a training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path, nargs="*", default=[], help="more runs drawn on the same axes")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_run: matplotlib is missing; fix: pip install -e .[plot]")

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for run in [args.run_dir, *args.compare]:
        rows = read_metrics(run)
        ep = [r["epoch"] for r in rows]
        label = run.name
        axes[0, 0].plot(ep, [r["train_loss"] for r in rows], "--", label=f"{label} train")
        axes[0, 0].plot(ep, [r["test_loss"] for r in rows], label=f"{label} test")
        axes[0, 1].plot(ep, [r["test_accuracy"] for r in rows], marker="o", ms=3, label=label)
        axes[1, 0].plot(ep, [r["nnz"] for r in rows], label=label)
        axes[1, 1].plot(ep, [r["neurons"] for r in rows], label=label)
    for ax, title in zip(axes.flat, ["loss", "test accuracy", "nnz (connections)", "hidden neurons"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = args.out or args.run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
