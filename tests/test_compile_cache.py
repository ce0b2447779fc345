"""The trained model does not depend on whether numba compiled its kernels just now or loaded
them from its on-disk cache, nor on the thread count.

numba runs freshly compiled code from its in-process JIT but writes (and later loads) object
code emitted separately; with the ``nsz`` fast-math flag the two were seen to round the
fused backward kernel differently, so a requeued SLURM job (warm cache) could not reproduce
an uninterrupted one (cold cache). The kernels now allow only reassociation and FMA
contraction; this test trains the same config with an empty cache, then with that cache
warm, at 1 and 2 threads, with float32 and with bfloat16 activations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(run_dir: Path, cache_dir: Path, threads: int, dtype: str) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "HPC_SPARSE_THREADS": str(threads),
           "NUMBA_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "hpc_sparse", "train", "--config", str(ROOT / "configs" / "synthetic-quick.toml"),
           "--run-dir", str(run_dir), "--quiet", "--set", "train.epochs=5", "--set", "checkpoint.every_steps=10",
           "--set", "checkpoint.keep=3", "--set", "data.n_train=3000", "--set", f"train.activation_dtype={dtype}"]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, got.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())["model_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_model_with_cold_and_warm_kernel_cache(tmp_path, dtype):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    cold = _train(tmp_path / "cold", cache, 2, dtype)
    assert any(cache.rglob("*.nbi")), "the first run should have written numba's cache"
    warm = _train(tmp_path / "warm", cache, 2, dtype)
    warm_1 = _train(tmp_path / "warm1", cache, 1, dtype)
    assert cold == warm == warm_1
