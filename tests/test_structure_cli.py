"""N:M training through the real CLI: resume reproduces the uninterrupted run, `info` reports
the constraint and the mask diversity, and a checkpoint that breaks the constraint is refused."""

from __future__ import annotations

import json

import pytest

from hpc_sparse.topology.structure import NMStructure, log10_mask_diversity
from test_cli import QUICK, SMALL, cli

NM = [*SMALL, "--set", "model.epsilon=10", "--set", "topology.structure=nm_transposable",
      "--set", "topology.growth=gradient", "--set", "importance.enabled=true"]


def test_structured_run_resumes_exactly_and_info_reports_it(tmp_path):
    full = tmp_path / "full"
    cli("train", "--config", QUICK, *NM, "--run-dir", str(full))
    part = tmp_path / "part"
    cli("train", "--config", QUICK, *NM, "--set", "train.max_steps=30", "--run-dir", str(part))
    cli("train", "--config", QUICK, *NM, "--run-dir", str(part), "--resume", "auto")
    s_full = json.loads((full / "summary.json").read_text())
    s_part = json.loads((part / "summary.json").read_text())
    assert s_part["model_sha256"] == s_full["model_sha256"]
    info = cli("info", "--run-dir", str(full)).stdout
    assert "structure: transposable 2:4 on layers 0..1" in info
    rows = [line.split() for line in info.splitlines()[info.splitlines().index(
        "structure: transposable 2:4 on layers 0..1 (the output layer is unconstrained)") + 2:][:2]]
    widths = s_full["widths"]
    for l, (layer, violations, md) in enumerate(rows):
        assert int(layer) == l and violations == "0"
        shape = (widths[l], widths[l + 1])
        assert float(md.replace(",", "")) == pytest.approx(log10_mask_diversity(shape, NMStructure(2, 4, True)),
                                                           abs=0.05)
    # the same run read as plain 1:4 (a tighter constraint than it was trained under) is refused
    bad = cli("train", "--config", QUICK, *NM, "--set", "topology.nm_n=1", "--set", "model.epsilon=2",
              "--run-dir", str(full), "--resume", "auto", check=False)
    assert bad.returncode == 2 and "violates transposable 1:4 sparsity" in bad.stderr, bad.stderr
    assert widths[1] < 100
