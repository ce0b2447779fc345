"""tools/bench_kernels.py at a toy width: hpc_sparse's ops are the product's (the tool refuses to
run otherwise), every contender that runs was checked against them first, every one that does
not says why, and the rounding tolerance of the check rejects a wrong result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_kernels  # noqa: E402

KEYS = {"bench", "width", "op", "contender", "description", "ms", "hpc_ms", "ratio_to_hpc", "nnz", "batch",
        "threads", "library_threads", "loadavg"}


def test_bench_kernels_lines() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--widths", "500",
                          "--repeats", "1", "--threads", "1", "--batch", "32"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert {(r["op"], r["contender"]) for r in lines} == {
        (op, c) for op in bench_kernels.OPS for c in ("hpc_sparse", "torch", "mkl", "scipy")}
    for r in lines:
        assert KEYS <= r.keys() and r["width"] == 500 and r["batch"] == 32 and r["threads"] == 1
        assert r["library_threads"]["numba"] == 1 and r["nnz"] > 0
        if r["ms"] is None:
            assert r["contender"] != "hpc_sparse" and r["skipped"]  # says why
            continue
        assert r["ms"] > 0 and r["ratio_to_hpc"] == pytest.approx(r["ms"] / r["hpc_ms"], rel=2e-3)
        if r["contender"] == "hpc_sparse":
            assert r["check"] == {"bit_identical_to_product": True}
        else:
            assert r["check"]["passed"] and 0 <= r["check"]["max_err_over_tolerance"] <= 1
    assert all(r["ms"] for r in lines if r["contender"] == "scipy")  # scipy is always there
    torch_lines = [r for r in lines if r["contender"] == "torch"]
    try:
        import torch  # noqa: F401
    except ImportError:
        assert all("torch not installed" in r["skipped"] for r in torch_lines)
    else:
        assert all(r["ms"] for r in torch_lines) and all(r["library_threads"]["torch"] == 1 for r in lines)


def test_check_tolerance_accepts_rounding_and_rejects_errors() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 200)).astype(np.float32)
    b = rng.standard_normal((200, 8)).astype(np.float32)
    mag = np.abs(a).astype(np.float64) @ np.abs(b)
    ours = a @ b  # float32 sums of 200 products, BLAS order
    exact = a.astype(np.float64) @ b.astype(np.float64)
    theirs = np.zeros((64, 8), np.float32)
    for k in range(200):  # another order: one term at a time
        theirs += a[:, k:k + 1] * b[k]
    assert bench_kernels.check(ours, theirs, mag, 200) <= 1
    assert bench_kernels.check(ours, exact, mag, 200) <= 1
    wrong = theirs.copy()
    wrong[3, 2] += 1e-3 * mag[3, 2]  # one element off by far more than rounding can explain
    assert bench_kernels.check(ours, wrong, mag, 200) > 1
    assert bench_kernels.check(np.zeros(3), np.array([0.0, 1e-30, 0.0]), np.zeros(3), 1) == float("inf")
