"""Output of ``hpc-sparse convert``: the per-layer table, and the converted run's config as TOML
(so that ``hpc-sparse train --config D2/config.toml --run-dir D2 --resume auto`` continues it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def format_table(report: dict[str, Any]) -> str:
    """The conversion report (see :func:`hpc_sparse.convert.run_convert`) as a text table."""
    head = (f"{report['structure']} {report['nm_n']}:{report['nm_m']} (method {report['method']}) from "
            f"{report['source']['checkpoint']}")
    lines = [head, f"  {'layer':>6} {'shape':>13} {'nnz before':>11} {'nnz after':>11} {'kept nnz':>9} "
                   f"{'retained L1':>12}"]
    for r in report["layers"]:
        shape = "x".join(str(s) for s in r["shape"])
        name = str(r["layer"]) if r["converted"] else f"{r['layer']} out"
        lines.append(f"  {name:>6} {shape:>13} {r['nnz_before']:>11,} {r['nnz_after']:>11,} "
                     f"{r['nnz_after'] / max(r['nnz_before'], 1):>9.4f} "
                     f"{r['retained_l1']:>12.4f}" + ("" if r["converted"] else "  (output layer: kept)"))
    b, a = report["before"], report["after"]
    lines.append(f"  total nnz {b['nnz']:,} -> {a['nnz']:,}; test accuracy {b['test_accuracy']:.4f} before, "
                 f"{a['test_accuracy']:.4f} after conversion")
    ft = report.get("finetune")
    if ft:
        lines.append(f"  after {ft['epochs']} fine-tune epoch(s) with the mask fixed: test accuracy "
                     f"{ft['test_accuracy']:.4f}")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string for these values
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def write_config_toml(path: Path, config: dict[str, Any]) -> None:
    """Write a :meth:`Config.to_dict` dict as TOML: top-level keys, then one table per section."""
    lines = ["# written by hpc-sparse convert: the converted run's config"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, values in config.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
