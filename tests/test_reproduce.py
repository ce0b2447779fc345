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

from _reproduce_plan import make_plan, scaled_importance_schedule, structure_notes, studies, sweep_lines  # noqa: E402
from _reproduce_report import aggregate, collect  # noqa: E402

from hpc_sparse.config import load_config  # noqa: E402
from hpc_sparse.topology.init import er_probability  # noqa: E402

FMNIST = ROOT / "configs" / "fashion-mnist.toml"


def test_the_importance_schedule_scales_with_the_run_length():
    assert scaled_importance_schedule(500) == (200, 20)  # the paper's own
    assert scaled_importance_schedule(100) == (40, 4)
    assert scaled_importance_schedule(10) == (4, 1)
    assert scaled_importance_schedule(3) == (1, 1)


def test_plan_shares_the_base_setting_between_studies():
    plan = make_plan(FMNIST, 10, [1, 2, 3], list(studies(10)))
    # 4 parallel + 2 activation + 2 topology + 2 importance + 3 density + 4 structure + 1 precision
    # cells are not the base setting
    assert len(plan.runs) == 3 * (4 + 2 + 2 + 2 + 3 + 4 + 1)
    base = next(r for r in plan.runs if r.ranks == 1 and r.sets == ("seed=1", "train.epochs=10"))
    served = {(s, c.label) for s, c, _ in plan.serves[base]}
    assert served == {("parallel", "sequential (1 rank)"), ("activation", "All-ReLU"),
                      ("topology", "SET (random regrowth)"), ("importance", "pruning off"), ("density", "epsilon 20"),
                      ("structure", "unstructured"), ("precision", "float32")}
    assert base.exclusive  # the parallel and importance studies report its time per epoch


def words_to_sets(line: str) -> tuple[str, list[str]]:
    """jobs/sweep.sbatch's reading of a line: a word ending in .toml is the config, k=v words are --set."""
    words = line.split()
    return next(w for w in words if w.endswith(".toml")), [w for w in words if "=" in w]


def test_sweep_lines_resolve_to_the_planned_runs():
    plan = make_plan(FMNIST, 10, [1, 2, 3], list(studies(10)))
    lines, ranges = sweep_lines(plan, "configs/fashion-mnist.toml", ["data.path=/scratch/fm"])
    assert len(lines) == len(plan.runs) and [r[0] for r in ranges] == [1, 2, 3]
    assert ranges[0][1] == 0 and ranges[-1][2] == len(lines) - 1
    from _reproduce_plan import signature

    for ranks, lo, hi in ranges:
        for line in lines[lo:hi + 1]:
            config, sets = words_to_sets(line)
            cfg = load_config(ROOT / config, sets)
            assert cfg.data.path == "/scratch/fm"  # where the cluster's nodes find the data
            sig = signature(cfg.to_dict(), ranks)
            assert plan.signatures[sig].ranks == ranks


