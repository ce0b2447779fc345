"""``hpc-sparse convert`` end to end on a tiny trained run (real CLI in subprocesses), plus the
in-process layer conversion (weights and momentum dropped together)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.checkpoint import load_checkpoint
from hpc_sparse.convert import ConvertRequest, convert_layers
from hpc_sparse.topology.structure import NMStructure, violations
from helpers import tiny_mlp
from hpc_sparse.runtime.launcher import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "synthetic-quick.toml"), "--set", "data.n_train=1200",
        "--set", "data.n_test=400", "--set", "model.layers=[500,64,48,4]", "--set", "model.epsilon=5",
        "--set", "train.epochs=2", "--set", "importance.enabled=false"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPC_SPARSE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hpc_sparse", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_state(path: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below ``path``: proves a folder was not touched."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def newest_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("src") / "run"
    cli("train", *TINY, "--run-dir", str(run), "--quiet")
    return run


def check_converted(src: Path, out: Path, n: int, m: int, transposable: bool) -> dict:
    """The output checkpoint holds the constraint on every layer but the output one, which is
    unchanged; kept weights and their momentum equal the source's at the same positions."""
    s_state, _, _ = load_checkpoint(newest_checkpoint(src))
    o_state, o_manifest, _ = load_checkpoint(sorted((out / "checkpoints").glob("step-*"))[0])
    n_layers = len([k for k in o_state if k.endswith("/W")])
    for l in range(n_layers):
        w_src, w_out = s_state[f"layers/{l}/W"], o_state[f"layers/{l}/W"]
        if l == n_layers - 1:
            assert (w_src != w_out).nnz == 0
            np.testing.assert_array_equal(s_state[f"layers/{l}/W_velocity"], o_state[f"layers/{l}/W_velocity"])
            continue
        assert violations(w_out, NMStructure(n, m, transposable)) == 0
        d_src, d_out = w_src.toarray(), w_out.toarray()
        kept = d_out != 0
        np.testing.assert_array_equal(d_out[kept], d_src[kept])
        v_src = sp.csr_matrix((s_state[f"layers/{l}/W_velocity"], w_src.indices, w_src.indptr), shape=w_src.shape)
        v_out = sp.csr_matrix((o_state[f"layers/{l}/W_velocity"], w_out.indices, w_out.indptr), shape=w_out.shape)
        np.testing.assert_array_equal(v_out.toarray()[kept], v_src.toarray()[kept])
        assert o_state[f"layers/{l}/W_velocity"].shape == (w_out.nnz,)
    return o_manifest


