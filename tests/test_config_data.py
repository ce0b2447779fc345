"""Config validation and data loading: clear messages that name the key/file and the fix."""

from __future__ import annotations

import gzip
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_sparse.config import describe, load_config
from hpc_sparse.data import batch_indices, block_bounds, epoch_permutation, load_dataset, steps_per_epoch
from hpc_sparse.data.loaders import read_idx
from hpc_sparse.data.synthetic import make_madelon
from hpc_sparse.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, text", [
    (["train.lrr=0.1"], "unknown config key 'train.lrr'"),
    (["bogus.key=1"], "unknown config key 'bogus'"),
    (["train.lr=-1"], "config key 'train.lr' is -1.0 but must be > 0.0"),
    (["train.epochs=2.5"], "config key 'train.epochs' must be an integer"),
    (["train.epochs=\"ten\""], "config key 'train.epochs' must be an integer"),
    (["model.activation=\"swish\""], "'model.activation' is 'swish', which is not one of"),
    (["model.layers=[784]"], "needs at least an input and an output width"),
    (["topology.zeta=1.5"], "'topology.zeta' is 1.5 but must be <= 1.0"),
    (["checkpoint.keep=1"], "'checkpoint.keep' is 1 but must be >= 2"),
    (["train.lr"], "is not of the form section.key=value"),
])
def test_config_errors_name_the_key_and_fix(override, text):
    with pytest.raises(UserError) as err:
        load_config(None, override)
    assert text in str(err.value)
    assert "fix:" in str(err.value) and "\n" not in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file '.*nope.toml' not found; fix"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="is not valid TOML"):
        load_config(bad)


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("seed = 3\n[train]\nlr = 0.2\nepochs = 4\n")
    cfg = load_config(f, ["train.lr=0.5"])
    assert (cfg.seed, cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (3, 0.5, 4, 128)


@pytest.mark.parametrize("name", ["synthetic-quick", "fashion-mnist", "fashion-mnist-fast"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.model.layers[0] in (500, 784)


def test_paper_config_values():
    cfg = load_config(ROOT / "configs" / "fashion-mnist.toml")
    assert cfg.model.layers == [784, 1000, 1000, 1000, 10]
    assert (cfg.model.epsilon, cfg.model.activation, cfg.model.alpha, cfg.train.lr, cfg.model.dropout) == \
        (20, "allrelu", 0.6, 0.01, 0.3)


def test_every_key_is_documented():
    """Every config key has a help text, and the committed configuration reference
    (docs/configuration-reference.md, generated from ``describe()`` by
    tools/gen_reference_docs.py) lists exactly the keys there are, each with its default."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration-reference.md").read_text()
    rows = {line.split('<a id="')[1].split('"')[0]: line for line in page.splitlines() if line.startswith('| <a id="')}
    keys = describe()
    assert all(text for _, _, text in keys)
    assert sorted(rows) == sorted(k for k, _, _ in keys)
    for key, default, _ in keys:
        assert f"`{key}` | " in rows[key] and f" | `{default}` | " in rows[key], key


def test_partition_covers_each_sample_once():
    for n, size, b in [(100, 1, 7), (100, 3, 7), (101, 4, 10), (5, 3, 2)]:
        perm = epoch_permutation(n, 1, 0)
        spe = steps_per_epoch(n, size, b)
        seen = np.concatenate([batch_indices(perm, size, r, b, s) for r in range(size) for s in range(spe)])
        assert np.array_equal(np.sort(seen), np.arange(n))
        bounds = [block_bounds(n, size, r) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:]))
    assert not np.array_equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 1))
    assert np.array_equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 3))


def test_synthetic_is_deterministic_and_balanced():
    x1, y1 = make_madelon(400, 50, 10, 4, 0.5, seed=3)
    x2, y2 = make_madelon(400, 50, 10, 4, 0.5, seed=3)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (400, 50) and x1.dtype == np.float32
    assert np.bincount(y1).tolist() == [100] * 4


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    data = header + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_idx_folder_loading_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 20))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (5, 28, 28)))
    cfg = load_config(None, ["data.name=\"mnist\"", f"data.path=\"{tmp_path}\""])
    with pytest.raises(UserError, match=r"mnist files missing in .*: t10k-labels-idx1-ubyte\[.gz\]; fix"):
        load_dataset(**asdict(cfg.data))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5))
    data = load_dataset(**asdict(cfg.data))
    assert data.x_train.shape == (20, 784) and data.x_test.shape == (5, 784)
    assert data.x_train.max() <= 1.0  # mnist: /255
    (tmp_path / "bad-idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an idx file"):
        read_idx(tmp_path / "bad-idx")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    cfg = load_config(None, ["data.name=\"fashion-mnist\"", f"data.path=\"{tmp_path / 'none'}\""])
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(**asdict(cfg.data))


def test_npz_and_h5_files(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, 6)), rng.integers(0, 3, 30)
    np.savez(tmp_path / "train.npz", X=x, y=y)
    with h5py.File(tmp_path / "test.h5", "w") as f:
        f["X"], f["y"] = x[:10], y[:10]
    cfg = load_config(None, ["data.name=\"file\"", f"data.path=\"{tmp_path / 'train.npz'}\"",
                             f"data.test_path=\"{tmp_path / 'test.h5'}\""])
    data = load_dataset(**asdict(cfg.data))
    assert data.x_train.shape == (30, 6) and data.n_classes == 3
    np.savez(tmp_path / "bad.npz", X=x[:, :, None], y=y)
    cfg2 = load_config(None, ["data.name=\"file\"", f"data.path=\"{tmp_path / 'bad.npz'}\"",
                              f"data.test_path=\"{tmp_path / 'test.h5'}\""])
    with pytest.raises(UserError, match=r"X has shape \(30, 6, 1\), expected \(n_samples, n_features\)"):
        load_dataset(**asdict(cfg2.data))
    np.savez(tmp_path / "bad2.npz", X=x, y=y[:5])
    with pytest.raises(UserError, match="y has shape"):
        load_dataset("file", str(tmp_path / "bad2.npz"), str(tmp_path / "test.h5"))
