"""CIFAR-10, Madelon and HIGGS loaders on small files written here in the publishers' formats;
the counter-based CIFAR-10 augmentation; the HIGGS parse cache."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from hpc_sparse.config import load_config
from hpc_sparse.data import load_dataset
from hpc_sparse.data import cifar10, madelon
from hpc_sparse.data import higgs as higgs_mod
from hpc_sparse.data.augment import max_shift_pixels, shift_flip, shifts_and_flips, transform_keys
from hpc_sparse.data.preprocess import standardize_lean
from hpc_sparse.data.cache import Entry
from hpc_sparse.data.published import load_published, published_recipe
from hpc_sparse.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def one_line_with_fix(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "fix:" in msg
    return msg


# ---------------------------------------------------------------- CIFAR-10
def write_cifar(folder: Path, n_per_batch: int = 6, n_test: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Six .bin files of records (1 label byte + R, G, B planes of 32x32); returns what was written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    n_test = n_per_batch if n_test is None else n_test
    for name, n in [(f"data_batch_{i}.bin", n_per_batch) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], planes.reshape(n, -1)], axis=1).tobytes())
        out[name] = (labels, planes)
    return out


@pytest.fixture
def six_records(monkeypatch):
    """Small CIFAR-10 files in the tests: 6 records per file instead of the real 10,000 (a
    real-size file is read in test_cifar10_files_must_hold_10000_records)."""
    monkeypatch.setattr(cifar10, "RECORDS_PER_FILE", 6)


def test_cifar10_reads_records_in_plane_order_and_standardizes(tmp_path, six_records):
    written = write_cifar(tmp_path / "cifar-10-batches-bin")
    raw = load_published("cifar10", str(tmp_path), preprocess="none")  # the extraction folder works too
    assert raw.x_train.shape == (30, 3072) and raw.x_test.shape == (6, 3072) and raw.n_classes == 10
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


def test_cifar10_errors_name_the_file_and_the_source(tmp_path, six_records):
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


def test_cifar10_files_must_hold_10000_records(tmp_path):
    """The real count: a file cut at a record boundary (9,999 records) used to load silently."""
    write_cifar(tmp_path, n_per_batch=1, n_test=1)
    labels = np.arange(10_000, dtype=np.uint8) % 10
    records = np.zeros((10_000, cifar10.RECORD_BYTES), np.uint8)
    records[:, 0] = labels
    (tmp_path / "data_batch_1.bin").write_bytes(records.tobytes())
    x, y = cifar10.read_batch_file(tmp_path / "data_batch_1.bin")
    assert x.shape == (10_000, 3072) and np.array_equal(y, labels)
    (tmp_path / "data_batch_1.bin").write_bytes(records[:-1].tobytes())
    with pytest.raises(UserError) as err:
        cifar10.read_batch_file(tmp_path / "data_batch_1.bin")
    assert "holds 9,999 records, expected 10,000" in one_line_with_fix(err)
    with pytest.raises(UserError, match="data_batch_1.bin' holds 9,999 records, expected 10,000"):
        load_published("cifar10", str(tmp_path))


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


def test_augmented_cifar10_training_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "RECORDS_PER_FILE", 5)
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
def write_madelon(root: Path, n_train: int = 30, n_valid: int = 10, n_features: int = 500) -> dict:
    """UCI's layout, as its zip extracts: ``MADELON/madelon_{train,valid,test}.data``,
    ``MADELON/madelon_train.labels``, and ``madelon_valid.labels`` beside ``MADELON/``."""
    rng = np.random.default_rng(3)
    data = root / "MADELON"
    data.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, n in (("train", n_train), ("valid", n_valid), ("test", 7)):
        x = rng.integers(380, 620, (n, n_features))
        y = np.where(rng.random(n) < 0.5, -1, 1)
        # the UCI files end every data line with a space
        (data / f"madelon_{part}.data").write_text("".join(" ".join(map(str, r)) + " \n" for r in x))
        if part != "test":  # the test labels were never published
            labels = data if part == "train" else root
            (labels / f"madelon_{part}.labels").write_text("".join(f"{v}\n" for v in y))
        out[part] = (x, y)
    (data / "Dataset.pdf").write_bytes(b"%PDF")
    return out


@pytest.mark.parametrize("where", ["root", "MADELON"])
def test_madelon_reads_the_uci_layout_maps_labels_and_standardizes(tmp_path, where):
    written = write_madelon(tmp_path)
    path = tmp_path if where == "root" else tmp_path / "MADELON"  # data.path at either folder
    data = load_dataset(**asdict(load_config(None, ["data.name=madelon", f"data.path={path}",
                                                    f"data.cache_dir={tmp_path / 'cache'}"]).data))
    xtr, ytr = written["train"]
    xva, yva = written["valid"]
    assert data.x_train.shape == (30, 500) and data.x_test.shape == (10, 500) and data.n_classes == 2
    np.testing.assert_array_equal(data.y_train, (ytr == 1).astype(np.int32))  # -1 -> 0, +1 -> 1
    np.testing.assert_array_equal(data.y_test, (yva == 1).astype(np.int32))   # the validation set is the test set
    mean, sd = xtr.mean(0), xtr.std(0)
    np.testing.assert_allclose(data.x_test, (xva - mean) / sd, rtol=1e-5, atol=1e-5)
    assert madelon.madelon_files(path)[3] == tmp_path / "madelon_valid.labels"


def test_madelon_flat_folder_and_errors(tmp_path):
    write_madelon(tmp_path)
    flat = tmp_path / "copy" / "flat"  # all files in one folder, madelon_valid.labels forgotten
    flat.mkdir(parents=True)
    for f in (tmp_path / "MADELON").glob("madelon_*"):
        (flat / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError) as err:
        load_published("madelon", str(flat))  # madelon_valid.labels is neither in flat/ nor beside it
    msg = one_line_with_fix(err)
    assert "madelon_valid.labels" in msg and f"'{flat}'" in msg and f"'{flat.parent}'" in msg and "archive.ics.uci.edu/dataset/171/madelon" in msg
    (flat / "madelon_valid.labels").write_text("1\n0\n" * 5)
    with pytest.raises(UserError, match="must be -1 or \\+1"):
        load_published("madelon", str(flat))
    (flat / "madelon_valid.labels").write_bytes((tmp_path / "madelon_valid.labels").read_bytes())
    assert load_published("madelon", str(flat)).x_test.shape == (10, 500)
    (flat / "madelon_train.data").write_text("1 2 3\n4 5\n")
    with pytest.raises(UserError, match="line 2 has 2 numbers, line 1 has 3"):
        load_published("madelon", str(flat))


# -------------------------------------------------------------------- HIGGS
def higgs_rows(n: int, seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, 29)).astype(np.float32).astype(np.float64)
    rows[:, 0] = rng.integers(0, 2, n)
    return rows


def higgs_text(rows: np.ndarray) -> bytes:
    return "".join(",".join(f"{v:.18e}" for v in r) + "\n" for r in rows).encode()


def write_higgs(path: Path, rows: np.ndarray | bytes) -> None:
    text = rows if isinstance(rows, bytes) else higgs_text(rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(text)
    else:
        path.write_bytes(text)


def higgs(folder: Path, cache: Path | str, n_test: int, preprocess: str = "auto"):
    return load_dataset("higgs", str(folder), preprocess=preprocess, n_test=n_test, cache_dir=str(cache))


@pytest.mark.parametrize("name", ["HIGGS.csv", "HIGGS.csv.gz"])
def test_higgs_parses_in_chunks_and_splits_the_last_rows(tmp_path, name):
    rows = higgs_rows(300)
    write_higgs(tmp_path / name, rows)
    # a 700-byte block holds about one line: lines are cut across blocks everywhere
    a = load_published("higgs", str(tmp_path), preprocess="none", n_test=50, chunk_bytes=700)
    np.testing.assert_array_equal(a.x_train, rows[:250, 1:].astype(np.float32))
    np.testing.assert_array_equal(a.x_test, rows[250:, 1:].astype(np.float32))
    np.testing.assert_array_equal(a.y_test, rows[250:, 0].astype(np.int32))
    # the publisher's file has 11,000,000 rows: another count is said, with the test rows
    assert a.notes == [f"warning: HIGGS file '{tmp_path / name}' has 300 rows, not the publisher's 11,000,000 "
                       "(a subset, or a copy cut short?); the test set is its last 50 rows, lines 251-300, and "
                       "training uses lines 1-250"]


def test_higgs_through_the_cache_equals_the_parse_in_memory(tmp_path, monkeypatch):
    write_higgs(tmp_path / "HIGGS.csv.gz", higgs_rows(300))
    ref = load_published("higgs", str(tmp_path), n_test=50)
    monkeypatch.setattr(higgs_mod, "CHUNK_BYTES", 700)  # the cache's builder parses in small blocks too
    a = higgs(tmp_path, "", n_test=50)  # default: a hpc_sparse-cache folder beside the source
    entry = next((tmp_path / "hpc_sparse-cache").glob("higgs-*"))
    assert a.notes[0].startswith(f"data cache: {entry} (beside the source), built by this process")
    assert "has 300 rows, not the publisher's 11,000,000" in a.notes[1]
    for got, want in zip((a.x_train, a.y_train, a.x_test, a.y_test), (ref.x_train, ref.y_train, ref.x_test, ref.y_test)):
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert not got.flags.writeable  # mapped read-only
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-5)  # standardised with training statistics
    # the second load maps the entry and never parses; the warning is still said
    monkeypatch.setattr(higgs_mod, "parse_higgs", lambda *a, **k: pytest.fail("parsed again"))
    b = higgs(tmp_path, "", n_test=50)
    assert "already built" in b.notes[0] and "has 300 rows" in b.notes[1]
    assert np.array_equal(b.x_test, ref.x_test)


def test_higgs_parse_memory_stays_near_one_block(tmp_path):
    """Through the cache the parsed rows go to the entry's file, block by block; neither the
    text nor the array is ever whole in memory (tracemalloc sees numpy's allocations). The
    standardisation works in bounded chunks (test_lean_standardization_...): left out here."""
    n = 6000
    write_higgs(tmp_path / "HIGGS.csv", higgs_rows(n))
    tracemalloc.start()
    try:
        recipe = published_recipe("higgs", str(tmp_path), preprocess="none", n_test=1000, chunk_bytes=64 << 10)
        Entry(tmp_path / "cache", recipe).build()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    labels = n * (1 + 4)  # int8 blocks, then the int32 labels
    assert peak < labels + 8 * (64 << 10), peak  # a few 64 KiB blocks of text and their parsed values
    assert Entry(tmp_path / "cache", recipe).open().arrays["x_train"].shape == (5000, 28)


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


@pytest.mark.parametrize("bad, line, what", [
    (b"label,lepton pT,lepton eta\n", 1, "'label,lepton pT,lepton eta' (a header line?)"),
    (b"\n", 7, "'' (a blank line)"),
    (b"1.0,2.0,3.0\n", 7, "(3 fields)"),
    (b"1.0," + b"x," * 27 + b"2.0\n", 7, "(a header line?)"),
    (b"1.0," + b"," * 27 + b"2.0\n", 7, "(a field is not a number)")])
def test_higgs_unparsable_line_is_named(tmp_path, bad, line, what):
    """A header line (some copies have one), a blank line, a short line: one line naming it,
    whatever the block size (numpy 2 raises ValueError here; it used to escape as a traceback)."""
    rows = higgs_text(higgs_rows(12))
    cut = sum(len(r) + 1 for r in rows.decode().splitlines()[:line - 1])
    write_higgs(tmp_path / "HIGGS.csv", rows[:cut] + bad + rows[cut:])
    for chunk in (700, 1 << 20):  # the bad line in a block of its own, and inside one block
        with pytest.raises(UserError) as err:
            load_published("higgs", str(tmp_path), n_test=2, chunk_bytes=chunk)
        msg = one_line_with_fix(err)
        assert f"line {line} is not 29 comma-separated numbers (label, 28 features): " in msg and what in msg, msg


def test_higgs_errors(tmp_path):
    with pytest.raises(UserError) as err:
        load_published("higgs", str(tmp_path))
    msg = one_line_with_fix(err)
    assert "HIGGS.csv" in msg and "archive.ics.uci.edu/dataset/280/higgs" in msg
    write_higgs(tmp_path / "HIGGS.csv", higgs_rows(30))
    with pytest.raises(UserError, match="data.n_test=500000 but the HIGGS file has only 30 rows"):
        load_published("higgs", str(tmp_path))  # the publisher's default split
    rows = higgs_rows(30)
    rows[17, 0] = 2.0
    write_higgs(tmp_path / "HIGGS.csv", rows)
    with pytest.raises(UserError, match="line 18: the label is 2.0, not 0 or 1"):
        load_published("higgs", str(tmp_path), n_test=1)
    # a damaged archive is the source's fault (re-download), not the cache's
    write_higgs(tmp_path / "HIGGS.csv.gz", higgs_rows(300))
    (tmp_path / "HIGGS.csv").unlink()
    (tmp_path / "HIGGS.csv.gz").write_bytes((tmp_path / "HIGGS.csv.gz").read_bytes()[:-200])
    with pytest.raises(UserError) as err:
        higgs(tmp_path, tmp_path / "cache", n_test=10)
    assert "cannot read HIGGS file" in one_line_with_fix(err) and "re-download" in str(err.value)
    assert not any((tmp_path / "cache").iterdir())  # nothing half-built is left


FULL_DISK = """
import resource, signal, sys
from hpc_sparse.data import load_dataset
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
d = load_dataset("higgs", sys.argv[1], n_test=50, cache_dir=sys.argv[2])
print(d.x_train.shape, d.x_test.shape, d.x_train.flags.writeable)
print(d.notes[0])
"""


def test_higgs_cache_write_error_falls_back_to_loading_without_a_cache(tmp_path):
    """A write error of the cache (here: a file size limit, EFBIG, as a full disk's ENOSPC) is
    not the source's fault: the data load without a cache, and the log says why."""
    write_higgs(tmp_path / "HIGGS.csv", higgs_rows(300))
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shape_line, note = proc.stdout.splitlines()
    assert shape_line == "(250, 28) (50, 28) True"  # in this process's memory
    assert note.startswith("data cache: not used (cannot write the data cache '") and "File too large" in note
    assert "fix: set data.cache_dir to a writable folder with free space" in note
    assert list((tmp_path / "cache").iterdir()) == []  # the torn entry was removed


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("name, layers", [("cifar10", [3072, 4000, 1000, 4000, 10]),
                                          ("madelon", [500, 400, 100, 400, 2]),
                                          ("higgs", [28, 1000, 1000, 1000, 2])])
def test_shipped_configs_for_the_published_datasets(name, layers):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.data.name == name and cfg.model.layers == layers