def test_convert_transposable_then_evaluate_info_resume(trained: Path, tmp_path: Path) -> None:
    before = tree_state(trained)
    out = tmp_path / "t14"
    proc = cli("convert", "--run-dir", str(trained), "--structure", "nm_transposable", "--nm", "1:4",
               "--out", str(out))
    assert "retained L1" in proc.stdout and "output layer: kept" in proc.stdout
    report = json.loads((out / "conversion.json").read_text())
    rows = report["layers"]
    assert [r["converted"] for r in rows] == [True, True, False]
    assert sum(r["nnz_before"] - r["nnz_after"] for r in rows) > 0  # 1:4 really removes connections
    assert all(0.0 < r["retained_l1"] <= 1.0 for r in rows)
    manifest = check_converted(trained, out, 1, 4, transposable=True)
    meta = manifest["meta"]
    assert meta["conversion"]["source"]["step"] == manifest["step"]
    assert meta["model_sha256"] == report["after"]["model_sha256"]
    assert tree_state(trained) == before  # the source run is only read

    ev = json.loads(cli("evaluate", "--run-dir", str(out)).stdout)
    assert ev["test_accuracy"] == pytest.approx(report["after"]["test_accuracy"])
    assert ev["model_sha256"] == report["after"]["model_sha256"]
    info = cli("info", "--run-dir", str(out)).stdout
    assert "valid" in info and report["after"]["model_sha256"] in info

    # one more epoch from the converted checkpoint with its own config (the last epoch never evolves)
    cli("train", "--config", str(out / "config.toml"), "--set", "train.epochs=3", "--run-dir", str(out),
        "--resume", "auto", "--quiet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["nnz"] == report["after"]["nnz"]
    final, _, _ = load_checkpoint(newest_checkpoint(out))
    for l in range(len(rows) - 1):
        assert violations(final[f"layers/{l}/W"], NMStructure(1, 4, True)) == 0
    assert tree_state(trained) == before


def test_convert_nm_with_finetune_and_named_checkpoint(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "nm14"
    name = newest_checkpoint(trained).name
    cli("convert", "--run-dir", str(trained), "--structure", "nm", "--nm", "1:4", "--out", str(out),
        "--checkpoint", name, "--finetune-epochs", "2", "--quiet")
    report = json.loads((out / "conversion.json").read_text())
    assert report["method"] == "top-n" and report["finetune"]["epochs"] == 2
    check_converted(trained, out, 1, 4, transposable=False)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [1, 2, 2, 3, 4]  # history, the conversion, the fine-tune
    assert "converted" in metrics[2]["phase"]
    final, manifest, _ = load_checkpoint(newest_checkpoint(out))
    assert manifest["meta"]["progress"]["epoch"] == 4 and manifest["meta"]["config"]["topology"]["evolve_every"] == 0
    for l in range(2):  # the mask stayed fixed through the fine-tune
        assert violations(final[f"layers/{l}/W"], NMStructure(1, 4, False)) == 0
    assert final["layers/0/W"].nnz == report["layers"][0]["nnz_after"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(report["finetune"]["test_accuracy"])


def test_exact_retains_at_least_greedy_and_two_ranks_give_the_same_model(trained: Path, tmp_path: Path) -> None:
    runs = {}
    for method in ("greedy", "exact"):
        runs[method] = tmp_path / method
        cli("convert", "--run-dir", str(trained), "--structure", "nm_transposable", "--nm", "1:4", "--method", method,
            "--out", str(runs[method]), "--quiet")
    g, x = (json.loads((runs[k] / "conversion.json").read_text()) for k in ("greedy", "exact"))
    for rg, rx in zip(g["layers"], x["layers"]):
        assert rx["retained_l1"] >= rg["retained_l1"] - 1e-12
        assert rg["retained_l1"] >= 0.5 * rx["retained_l1"]
    check_converted(trained, runs["exact"], 1, 4, transposable=True)

    two = tmp_path / "greedy-2ranks"
    proc = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpc_sparse", "convert",
                           "--run-dir", str(trained), "--structure", "nm_transposable", "--nm", "1:4",
                           "--out", str(two), "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HPC_SPARSE_THREADS": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    r2 = json.loads((two / "conversion.json").read_text())
    assert r2["after"]["model_sha256"] == g["after"]["model_sha256"]
    assert r2["after"]["test_accuracy"] == pytest.approx(g["after"]["test_accuracy"])
    assert len(list(newest_checkpoint(two).glob("shard-*"))) == 2


@pytest.mark.parametrize("case", ["exists", "inside_source", "bad_nm", "n_ge_m", "no_run", "bad_checkpoint"])
def test_convert_errors_are_one_line_and_touch_nothing(trained: Path, tmp_path: Path, case: str) -> None:
    before = tree_state(trained)
    out = tmp_path / "out"
    args = {"run": str(trained), "out": str(out), "nm": "2:4", "extra": []}
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "inside_source":
        args["out"] = str(trained / "converted")
    elif case == "bad_nm":
        args["nm"] = "2-4"
    elif case == "n_ge_m":
        args["nm"] = "4:4"
    elif case == "no_run":
        args["run"] = str(tmp_path / "missing")
    elif case == "bad_checkpoint":
        args["extra"] = ["--checkpoint", "step-999999999"]
    proc = cli("convert", "--run-dir", args["run"], "--structure", "nm", "--nm", args["nm"], "--out", args["out"],
               *args["extra"], check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fix:" in lines[0], proc.stderr
    assert tree_state(trained) == before
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine" and not (out / "checkpoints").exists()
    elif case != "inside_source":
        assert not out.exists()
    else:
        assert not (trained / "converted").exists()


def test_convert_layers_drops_momentum_with_weights() -> None:
    model = tiny_mlp(widths=(13, 11, 9, 4), epsilon=6.0, seed=3)
    rng = np.random.default_rng(0)
    src = []
    for layer in model.layers:
        layer.w_velocity = rng.standard_normal(layer.nnz).astype(np.float32)
        src.append((layer.weight.copy(), layer.w_velocity.copy()))
    req = ConvertRequest(Path("a"), Path("b"), "nm_transposable", 1, 3)
    rows = convert_layers(model, req)
    for l, (layer, (w0, v0)) in enumerate(zip(model.layers, src)):
        v_src = sp.csr_matrix((v0, w0.indices, w0.indptr), shape=w0.shape).toarray()
        v_new = sp.csr_matrix((layer.w_velocity, layer.weight.indices, layer.weight.indptr), shape=w0.shape).toarray()
        kept = layer.weight.toarray() != 0
        np.testing.assert_array_equal(v_new[kept], v_src[kept])
        np.testing.assert_array_equal(v_new[~kept], 0)
        assert rows[l]["nnz_after"] == layer.nnz
        if l < 2:
            assert violations(layer.weight, NMStructure(1, 3, True)) == 0
        else:
            assert layer.nnz == w0.nnz


@pytest.mark.parametrize("name", ["fashion-mnist-fast.toml", "synthetic-quick.toml"])
def test_config_toml_round_trip(tmp_path: Path, name: str) -> None:
    from hpc_sparse.config import load_config
    from hpc_sparse.convert_report import write_config_toml

    cfg = load_config(ROOT / "configs" / name, ["data.path=\"a \\\"quoted\\\" path\""])
    write_config_toml(tmp_path / "c.toml", cfg.to_dict())
    assert load_config(tmp_path / "c.toml").to_dict() == cfg.to_dict()


def test_converted_config_lowers_an_epsilon_above_the_cap(tmp_path: Path) -> None:
    """epsilon only sets the initial density: a source trained denser than N:M allows still
    converts, with model.epsilon lowered to the largest value the structure accepts."""
    from hpc_sparse.config import largest_nm_epsilon, load_config
    from hpc_sparse.convert import converted_config

    cfg = load_config(TINY[1], TINY[3::2])  # epsilon 5: layer 64x48 has density 0.18 > 1/8
    req = ConvertRequest(run_dir=tmp_path / "a", out=tmp_path / "b", structure="nm_transposable", n=1, m=8)
    out = converted_config(cfg, req)
    assert out.topology.structure == "nm_transposable" and (out.topology.nm_n, out.topology.nm_m) == (1, 8)
    assert out.model.epsilon == largest_nm_epsilon(cfg.model.layers, 1, 8) < cfg.model.epsilon
    assert converted_config(cfg, ConvertRequest(tmp_path / "a", tmp_path / "b", "nm", 2, 4)).model.epsilon == 5
