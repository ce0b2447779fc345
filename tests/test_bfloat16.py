"""bfloat16 activation storage (``train.activation_dtype = "bfloat16"``) at the model level:
gradients against a float64 reference of the network that rounds where the kernels store,
the same determinism as float32 (thread count, resume), the model's stored state staying
float32, and what each dtype stores per element. Kernel-level checks live in
test_kernels.py; the cold/warm compile cache in test_compile_cache.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from hpc_sparse.sparse import SGD, dropout_key
from hpc_sparse.sparse.kernels_elementwise import BF16, from_bfloat16, to_bfloat16

from helpers import tiny_mlp

ROOT = Path(__file__).resolve().parents[1]


def rounded(x: np.ndarray) -> np.ndarray:
    """What a bfloat16 store keeps of a float64 value (via float32, as the kernels compute)."""
    return from_bfloat16(to_bfloat16(x.astype(np.float32))).astype(np.float64)


@pytest.mark.parametrize("name", ["allrelu", "tanh", "sigmoid"])
def test_gradients_match_a_float64_reference_that_rounds_where_the_kernels_store(name):
    rng = np.random.default_rng(3)
    model = tiny_mlp(widths=(20, 16, 12, 5), activation=name, epsilon=4)
    model.set_activation_dtype("bfloat16")
    x = rng.standard_normal((9, 20)).astype(np.float32)
    y = rng.integers(0, 5, 9).astype(np.int32)
    loss, gw, gb = model.gradients(x, y)
    ws = [l.weight.toarray().astype(np.float64) for l in model.layers]
    zs, a_s = [], [rounded(x)]
    for l, layer in enumerate(model.layers):
        z = a_s[-1] @ ws[l] + layer.bias
        zs.append(z)
        if l < len(ws) - 1:
            a_s.append(rounded(model.activations[l](z)))
    p = np.exp(zs[-1] - zs[-1].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(9), y] -= 1
    delta = p / 9
    for l in range(len(ws) - 1, -1, -1):
        d = rounded(delta)  # every delta is stored, the logits' one too
        g = (a_s[l].T @ d)
        coo = model.layers[l].weight.tocoo()
        scale = np.abs(g).max()
        np.testing.assert_allclose(gw[l], g[coo.row, coo.col], rtol=2 ** -6, atol=2 ** -7 * scale)
        # bias gradients sum the float32 deltas before they are rounded for storage
        np.testing.assert_allclose(gb[l], delta.sum(0), rtol=2 ** -6, atol=2 ** -7 * np.abs(delta.sum(0)).max())
        if l:
            z = zs[l - 1] if name == "allrelu" else rounded(zs[l - 1])  # tanh/sigmoid keep z in bfloat16
            delta = (d @ ws[l].T) * model.activations[l - 1].derivative(z)


def test_stored_arrays_and_bytes_per_element():
    """bfloat16 halves activations and deltas; piecewise-linear layers keep one sign bit of z
    (tanh and sigmoid its value) and no dropout mask; weights and momentum stay float32."""
    widths = (40, 64, 48, 6)
    per_element = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_mlp(widths=widths, dropout=0.3, epsilon=4)
        model.set_activation_dtype(dtype)
        rng = np.random.default_rng(0)
        model.train_step(rng.standard_normal((32, 40)).astype(np.float32), rng.integers(0, 6, 32),
                         SGD(0.01, 0.9), dropout_key(0, 0, 0, 0))
        buf = model._bufs(32)
        want = np.float32 if dtype == "float32" else BF16
        assert buf.x.dtype == want and all(a.dtype == want for a in buf.a + buf.delta)
        assert all(z.dtype == np.uint8 and z.shape == (n, 4) for z, n in zip(buf.zinfo, widths[1:-1]))
        assert all(l.weight.data.dtype == np.float32 and l.w_velocity.dtype == np.float32 for l in model.layers)
        hidden = buf.a[0].nbytes + buf.zinfo[0].nbytes + buf.delta[0].nbytes
        per_element[dtype] = hidden / (64 * 32)
    assert per_element == {"float32": 8.125, "bfloat16": 4.125}
    tanh = tiny_mlp(widths=widths, activation="tanh")
    tanh.set_activation_dtype("bfloat16")
    assert tanh._bufs(8).zinfo[0].dtype == BF16 and tanh._bufs(8).zinfo[0].shape == (64, 8)


def test_bfloat16_trains_like_float32_and_rig_l_sees_float32():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((48, 40)).astype(np.float32)
    y = rng.integers(0, 6, 48)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_mlp(widths=(40, 64, 48, 6), dropout=0.2, epsilon=4)
        model.set_activation_dtype(dtype)
        sgd = SGD(0.05, 0.9)
        losses[dtype] = [model.train_step(x, y, sgd, dropout_key(0, s, 0, 0)).loss_sum / 48 for s in range(60)]
        inputs, deltas = model.last_batch()
        assert all(a.dtype == np.float32 for a in inputs + deltas)
    assert losses["bfloat16"][-1] < 0.5 * losses["bfloat16"][0]  # it learns (1.79 -> 0.69 here)
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.01)


def test_thread_count_does_not_change_a_bfloat16_model():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    out = []
    for t in (1, 2):
        before = numba.get_num_threads()
        numba.set_num_threads(t)
        try:
            m = tiny_mlp(widths=(30, 300, 200, 6), dropout=0.3, epsilon=4)
            m.set_activation_dtype("bfloat16")
            m.configure_blocking(cache_bytes=64 << 10)  # several column blocks and parts
            rng = np.random.default_rng(2)
            sgd = SGD(0.05, 0.9, weight_decay=1e-4)
            for s in range(3):
                m.train_step(rng.standard_normal((17, 30)).astype(np.float32), rng.integers(0, 6, 17), sgd,
                             dropout_key(0, s, 0, 0))
            out.append((m.sha256(), m.predict_logits(np.ones((3, 30), np.float32))))
        finally:
            numba.set_num_threads(before)
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])


def _cli(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpc_sparse", "train", "--config", "configs/synthetic-quick.toml", "--quiet",
           "--run-dir", str(run_dir), "--set", "train.activation_dtype=bfloat16", "--set", "data.n_train=1200",
           "--set", "data.n_test=400", "--set", "model.layers=[500,80,60,4]", "--set", "train.epochs=3",
           "--set", "train.batch_size=32", *extra]
    env = {**os.environ, "HPC_SPARSE_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bfloat16_run_resumes_bit_exactly(tmp_path):
    """A bfloat16 run stopped after 50 steps and resumed equals the uninterrupted run; the
    checkpoint's model and momentum are float32."""
    _cli(tmp_path / "whole")
    _cli(tmp_path / "parts", "--set", "train.max_steps=50")
    ckpt = sorted((tmp_path / "parts" / "checkpoints").glob("step-*"))[-1]
    import h5py

    values = {}
    with h5py.File(next(ckpt.glob("shard-*.h5"))) as f:
        f.visititems(lambda name, obj: values.update({name: obj.dtype}) if name.endswith(
            ("/W/data", "/W_velocity", "/b", "/b_velocity")) else None)
    assert len(values) == 12 and set(values.values()) == {np.dtype(np.float32)}
    _cli(tmp_path / "parts", "--resume", "auto")
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["model_sha256"]
    assert json.loads((tmp_path / "parts" / "summary.json").read_text())["model_sha256"] == whole
