"""Markdown table of ``hpc-sparse convert`` results, read from each output run's conversion.json.

    python tools/nm_conversion_table.py runs/fmf-nm24 runs/fmf-tnm24-greedy ... [--control runs/fmf-control]

One row per converted run: structure, method, nnz of the converted (hidden) layers before and
after, retained L1 fraction per converted layer, test accuracy before, after the conversion
and after the fine-tune (if one ran), and the conversion time. ``--control`` names a run that
continued the source for the same number of epochs without conversion (its final accuracy is
printed below the table, to compare the fine-tune with).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(run: Path) -> str:
    r = json.loads((run / "conversion.json").read_text())
    conv = [x for x in r["layers"] if x["converted"]]
    before, after = sum(x["nnz_before"] for x in conv), sum(x["nnz_after"] for x in conv)
    l1 = " / ".join(f"{x['retained_l1']:.4f}" for x in conv)
    ft = r.get("finetune")
    ft_text = f"{ft['test_accuracy']:.4f} ({ft['epochs']} ep.)" if ft else "–"
    secs = sum(x["seconds"] for x in conv)
    return (f"| {r['structure']} {r['nm_n']}:{r['nm_m']} | {r['method']} | {before:,} → {after:,} "
            f"({after / before:.4f}) | {l1} | {r['before']['test_accuracy']:.4f} | {r['after']['test_accuracy']:.4f} "
            f"| {ft_text} | {secs:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="output run dirs of hpc-sparse convert")
    ap.add_argument("--control", type=Path, help="the source continued without conversion (its summary.json)")
    args = ap.parse_args()
    print("| structure | method | nnz of converted layers (kept) | retained L1 per layer | test acc. before "
          "| after conversion | after fine-tune | conversion s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        print(row(run))
    if args.control:
        s = json.loads((args.control / "summary.json").read_text())
        print(f"\ncontrol (no conversion, same extra epochs, mask fixed): test accuracy {s['test_accuracy']:.4f} "
              f"after {s['epochs_completed']} epochs")


if __name__ == "__main__":
    main()