def test_sweep_needs_a_data_path_the_cluster_can_see(tmp_path):
    """Fashion-MNIST's empty data.path means Debian's package folder, which cluster nodes rarely
    have: --sweep refuses in one line without --data-path, and with it every line carries it,
    as do the printed sbatch lines the interpreter that has hpc_sparse."""
    sweep = tmp_path / "sweep.txt"
    args = [sys.executable, "tools/reproduce.py", "--sweep", str(sweep), "--studies", "activation"]
    refused = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--data-path" in refused.stderr and not sweep.exists()
    assert len(refused.stderr.strip().splitlines()) == 1
    ok = subprocess.run([*args, "--data-path", "/scratch/fashion-mnist"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    runs = [line for line in sweep.read_text().splitlines() if not line.startswith("#")]
    assert len(runs) == 9 and all(line.split()[-1] == "data.path=/scratch/fashion-mnist" for line in runs)
    assert f"PYTHON={sys.executable} sbatch --ntasks=1 --array=0-8 jobs/sweep.sbatch" in ok.stdout


def test_structure_notes_are_computed_from_the_base_config():
    for path, sets in ((FMNIST, []), (FMNIST, ["model.epsilon=5", "model.layers=[784,300,100,10]"])):
        cfg = load_config(path, sets)
        text = structure_notes(cfg)[0]
        dens = [er_probability(a, b, cfg.model.epsilon) for a, b in zip(cfg.model.layers[:-2], cfg.model.layers[1:-1])]
        assert f"model.epsilon ({cfg.model.epsilon:g} " in text
        assert f"densities {min(dens):.1%}-{max(dens):.1%}" in text
        assert f"filled to {min(dens) * 16:.0%}-{max(dens) * 16:.0%} of the cap" in text  # 1:16
    assert studies(10)["structure"].notes == []  # without a config: left out, not guessed


def fake_run(folder: Path, sets: list[str], ranks: int, acc: list[float], neurons: int, extra: list[str] = (),
             sha: str = "x", summary_extra: dict | None = None) -> None:
    """A finished run folder as the CLI writes it (config.json, summary.json, metrics.jsonl)."""
    cfg = load_config(FMNIST, [*sets, *extra])
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.to_json())
    metrics = [{"epoch": i + 1, "test_accuracy": a, "neurons": neurons, "epoch_seconds": 1.0 + i} for i, a in
               enumerate(acc)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (folder / "summary.json").write_text(json.dumps({
        "test_accuracy": acc[-1], "best_test_accuracy": max(acc), "nnz": 1000, "hidden_neurons": neurons,
        "ranks": ranks, "epochs_completed": cfg.train.epochs, "model_sha256": sha, **(summary_extra or {})}))


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
    collected = collect(plan, [tmp_path])
    assert len(collected.found) == 3 and collected.other == 2 and not collected.skipped
    cells = {c["label"]: c for c in aggregate(plan, plan.studies["activation"], collected)}
    relu = cells["ReLU"]
    finals = [a[-1] for a in accs.values()]
    assert relu["n"] == 3 and relu["seeds"] == [1, 2, 3]
    assert relu["test_accuracy"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert relu["test_accuracy"]["std"] == pytest.approx(statistics.stdev(finals))
    assert relu["neurons_removed"]["mean"] == 0 and relu["seconds_per_epoch"]["mean"] == 2.0
    assert cells["All-ReLU"]["n"] == 0 and cells["All-ReLU"]["missing_seeds"] == [1, 2, 3]


def test_collect_skips_folders_it_does_not_know_and_names_the_duplicate_it_uses(tmp_path):
    plan = make_plan(FMNIST, 3, [1, 2], ["activation"])
    relu = ["train.epochs=3", "model.activation=relu"]
    fake_run(tmp_path / "a_local" / "s1", ["seed=1", *relu], 1, [0.5, 0.6, 0.7], 3000, sha="sha-local")
    fake_run(tmp_path / "b_cluster" / "s1", ["seed=1", *relu], 1, [0.5, 0.6, 0.7], 3000, ["data.path=/scratch"],
             sha="sha-cluster")
    fake_run(tmp_path / "a_local" / "s2", ["seed=2", *relu], 1, [0.5, 0.6, 0.8], 3000, sha="sha-2")
    # a `hpc-sparse convert` output of that run: same kind of files, no best_test_accuracy
    fake_run(tmp_path / "converted", ["seed=1", *relu], 1, [0.5, 0.6, 0.7], 3000,
             summary_extra={"converted_from": {"run_dir": "a_local/s1"}})
    fake_run(tmp_path / "stopped", ["seed=2", "train.epochs=3"], 1, [0.5], 3000, summary_extra={"epochs_completed": 1})
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "summary.json").write_text("{}")
    collected = collect(plan, [tmp_path])
    skipped = dict(collected.skipped)
    assert sorted(Path(d).name for d in skipped) == ["converted", "odd", "stopped"]
    assert "convert" in skipped[str(tmp_path / "converted")] and "unfinished (1 of 3" in skipped[str(tmp_path / "stopped")]
    report = "\n".join(collected.report(plan))
    assert "skipped" in report and str(tmp_path / "converted") in report
    assert (f"2 finished runs match activation/ReLU, seed 1 (different model_sha256); using "
            f"{tmp_path / 'a_local' / 's1'}, not {tmp_path / 'b_cluster' / 's1'}") in report
    cell = next(c for c in aggregate(plan, plan.studies["activation"], collected) if c["label"] == "ReLU")
    assert cell["model_sha256"] == ["sha-local", "sha-2"] and cell["seeds"] == [1, 2]
    assert cell["duplicate_run_dirs"] == {"1": [str(tmp_path / "b_cluster" / "s1")]}


def test_the_collect_command_reports_skips_and_duplicates(tmp_path):
    """End to end through --collect: a convert output no longer stops it (it did: KeyError)."""
    relu = ["train.epochs=3", "model.activation=relu"]
    fake_run(tmp_path / "runs" / "x", ["seed=1", *relu], 1, [0.5, 0.6, 0.7], 3000)
    fake_run(tmp_path / "runs" / "x_converted", ["seed=1", *relu], 1, [0.5, 0.6, 0.7], 3000,
             summary_extra={"converted_from": {}, "best_test_accuracy": None})
    proc = subprocess.run([sys.executable, "tools/reproduce.py", "--collect", str(tmp_path / "runs"), "--epochs", "3",
                           "--seeds", "1", "--studies", "activation", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # cells are missing, which it says
    assert "Traceback" not in proc.stderr and "x_converted: an `hpc-sparse convert` output" in proc.stderr
    result = json.loads((tmp_path / "out" / "activation.json").read_text())
    assert next(c for c in result["cells"] if c["label"] == "ReLU")["model_sha256"] == ["x"]


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
    assert "estimate" in proc.stdout and "6/6" in proc.stderr
    result = json.loads((out / "importance.json").read_text())
    cells = {c["label"]: c for c in result["cells"]}
    off, remove, empty = (cells[k] for k in ("pruning off", "pruning on: remove neurons",
                                             "pruning on: empty columns (paper)"))
    assert off["n"] == remove["n"] == empty["n"] == 2
    assert off["neurons_removed"]["mean"] == 0
    assert remove["neurons_removed"]["mean"] > 0  # one pruning, after epoch 3 of 4
    assert empty["neurons_removed"]["mean"] == 0 and empty["hidden_neurons"]["mean"] == 50  # neurons kept
    assert empty["nnz"]["mean"] < off["nnz"]["mean"]  # their incoming connections are gone
    assert all(len(c["model_sha256"]) == 2 and len(set(c["model_sha256"])) == 2 for c in cells.values())
    summaries = [json.loads((Path(d) / "summary.json").read_text()) for d in empty["run_dirs"]]
    assert empty["model_sha256"] == [s["model_sha256"] for s in summaries]
    assert empty["neurons_without_inputs"]["values"] == [s["neurons_without_inputs"] for s in summaries]
    assert (out / "importance.png").stat().st_size > 10_000
    assert "| pruning on: empty columns (paper) | 1 |" in (out / "importance.md").read_text()
    # the same results from the finished folders; a second --quick reuses them
    again = subprocess.run([*args, "--collect", str(runs), "--out", str(tmp_path / "again")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "importance.json").read_text())["cells"] == result["cells"]
    rerun = subprocess.run([*args, "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CI": "1"})
    assert rerun.returncode == 0 and "6 already finished" in rerun.stdout
