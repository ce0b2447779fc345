"""CIFAR-10, Madelon and HIGGS loaders on small files written here in the publishers' formats;
the counter-based CIFAR-10 augmentation; the HIGGS parse cache."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from hpc_sparse.config import load_config
from hpc_sparse.data import load_dataset
from hpc_sparse.data import higgs as higgs_mod
from hpc_sparse.data.augment import max_shift_pixels, shift_flip, shifts_and_flips, transform_keys
from hpc_sparse.data.preprocess import standardize_lean
from hpc_sparse.data.published import load_published
from hpc_sparse.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def one_line_with_fix(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "fix:" in msg
    return msg


# ---------------------------------------------------------------- CIFAR-10
def write_cifar(folder: Path, n_per_batch: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Six .bin files of records (1 label byte + R, G, B planes of 32x32); returns what was written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in [(f"data_batch_{i}.bin", n_per_batch) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], planes.reshape(n, -1)], axis=1).tobytes())
        out[name] = (labels, planes)
    return out


def test_cifar10_reads_records_in_plane_order_and_standardizes(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-bin")
    raw = load_published("cifar10", str(tmp_path), preprocess="none")  # the extraction folder works too
    assert raw.x_train.shape == (30, 3072) and raw.x_test.shape == (4, 3072) and raw.n_classes == 10
    labels, planes = written["data_batch_2.bin"]
    np.testing.assert_array_equal(raw.y_train[6:12], labels)
    np.testing.assert_array_equal(raw.x_train[6, :1024], planes[0, 0].ravel())        # red plane first
    np.testing.assert_array_equal(raw.x_train[6, 2048:].reshape(32, 32), planes[0, 2])  # blue plane last
    assert raw.image_shape == (3, 32, 32)
    std = load_published("cifar10", str(tmp_path / "cifar-10-batches-bin"))  # auto = the paper's standardisation
    xtr = raw.x_train.astype(np.float64)
    mean, sd = xtr.mean(0), xtr.std(0)
    np.testing.assert_allclose(std.x_train, (xtr - mean) / sd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.x_test, (raw.x_test - mean) / sd, rtol=1e-5, atol=1e-5)
    assert std.x_train.dtype == np.float32 and std.x_train.flags.c_contiguous


def test_cifar10_errors_name_the_file_and_the_source(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(UserError) as err:
        load_published("cifar10", str(tmp_path))
    msg = one_line_with_fix(err)
    assert "data_batch_3.bin" in msg and "cs.toronto.edu/~kriz/cifar" in msg and "binary version" in msg
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x01" * 3000)
    with pytest.raises(UserError, match="not a multiple of the 3073-byte record"):
        load_published("cifar10", str(tmp_path))
    with pytest.raises(UserError, match="needs data.path"):
        load_published("cifar10", "")


def reference_shift_flip(img: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    """Per-pixel loops: flip left-right, then out[i, j] = flipped[clip(i - dy), clip(j - dx)]."""
    c, h, w = img.shape
    src = img[:, :, ::-1] if flip else img
    out = np.empty_like(img)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = src[:, min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
    return out


def test_shift_flip_matches_a_per_pixel_reference():
    rng = np.random.default_rng(1)
    shape = (3, 8, 10)
    x = rng.standard_normal((40, 240)).astype(np.float32)
    ids = rng.choice(10_000, 40, replace=False)
    out = shift_flip(x, shape, seed=5, epoch=2, sample_ids=ids, max_shift=2)
    dy, dx, flip = shifts_and_flips(transform_keys(5, 2, ids), 2)
    assert set(dy.tolist()) <= set(range(-2, 3)) and flip.any() and not flip.all()
    for k in range(40):
        ref = reference_shift_flip(x[k].reshape(shape), int(dy[k]), int(dx[k]), bool(flip[k]))
        np.testing.assert_array_equal(out[k].reshape(shape), ref)


def test_augmentation_is_a_pure_function_of_seed_epoch_and_sample():
    shape = (3, 32, 32)
    assert max_shift_pixels(shape) == 3  # the paper's shift range 0.1 of 32 pixels
    x = np.random.default_rng(2).standard_normal((64, 3072)).astype(np.float32)
    ids = np.arange(1000, 1064)
    full = shift_flip(x, shape, 7, 3, ids, 3)
    # the same samples in other batches (another rank count, a resumed run) get the same images
    part = shift_flip(x[::-3], shape, 7, 3, ids[::-3], 3)
    np.testing.assert_array_equal(part, full[::-3])
    assert not np.array_equal(shift_flip(x, shape, 7, 4, ids, 3), full)  # next epoch: new transforms
    assert not np.array_equal(shift_flip(x, shape, 8, 3, ids, 3), full)  # other seed: new transforms
    dy, dx, flip = shifts_and_flips(transform_keys(7, 3, np.arange(20_000)), 3)
    for d in (dy, dx):  # every shift occurs about equally often
        counts = np.bincount(d + 3, minlength=7)
        assert counts.min() > 20_000 / 7 * 0.9
    assert abs(flip.mean() - 0.5) < 0.02


def cifar_args(path: Path, *extra: str) -> list[str]:
    return ["data.name=cifar10", f"data.path={path}", "model.layers=[3072,24,10]", "model.epsilon=2",
            "train.epochs=3", "train.batch_size=4", "train.threads=1", "checkpoint.every_seconds=0", *extra]


def run(args: list[str], run_dir: Path, resume: str | None = None) -> str:
    from hpc_sparse.parallel import comm as pc
    from hpc_sparse.train import Trainer

    Trainer(load_config(None, args), pc.self_comm(), run_dir, quiet=True).run(resume)
    return json.loads((run_dir / "summary.json").read_text())["model_sha256"]


def test_augmented_cifar10_training_resumes_exactly(tmp_path):
    write_cifar(tmp_path / "data", n_per_batch=5)
    aug = cifar_args(tmp_path / "data", "data.augment=true")
    reference = run(aug, tmp_path / "full")
    assert run(cifar_args(tmp_path / "data"), tmp_path / "plain") != reference  # the hook is live
    run([*aug, "train.max_steps=10"], tmp_path / "cut")  # stops mid-epoch 2 (7 steps per epoch)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == 10
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*")] == ["step-000000010"]
    assert run(aug, tmp_path / "cut", resume="auto") == reference


def test_augment_is_refused_where_it_cannot_work():
    with pytest.raises(UserError) as err:
        load_config(None, ["data.name=madelon", "data.augment=true"])
    assert "data.augment=true works with data.name='cifar10'" in one_line_with_fix(err)
    # every mode takes its training batches through Dataset.train_batch, WASAP-SGD included
    assert load_config(None, ["data.name=cifar10", "data.augment=true", "parallel.mode=wasap"]).data.augment


# ------------------------------------------------------------------ Madelon
def write_madelon(folder: Path, n_train: int = 30, n_valid: int = 10, n_features: int = 500) -> dict:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, n in (("train", n_train), ("valid", n_valid)):
        x = rng.integers(380, 620, (n, n_features))
        y = np.where(rng.random(n) < 0.5, -1, 1)
        # the UCI files end every data line with a space
        (folder / f"madelon_{part}.data").write_text("".join(" ".join(map(str, r)) + " \n" for r in x))
        (folder / f"madelon_{part}.labels").write_text("".join(f"{v}\n" for v in y))
        out[part] = (x, y)
    return out


def test_madelon_reads_uci_files_maps_labels_and_standardizes(tmp_path):
    written = write_madelon(tmp_path / "MADELON")
    data = load_dataset(**asdict(load_config(None, ["data.name=madelon", f"data.path={tmp_path}"]).data))
    xtr, ytr = written["train"]
    xva, yva = written["valid"]
    assert data.x_train.shape == (30, 500) and data.x_test.shape == (10, 500) and data.n_classes == 2
    np.testing.assert_array_equal(data.y_train, (ytr == 1).astype(np.int32))  # -1 -> 0, +1 -> 1
    np.testing.assert_array_equal(data.y_test, (yva == 1).astype(np.int32))   # the validation set is the test set
    mean, sd = xtr.mean(0), xtr.std(0)
    np.testing.assert_allclose(data.x_test, (xva - mean) / sd, rtol=1e-5, atol=1e-5)


def test_madelon_errors(tmp_path):
    write_madelon(tmp_path)
    (tmp_path / "madelon_valid.labels").unlink()
    with pytest.raises(UserError) as err:
        load_published("madelon", str(tmp_path))
    msg = one_line_with_fix(err)
    assert "madelon_valid.labels" in msg and "archive.ics.uci.edu/dataset/171/madelon" in msg
    (tmp_path / "madelon_valid.labels").write_text("1\n0\n" * 5)
    with pytest.raises(UserError, match="must be -1 or \\+1"):
        load_published("madelon", str(tmp_path))
    (tmp_path / "madelon_train.data").write_text("1 2 3\n4 5\n")
    with pytest.raises(UserError, match="line 2 has 2 numbers, line 1 has 3"):
        load_published("madelon", str(tmp_path))


# -------------------------------------------------------------------- HIGGS
def higgs_rows(n: int, seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, 29)).astype(np.float32).astype(np.float64)
    rows[:, 0] = rng.integers(0, 2, n)
    return rows


def write_higgs(path: Path, rows: np.ndarray) -> None:
    text = "".join(",".join(f"{v:.18e}" for v in r) + "\n" for r in rows).encode()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(text)
    else:
        path.write_bytes(text)


@pytest.mark.parametrize("name", ["HIGGS.csv", "HIGGS.csv.gz"])
def test_higgs_parses_in_chunks_splits_the_last_rows_and_caches(tmp_path, name, monkeypatch):
    rows = higgs_rows(300)
    write_higgs(tmp_path / name, rows)
    # a 700-byte block holds about one line: lines are cut across blocks everywhere
    a = load_published("higgs", str(tmp_path), preprocess="none", n_test=50, chunk_bytes=700)
    np.testing.assert_array_equal(a.x_train, rows[:250, 1:].astype(np.float32))
    np.testing.assert_array_equal(a.x_test, rows[250:, 1:].astype(np.float32))
    np.testing.assert_array_equal(a.y_test, rows[250:, 0].astype(np.int32))
    assert "cache written" in a.source
    record = json.loads((tmp_path / f"{name}.cache.json").read_text())
    assert record["arrays"]["x"]["shape"] == [300, 28]
    # the second load reads the cache and never parses
    monkeypatch.setattr(higgs_mod, "parse_higgs", lambda *a, **k: pytest.fail("parsed again"))
    b = load_published("higgs", str(tmp_path), n_test=50)
    assert "cached parse" in b.source and b.x_train.shape == (250, 28)
    np.testing.assert_allclose(b.x_train.mean(0), 0, atol=1e-5)  # standardised with training statistics
    monkeypatch.undo()
    # a changed source invalidates the cache; the replaced record's files are removed
    old_files = {e["file"] for e in record["arrays"].values()}
    new_rows = higgs_rows(120, seed=9)
    write_higgs(tmp_path / name, new_rows)
    os.utime(tmp_path / name, ns=(1, 1))  # even with an old modification time: the size differs
    c = load_published("higgs", str(tmp_path), preprocess="none", n_test=20)
    assert "cache written" in c.source
    np.testing.assert_array_equal(c.x_test, new_rows[100:, 1:].astype(np.float32))
    assert not any((tmp_path / f).exists() for f in old_files)


def test_higgs_cache_survives_torn_writes(tmp_path):
    write_higgs(tmp_path / "HIGGS.csv", higgs_rows(40))
    load_published("higgs", str(tmp_path), n_test=10)
    record = tmp_path / "HIGGS.csv.cache.json"
    files = [tmp_path / e["file"] for e in json.loads(record.read_text())["arrays"].values()]
    files[0].write_bytes(files[0].read_bytes()[:-8])  # a cache file cut short: ignored, rebuilt
    assert "cache written" in load_published("higgs", str(tmp_path), n_test=10).source
    assert len(list(tmp_path.glob("HIGGS.csv.cache-*.npy"))) == 2  # the replaced record's files are gone
    stray = tmp_path / "HIGGS.csv.cache-0123456789ab-x.npy"  # a writer killed an hour ago left this
    stray.write_bytes(b"partial")
    os.utime(stray, (0, 0))
    live = tmp_path / "HIGGS.csv.cache-ba9876543210-x.npy"  # a writer still appending: kept
    live.write_bytes(b"partial")
    record.write_text('{"version": 1, "sou')  # a torn record: ignored, rebuilt
    assert "cache written" in load_published("higgs", str(tmp_path), n_test=10).source
    assert "cached parse" in load_published("higgs", str(tmp_path), n_test=10).source
    assert not stray.exists() and live.exists()


def test_higgs_parse_memory_peaks_near_the_final_arrays(tmp_path):
    n = 6000
    write_higgs(tmp_path / "HIGGS.csv", higgs_rows(n))
    final_bytes = n * 28 * 4 + n * 4
    tracemalloc.start()
    try:
        a = load_published("higgs", str(tmp_path), preprocess="none", n_test=1000, chunk_bytes=64 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert a.x_train.shape == (5000, 28)
    # the final arrays, plus a few 64 KiB blocks of text and their parsed values
    assert peak < final_bytes + 8 * (64 << 10), (peak, final_bytes)


def test_lean_standardization_works_in_place_in_small_chunks():
    rng = np.random.default_rng(5)
    xtr = (rng.standard_normal((5000, 28)) * 3 + 7).astype(np.float32)
    xte = rng.standard_normal((700, 28)).astype(np.float32)
    ref = ((xtr.astype(np.float64) - xtr.mean(0, dtype=np.float64)) / xtr.std(0, dtype=np.float64),
           (xte - xtr.mean(0, dtype=np.float64)) / xtr.std(0, dtype=np.float64))
    tracemalloc.start()
    try:
        out = standardize_lean(xtr, xte, chunk_bytes=16 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[0] is xtr and out[1] is xte  # float32 inputs are overwritten, not copied
    assert peak < 8 * (16 << 10), peak
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_higgs_errors(tmp_path):
    with pytest.raises(UserError) as err:
        load_published("higgs", str(tmp_path))
    msg = one_line_with_fix(err)
    assert "HIGGS.csv" in msg and "archive.ics.uci.edu/dataset/280/higgs" in msg
    write_higgs(tmp_path / "HIGGS.csv", higgs_rows(30))
    with pytest.raises(UserError, match="data.n_test=500000 but the HIGGS file has only 30 rows"):
        load_published("higgs", str(tmp_path))  # the publisher's default split
    (tmp_path / "HIGGS.csv").write_text("1.0,2.0,3.0\n")
    with pytest.raises(UserError, match="rows 1-1 is not 29 comma-separated numbers"):
        load_published("higgs", str(tmp_path), n_test=1)


def test_higgs_read_only_folder_parses_without_a_cache(tmp_path, monkeypatch):
    write_higgs(tmp_path / "HIGGS.csv", higgs_rows(20))
    real = higgs_mod.CacheWriter

    class ReadOnlyHere(real):  # root can write anywhere, so refuse the data folder explicitly
        def row_writer(self, name, n_cols, dtype):
            if self.folder == tmp_path:
                raise PermissionError(13, "Permission denied")
            return super().row_writer(name, n_cols, dtype)

    monkeypatch.setattr(higgs_mod, "CacheWriter", ReadOnlyHere)
    a = load_published("higgs", str(tmp_path), n_test=5)
    assert "no cache (Permission denied)" in a.source and a.x_test.shape == (5, 28)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["HIGGS.csv"]


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("name, layers", [("cifar10", [3072, 4000, 1000, 4000, 10]),
                                          ("madelon", [500, 400, 100, 400, 2]),
                                          ("higgs", [28, 1000, 1000, 1000, 2])])
def test_shipped_configs_for_the_published_datasets(name, layers):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.data.name == name and cfg.model.layers == layers
