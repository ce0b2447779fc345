"""tools/bench_width.py at toy widths: it runs the product's train_step and prints the keys the
issue names, and its plot can be redrawn from a saved run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"width", "nnz", "batch", "threads", "ms_per_step", "ns_per_connection", "cost_growth",
        "traffic_bound_ms", "x_traffic_bound", "activation_dtype", "predicted_bytes", "predicted_row_bytes",
        "predicted_ms"}


def test_bench_width_lines_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    tool = str(ROOT / "tools" / "bench_width.py")
    out = subprocess.run([sys.executable, tool, "--widths", "1000,1500", "--threads", "1", "--repeats", "1",
                          "--batch", "16"], capture_output=True, text=True, check=True, timeout=300).stdout
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert [(r["width"], r["activation_dtype"]) for r in lines] == [(1000, "float32"), (1000, "bfloat16"),
                                                                     (1500, "float32"), (1500, "bfloat16")]
    for r in lines:
        assert KEYS <= r.keys()
        assert r["ms_per_step"] > 0 and r["traffic_bound_ms"] >= 0 and r["bound_GBps"] > 0
        # toy layers fit in the caches: no DRAM traffic is compulsory, so there is no ratio
        assert (r["x_traffic_bound"] is None) == (r["traffic_bound_ms"] == 0)
        assert r["predicted_bytes"] > 0 and r["predicted_ms"] > 0
        assert r["ns_per_connection"] == pytest.approx(r["ms_per_step"] * 1e6 / (r["nnz"] * 16), rel=1e-3)  # emitted rounded
        assert ("speedup_vs_float32" in r) == (r["activation_dtype"] == "bfloat16")
    assert lines[0]["cost_growth"] == pytest.approx(1.0) and lines[1]["cost_growth"] == pytest.approx(1.0)
    saved = tmp_path / "width.jsonl"
    saved.write_text(out)
    png = tmp_path / "width.png"
    subprocess.run([sys.executable, tool, "--plot", str(png), "--from", str(saved)], check=True, timeout=120)
    assert png.stat().st_size > 1000
