"""Reading an HDF5 shard written by a stranger: only the features this package writes itself.

Call it only for a shard whose size and SHA-256 matched its manifest. The hash covers the
shard's own bytes and nothing it may point to, so before anything is read:

* every path component must be a **hard link** (``group[key]`` would follow a soft link
  within the file, and an external link into another file);
* a dataset must keep its bytes **in this file**: contiguous, compact or chunked storage, no
  external raw storage (another file's bytes, or a FIFO that blocks ``open()`` forever), no
  virtual dataset, and no filter but the ones the writer uses (shuffle, deflate, lzf);
* its **shape and dtype** must be the manifest's, compared from the metadata, and its stored
  bytes must fit in the file and account for the declared size (a few KB of shard cannot
  declare an 8 GiB dataset of unwritten chunks).

Raises ValueError naming the array; the caller turns it into an invalid-checkpoint verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from hpc_sparse.checkpoint.manifest import numeric_dtype

ALLOWED_FILTERS = frozenset({h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE, 32000})
"""HDF5 filter ids the writer may use (32000: lzf); see ``format.INDEX_COMPRESSION``."""
MAX_FILTER_RATIO = 1100
"""Declared bytes per stored byte a filtered dataset may have (deflate cannot exceed ~1032)."""
_LAYOUTS = {h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.COMPACT: "compact", h5py.h5d.CHUNKED: "chunked"}


def _child(group: h5py.Group, name: str, where: str) -> Any:
    link = group.get(name, getlink=True)
    if link is None:
        raise ValueError(f"{where} is missing")
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{where} is stored through a {type(link).__name__}; only hard links are accepted")
    return group[name]


def resolve(root: h5py.Group, key: str, where: str) -> Any:
    """``root[key]`` walked one hard link at a time (``key`` may contain ``/``)."""
    node = root
    for part in key.split("/"):
        if not isinstance(node, h5py.Group):
            raise ValueError(f"{where} is not stored where the manifest says")
        node = _child(node, part, where)
    return node


def check_dataset(ds: Any, shape: tuple[int, ...], dtype: np.dtype, file_size: int, where: str) -> None:
    """Metadata-only checks of a dataset against what the manifest declares (see module doc)."""
    if not isinstance(ds, h5py.Dataset):
        raise ValueError(f"{where} is not stored as a dataset")
    if ds.shape != shape or ds.dtype != dtype or ds.dtype.str != dtype.str:
        raise ValueError(f"{where} is stored as {list(ds.shape or ())} {ds.dtype.str}, manifest says "
                         f"{list(shape)} {dtype.str}")
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise ValueError(f"{where} is a virtual dataset (it reads other files)")
    if dcpl.get_external_count():
        raise ValueError(f"{where} keeps its bytes in external files")
    if layout not in _LAYOUTS:
        raise ValueError(f"{where} has an unknown storage layout ({layout})")
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    if set(filters) - ALLOWED_FILTERS:
        raise ValueError(f"{where} uses HDF5 filter(s) {sorted(set(filters) - ALLOWED_FILTERS)} that hpc_sparse "
                         "never writes")
    nbytes = math.prod(shape) * dtype.itemsize
    stored = ds.id.get_storage_size()
    if stored > file_size:
        raise ValueError(f"{where} claims {stored} stored bytes in a file of {file_size}")
    if filters:
        ok = nbytes <= MAX_FILTER_RATIO * stored
    elif layout == h5py.h5d.CHUNKED:
        ok = stored >= nbytes  # edge chunks are stored whole
    else:
        ok = stored == nbytes
    if not ok:
        raise ValueError(f"{where} declares {nbytes} bytes but has {stored} stored bytes ({_LAYOUTS[layout]}"
                         f"{', filtered' if filters else ''})")
    if layout == h5py.h5d.CONTIGUOUS and nbytes:
        offset = ds.id.get_offset()
        if offset is None or offset + nbytes > file_size:
            raise ValueError(f"{where} points outside its file")


def _read(ds: h5py.Dataset, shape: tuple[int, ...], dtype: np.dtype, file_size: int, where: str) -> np.ndarray:
    check_dataset(ds, shape, dtype, file_size, where)
    return np.asarray(ds[()])  # 0-d datasets come back as numpy scalars


def read_entry(group: h5py.Group, key: str, spec: Mapping[str, Any], file_size: int, what: str = "array"
               ) -> np.ndarray | sp.csr_matrix:
    """Read array ``key`` of ``group`` (a dense dataset or a CSR group) as its manifest ``spec``
    declares, after the checks of the module docstring; CSR gets ``check_format(full_check=True)``.
    ``what`` names the kind of array in errors ("array", "rank_state")."""
    where = f"{what} {key!r}"
    node = resolve(group, key, where)
    dtype = numeric_dtype(spec["dtype"], where)
    shape = tuple(spec["shape"])
    if spec["kind"] != "csr":
        return _read(node, shape, dtype, file_size, where)
    if not isinstance(node, h5py.Group) or node.attrs.get("kind") != "csr":
        raise ValueError(f"{where} is not stored as a CSR group")
    index = numeric_dtype(spec["index_dtype"], where)
    stored_shape = _read(_child(node, "shape", where), (2,), np.dtype("<i8"), file_size, f"{where} shape")
    if [int(s) for s in stored_shape] != list(shape):
        raise ValueError(f"{where} has shape {stored_shape.tolist()}, manifest says {list(shape)}")
    nnz = int(spec["nnz"])
    mat = sp.csr_matrix(shape, dtype=dtype)
    # Assign the arrays directly: the (data, indices, indptr) constructor would silently
    # downcast int64 indices to int32, and we promise the saved dtypes back.
    mat.data = _read(_child(node, "data", where), (nnz,), dtype, file_size, f"{where} data")
    mat.indices = _read(_child(node, "indices", where), (nnz,), index, file_size, f"{where} indices")
    mat.indptr = _read(_child(node, "indptr", where), (shape[0] + 1,), index, file_size, f"{where} indptr")
    mat.check_format(full_check=True)
    return mat


def read_rank_state(f: h5py.File, spec: Mapping[str, Mapping[str, Any]] | None, file_size: int
                    ) -> dict[str, np.ndarray | sp.csr_matrix] | None:
    """The per-rank arrays of an open shard: exactly those ``spec`` lists (schema 2 and 3,
    each read as :func:`read_entry` reads a shared array), or, for a schema 1 shard (``spec``
    None), every dataset reachable by hard links under ``rank_state/``, each checked against
    its own metadata. None if there is none."""
    if "rank_state" not in f:
        if spec:
            raise ValueError(f"rank_state {sorted(spec)[0]!r} is missing")
        return None
    root = _child(f, "rank_state", "rank_state")
    if spec is not None:
        return {key: read_entry(root, key, s, file_size, "rank_state") for key, s in spec.items()}
    out: dict[str, np.ndarray | sp.csr_matrix] = {}
    pending = [("", root)]
    while pending:
        prefix, group = pending.pop()
        for name in group:
            key, where = prefix + name, f"rank_state {prefix + name!r}"
            node = _child(group, name, where)
            if isinstance(node, h5py.Group):
                pending.append((key + "/", node))
            elif isinstance(node, h5py.Dataset) and node.dtype.kind in "biufc":
                out[key] = _read(node, node.shape, node.dtype, file_size, where)
            else:
                raise ValueError(f"{where} is not a numeric dataset")
    return out

