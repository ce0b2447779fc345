"""Dataset readers: idx/idx.gz folders ((Fashion-)MNIST), ``.npz``/``.h5`` files with X and y."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np

from hpc_sparse.errors import UserError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read idx file '{path}' ({exc}); fix: re-download or reinstall it") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"'{path}' is not an idx file (bad magic number); fix: point data.path at the "
                        "folder of the original idx or idx.gz files")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"idx file '{path}' has {len(raw)} bytes, expected {expected} (truncated?); "
                        "fix: re-download or reinstall it")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(tuple(dims))


def default_fashion_mnist_dir() -> Path:
    """The folder where Debian's ``dataset-fashion-mnist`` put the files (asks dpkg, then the
    usual path)."""
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                                 timeout=10).stdout
            for line in out.splitlines():
                if line.endswith("train-images-idx3-ubyte.gz"):
                    return Path(line).parent
        except (OSError, subprocess.SubprocessError):
            pass
    return Path(DEBIAN_FASHION_MNIST)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_paths(folder: Path, dataset: str) -> dict[str, Path]:
    """The four idx files in ``folder`` (plain or .gz): train_x, train_y, test_x, test_y."""
    paths = {k: _find(folder, stem) for k, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        how = ("install Debian's package with 'apt-get install dataset-fashion-mnist', or set data.path to a "
               "folder holding them" if dataset == "fashion-mnist"
               else "download the four MNIST idx files (or .gz) and set data.path to their folder")
        raise UserError(f"{dataset} files missing in '{folder}': {', '.join(missing)}[.gz]; fix: {how}")
    return paths  # type: ignore[return-value]


def load_idx_files(paths: dict[str, Path], dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train (n, 784) uint8, y_train, x_test, y_test) from :func:`idx_paths`."""
    arr = {k: read_idx(p) for k, p in paths.items()}
    xs = [arr["train_x"].reshape(arr["train_x"].shape[0], -1), arr["test_x"].reshape(arr["test_x"].shape[0], -1)]
    for x, y, part in ((xs[0], arr["train_y"], "train"), (xs[1], arr["test_y"], "test")):
        if x.shape[0] != y.shape[0]:
            raise UserError(f"{dataset} {part} set has {x.shape[0]} images but {y.shape[0]} labels in "
                            f"'{paths['train_x'].parent}'; fix: use matching idx files")
    return xs[0], arr["train_y"].astype(np.int32), xs[1], arr["test_y"].astype(np.int32)


def load_xy_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (n, features) and ``y`` (n,) integer labels from a ``.npz`` or ``.h5``/``.hdf5`` file."""
    if not path.is_file():
        raise UserError(f"data file '{path}' not found; fix: set data.path / data.test_path to an existing "
                        ".npz or .h5 file with datasets X and y")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                if "X" not in f or "y" not in f:
                    raise UserError(f"'{path}' lacks X or y (has {sorted(f.files)}); fix: save arrays named X and y")
                x, y = f["X"], f["y"]
        elif path.suffix in (".h5", ".hdf5"):
            with h5py.File(path, "r") as f:
                if "X" not in f or "y" not in f:
                    raise UserError(f"'{path}' lacks X or y (has {sorted(f.keys())}); fix: write datasets X and y")
                x, y = f["X"][...], f["y"][...]
        else:
            raise UserError(f"data file '{path}' has unknown suffix '{path.suffix}'; fix: use .npz or .h5")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read data file '{path}' ({exc}); fix: check the file") from exc
    if x.ndim != 2:
        raise UserError(f"'{path}': X has shape {x.shape}, expected (n_samples, n_features); fix: reshape X to 2-D")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(f"'{path}': y has shape {y.shape} for X of shape {x.shape}; fix: y must be (n_samples,)")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise UserError(f"'{path}': y must hold integer class labels, got dtype {y.dtype}; "
                            "fix: store labels 0..C-1 as integers")
    if y.size and y.min() < 0:
        raise UserError(f"'{path}': y has negative labels; fix: use labels 0..C-1")
    if not np.all(np.isfinite(x)):
        raise UserError(f"'{path}': X contains NaN or inf; fix: clean the data")
    return x, y.astype(np.int32)
