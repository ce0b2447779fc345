"""End-to-end runs of the real CLI in a subprocess (one process, no launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "synthetic-quick.toml")
SMALL = ["--set", "data.n_train=1500", "--set", "data.n_test=500", "--set", "model.layers=[500,100,50,4]",
         "--set", "train.epochs=4", "--set", "importance.start_epoch=1", "--set", "importance.every=2"]


def cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {**os.environ, "HPC_SPARSE_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "hpc_sparse", *args], capture_output=True, text=True,
                          timeout=300, env=run_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("quick")
    proc = cli("train", "--config", QUICK, "--run-dir", str(run))
    return run, proc


def test_quick_run_learns_and_writes_outputs(quick_run):
    run, proc = quick_run
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for key in ("epoch", "train_loss", "test_loss", "test_accuracy", "nnz", "neurons", "epoch_seconds",
                "samples_per_second"):
        assert key in lines[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.8  # 4 classes: chance is 0.25
    assert len(summary["model_sha256"]) == 64
    # importance pruning shrank the hidden layers and was logged
    assert summary["widths"][1] < 400 and "importance pruning" in proc.stderr
    assert lines[-1]["neurons"] < lines[0]["neurons"]
    assert "epoch 12/12" in proc.stderr  # plain per-epoch lines when not a TTY


def test_info_and_evaluate(quick_run):
    run, _ = quick_run
    info = cli("info", "--run-dir", str(run)).stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_sha256"] in info and "density" in info and "valid" in info
    ev = json.loads(cli("evaluate", "--run-dir", str(run)).stdout)
    assert ev["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert ev["model_sha256"] == summary["model_sha256"]


def test_same_seed_same_model(tmp_path):
    a = cli("train", "--config", QUICK, *SMALL, "--run-dir", str(tmp_path / "a"))
    b = cli("train", "--config", QUICK, *SMALL, "--run-dir", str(tmp_path / "b"))
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())["model_sha256"]
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())["model_sha256"]
    assert sa == sb, (a.stderr, b.stderr)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    cli("train", "--config", QUICK, *SMALL, "--run-dir", str(full))
    part = tmp_path / "part"
    cli("train", "--config", QUICK, *SMALL, "--set", "train.max_steps=30", "--run-dir", str(part))
    resumed = cli("train", "--config", QUICK, *SMALL, "--run-dir", str(part), "--resume", "auto")
    assert "resumed from" in resumed.stderr
    s_full = json.loads((full / "summary.json").read_text())
    s_part = json.loads((part / "summary.json").read_text())
    assert s_part["model_sha256"] == s_full["model_sha256"]
    assert s_part["test_accuracy"] == s_full["test_accuracy"]


def test_data_shape_mismatch_is_a_clear_error(tmp_path):
    proc = cli("train", "--config", QUICK, "--set", "model.layers=[784,100,4]", "--run-dir", str(tmp_path),
               check=False)
    assert proc.returncode == 2
    assert "model.layers starts with 784 inputs but the synthetic data has 500 features; fix:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_divergence_stops_cleanly_and_keeps_the_checkpoint(tmp_path):
    cli("train", "--config", QUICK, *SMALL, "--set", "train.epochs=1", "--run-dir", str(tmp_path))
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert ckpts
    before = {p: p.stat().st_mtime_ns for p in ckpts[-1].iterdir()}
    proc = cli("train", "--config", QUICK, *SMALL, "--set", "train.lr=1e30", "--set", "model.dropout=0",
               "--run-dir", str(tmp_path), "--resume", "auto", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "diverged" in proc.stderr and "fix: lower train.lr" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in ckpts[-1].iterdir()} == before


def test_missing_config_file(tmp_path):
    proc = cli("train", "--config", str(tmp_path / "x.toml"), "--run-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not found; fix:" in proc.stderr


def test_config_help_lists_keys():
    out = cli("config-help").stdout
    for key in ("data.name", "model.layers", "model.epsilon", "train.lr", "parallel.sync_every", "seed"):
        assert key in out


def test_plot_run_draws_a_png(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    run, _ = quick_run
    out = tmp_path / "curves.png"
    subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), str(run), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
