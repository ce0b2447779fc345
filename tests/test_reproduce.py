"""tools/reproduce.py: the plan, the sweep file, matching finished runs, the statistics, and one
small end-to-end --quick run through the real CLI."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from _reproduce_plan import make_plan, scaled_importance_schedule, studies, sweep_lines  # noqa: E402
from _reproduce_report import aggregate, collect  # noqa: E402

from hpc_sparse.config import load_config  # noqa: E402

FMNIST = ROOT / "configs" / "fashion-mnist.toml"


def test_the_importance_schedule_scales_with_the_run_length():
    assert scaled_importance_schedule(500) == (200, 20)  # the paper's own
    assert scaled_importance_schedule(100) == (40, 4)
    assert scaled_importance_schedule(10) == (4, 1)
    assert scaled_importance_schedule(3) == (1, 1)


def test_plan_shares_the_base_setting_between_studies():
    plan = make_plan(FMNIST, 10, [1, 2, 3], list(studies(10)))
    # 4 parallel + 2 activation + 2 topology + 1 importance + 3 density + 4 structure cells are not
    # the base setting
    assert len(plan.runs) == 3 * (4 + 2 + 2 + 1 + 3 + 4)
    base = next(r for r in plan.runs if r.ranks == 1 and r.sets == ("seed=1", "train.epochs=10"))
    served = {(s, c.label) for s, c, _ in plan.serves[base]}
    assert served == {("parallel", "sequential (1 rank)"), ("activation", "All-ReLU"),
                      ("topology", "SET (random regrowth)"), ("importance", "pruning off"), ("density", "epsilon 20"),
                      ("structure", "unstructured")}
    assert base.exclusive  # the parallel and importance studies report its time per epoch


def words_to_sets(line: str) -> tuple[str, list[str]]:
    """jobs/sweep.sbatch's reading of a line: a word ending in .toml is the config, k=v words are --set."""
    words = line.split()
    return next(w for w in words if w.endswith(".toml")), [w for w in words if "=" in w]


def test_sweep_lines_resolve_to_the_planned_runs():
    plan = make_plan(FMNIST, 10, [1, 2, 3], list(studies(10)))
    lines, ranges = sweep_lines(plan, "configs/fashion-mnist.toml")
    assert len(lines) == len(plan.runs) and [r[0] for r in ranges] == [1, 2, 3]
    assert ranges[0][1] == 0 and ranges[-1][2] == len(lines) - 1
    from _reproduce_plan import signature

    for ranks, lo, hi in ranges:
        for line in lines[lo:hi + 1]:
            config, sets = words_to_sets(line)
            sig = signature(load_config(ROOT / config, sets).to_dict(), ranks)
            assert plan.signatures[sig].ranks == ranks


def fake_run(folder: Path, sets: list[str], ranks: int, acc: list[float], neurons: int, extra: list[str] = ()) -> None:
    """A finished run folder as the CLI writes it (config.json, summary.json, metrics.jsonl)."""
    cfg = load_config(FMNIST, [*sets, *extra])
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.to_json())
    metrics = [{"epoch": i + 1, "test_accuracy": a, "neurons": neurons, "epoch_seconds": 1.0 + i} for i, a in
               enumerate(acc)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (folder / "summary.json").write_text(json.dumps({
        "test_accuracy": acc[-1], "best_test_accuracy": max(acc), "nnz": 1000, "hidden_neurons": neurons,
        "ranks": ranks, "epochs_completed": cfg.train.epochs, "model_sha256": "x"}))


def test_collect_matches_runs_by_configuration_wherever_they_ran(tmp_path):
    plan = make_plan(FMNIST, 3, [1, 2, 3], ["activation"])
    accs = {1: [0.5, 0.6, 0.70], 2: [0.5, 0.6, 0.74], 3: [0.5, 0.6, 0.81]}
    for seed, acc in accs.items():  # ReLU runs, from a cluster: other data path, threads and folder names
        fake_run(tmp_path / "cluster" / f"reproduce_{seed}", [f"seed={seed}", "train.epochs=3",
                 "model.activation=relu"], 1, acc, 3000, ["data.path=/scratch/fm", "train.threads=8"])
    fake_run(tmp_path / "x" / "other_epochs", ["seed=1", "train.epochs=4", "model.activation=relu"], 1,
             [0.1] * 4, 3000)  # another epoch count: not this plan's
    fake_run(tmp_path / "x" / "two_ranks", ["seed=1", "train.epochs=3", "model.activation=relu"], 2,
             [0.2] * 3, 3000)  # another rank count: not this plan's
    found = collect(plan, [tmp_path])
    assert len(found) == 3
    cells = {c["label"]: c for c in aggregate(plan, plan.studies["activation"], found)}
    relu = cells["ReLU"]
    finals = [a[-1] for a in accs.values()]
    assert relu["n"] == 3 and relu["seeds"] == [1, 2, 3]
    assert relu["test_accuracy"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert relu["test_accuracy"]["std"] == pytest.approx(statistics.stdev(finals))
    assert relu["neurons_removed"]["mean"] == 0 and relu["seconds_per_epoch"]["mean"] == 2.0
    assert cells["All-ReLU"]["n"] == 0 and cells["All-ReLU"]["missing_seeds"] == [1, 2, 3]


def test_quick_runs_the_cli_and_writes_tables_json_and_figures(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text("seed = 1\n[data]\nname = \"synthetic\"\nn_train = 600\nn_test = 200\nn_features = 40\n"
                      "n_informative = 8\nn_classes = 3\n[model]\nlayers = [40, 30, 20, 3]\nepsilon = 5\n"
                      "[train]\nbatch_size = 64\n[checkpoint]\nat_end = false\n")
    out, runs = tmp_path / "results", tmp_path / "runs"
    args = [sys.executable, "tools/reproduce.py", "--config", str(config), "--epochs", "4", "--seeds", "2",
            "--studies", "importance", "--runs-dir", str(runs), "--out", str(out)]
    proc = subprocess.run([*args, "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CI": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "estimate" in proc.stdout and "4/4" in proc.stderr
    result = json.loads((out / "importance.json").read_text())
    cells = {c["label"]: c for c in result["cells"]}
    assert cells["pruning off"]["n"] == 2 and cells["pruning on"]["n"] == 2
    assert cells["pruning off"]["neurons_removed"]["mean"] == 0
    assert cells["pruning on"]["neurons_removed"]["mean"] > 0  # one pruning, after epoch 3 of 4
    assert (out / "importance.png").stat().st_size > 10_000
    assert "| pruning on | 1 |" in (out / "importance.md").read_text()
    # the same results from the finished folders; a second --quick reuses them
    again = subprocess.run([*args, "--collect", str(runs), "--out", str(tmp_path / "again")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "importance.json").read_text())["cells"] == result["cells"]
    rerun = subprocess.run([*args, "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CI": "1"})
    assert rerun.returncode == 0 and "4 already finished" in rerun.stdout
