"""``manifest.json`` as untrusted input: read with a size cap, parsed, and checked field by field.

Anyone may have written the file (a colleague, a download, a broken tool), and it is the one
file of a checkpoint that no hash covers. So every field the loader, discovery, retention and
``info`` use is checked for its type and range here, and any structural problem (a list
where a string belongs, nesting deep enough to exhaust the parser's recursion, a file larger
than :data:`hpc_sparse.checkpoint.format.MANIFEST_MAX_BYTES`) becomes the one verdict
"invalid checkpoint", never a TypeError in some later caller. Errors of the environment
(EIO, ESTALE, EACCES...) while reading it are not verdicts: they raise
:class:`~hpc_sparse.checkpoint.format.CheckpointEnvironmentError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hpc_sparse.checkpoint import format as fmt

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_RANKS = 1 << 20
_MAX_DTYPE_LEN = 8


class _Malformed(ValueError):
    """A structural problem of the manifest (turned into an invalid-checkpoint verdict)."""


def _int(value: Any, what: str, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _Malformed(f"{what} is {value!r}, not an integer >= {low}")
    return value


def _dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is not a JSON object")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise _Malformed(f"{what} is not a JSON list")
    return value


def numeric_dtype(value: Any, what: str) -> np.dtype:
    """The numpy dtype a manifest string names: numeric (``biufc``), plain, canonical."""
    if not isinstance(value, str) or len(value) > _MAX_DTYPE_LEN:
        raise _Malformed(f"{what} {value!r} is not a dtype string such as '<f4'")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as exc:
        raise _Malformed(f"{what} {value!r} is not a dtype") from exc
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None or dtype.str != value:
        raise _Malformed(f"{what} {value!r} is not a plain numeric dtype")
    return dtype


def _shape(value: Any, what: str, ndim: int | None = None) -> list[int]:
    shape = _list(value, what)
    if len(shape) > 32 or (ndim is not None and len(shape) != ndim):
        raise _Malformed(f"{what} {value!r} has a wrong number of dimensions")
    return [_int(s, f"{what} entry") for s in shape]


def _keys(value: Any, what: str) -> list[str]:
    keys = _list(value, what)
    if not all(isinstance(k, str) for k in keys):
        raise _Malformed(f"{what} holds something that is not a string")
    try:
        fmt.check_keys(keys, what)
    except fmt.CheckpointError as exc:
        raise _Malformed(str(exc).split("; fix:")[0]) from exc
    return keys


def check_array_spec(key: str, spec: Any, n_ranks: int | None, where: str | None = None) -> None:
    """One entry of ``arrays`` (with ``n_ranks``: its ``shard`` too) or of a shard's
    ``rank_state`` (``n_ranks`` None): kind, shape, dtype; CSR adds index dtype and nnz."""
    where = where or f"array {key!r}"
    spec = _dict(spec, where)
    kind = spec.get("kind")
    if kind not in ("dense", "csr"):
        raise _Malformed(f"{where} has kind {kind!r}, not 'dense' or 'csr'")
    _shape(spec.get("shape"), f"{where} shape", 2 if kind == "csr" else None)
    numeric_dtype(spec.get("dtype"), f"{where} dtype")
    if n_ranks is not None:
        shard = _int(spec.get("shard"), f"{where} shard")
        if shard >= n_ranks:
            raise _Malformed(f"{where} is in shard {shard} of {n_ranks}")
    if kind == "csr":
        if numeric_dtype(spec.get("index_dtype"), f"{where} index_dtype").kind != "i" \
                or np.dtype(spec["index_dtype"]).itemsize not in (4, 8):
            raise _Malformed(f"{where} index_dtype {spec['index_dtype']!r} is not int32 or int64")
        _int(spec.get("nnz"), f"{where} nnz")


def rank_state_spec(shard: Mapping[str, Any], version: int) -> dict[str, dict[str, Any]] | None:
    """The ``{key: array spec}`` of a shard's per-rank state (schema 2: dense arrays, given
    kind "dense" here), or None when the schema (1) has none. Assumes :func:`check_manifest`
    passed."""
    if version < 2:
        return None
    spec = shard.get("rank_state") or {}
    return spec if version >= 3 else {key: {"kind": "dense", **entry} for key, entry in spec.items()}


def _check_shard(r: int, shard: Any, n_ranks: int, version: int) -> None:
    where = f"shard entry {r}"
    shard = _dict(shard, where)
    if shard.get("file") != fmt.shard_file_name(r, n_ranks):
        raise _Malformed(f"{where} names file {shard.get('file')!r}, not {fmt.shard_file_name(r, n_ranks)!r}")
    if not isinstance(shard.get("sha256"), str) or not _SHA_RE.match(shard["sha256"]):
        raise _Malformed(f"{where} sha256 is not 64 hex digits")
    _int(shard.get("bytes"), f"{where} bytes")
    _keys(shard.get("keys"), f"{where} keys")
    has_rs = shard.get("has_rank_state", False)
    if not isinstance(has_rs, bool):
        raise _Malformed(f"{where} has_rank_state is not true or false")
    if version >= 2:
        spec = shard.get("rank_state")
        if spec is None and not has_rs:
            return
        spec = _dict(spec, f"{where} rank_state")
        if not has_rs:
            raise _Malformed(f"{where} lists rank_state arrays but has_rank_state is false")
        for key in _keys(list(spec), f"{where} rank_state keys"):
            entry = _dict(spec[key], f"{where} rank_state {key!r}")
            if version >= 3:
                check_array_spec(key, entry, None, f"{where} rank_state {key!r}")
            else:  # schema 2: dense arrays
                _shape(entry.get("shape"), f"{where} rank_state {key!r} shape")
                numeric_dtype(entry.get("dtype"), f"{where} rank_state {key!r} dtype")


def check_manifest(manifest: Any) -> None:
    """Raise ``_Malformed`` naming the first field that is missing, mistyped or inconsistent."""
    manifest = _dict(manifest, fmt.MANIFEST_NAME)
    version = manifest.get("schema_version")
    if version not in fmt.SUPPORTED_SCHEMA_VERSIONS or isinstance(version, bool):
        raise fmt.CheckpointError(f"schema_version {version!r} is not supported (this hpc_sparse reads "
                                  f"{list(fmt.SUPPORTED_SCHEMA_VERSIONS)})")
    _int(manifest.get("step"), "field 'step'")
    if manifest.get("epoch") is not None:
        _int(manifest["epoch"], "field 'epoch'")
    n_ranks = _int(manifest.get("n_ranks"), "field 'n_ranks'", low=1)
    if n_ranks > _MAX_RANKS:
        raise _Malformed(f"field 'n_ranks' is {n_ranks}, more than {_MAX_RANKS}")
    _dict(manifest.get("meta"), "field 'meta'")
    shards = _list(manifest.get("shards"), "field 'shards'")
    arrays = _dict(manifest.get("arrays"), "field 'arrays'")
    if len(shards) != n_ranks:
        raise _Malformed(f"manifest shard list does not match its {n_ranks} ranks")
    for r, shard in enumerate(shards):
        _check_shard(r, shard, n_ranks, version)
    listed = {key: r for r, sh in enumerate(shards) for key in sh["keys"]}
    _keys(list(arrays), "field 'arrays'")
    for key, spec in arrays.items():
        check_array_spec(key, spec, n_ranks)
        if listed.get(key) != spec["shard"]:
            raise _Malformed(f"manifest entry for array {key!r} is not in its shard")
    if set(listed) != set(arrays) or sum(len(sh["keys"]) for sh in shards) != len(arrays):
        raise _Malformed("manifest shards list arrays that are missing, or list one twice")


def parse_manifest(ckpt: Path, raw: bytes) -> dict[str, Any]:
    """Parse and check the bytes of ``ckpt``'s manifest; CheckpointError (invalid) if unusable."""
    name = fmt.MANIFEST_NAME
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise fmt.invalid(ckpt, f"{name} is nested too deeply to be a manifest") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fmt.invalid(ckpt, f"{name} cannot be parsed ({exc})") from exc
    try:
        check_manifest(manifest)
    except _Malformed as exc:
        raise fmt.invalid(ckpt, f"{name} is malformed: {exc}") from exc
    except fmt.CheckpointError as exc:  # an unsupported schema: its own fix
        raise fmt.invalid(ckpt, str(exc), "load it with the hpc_sparse version that wrote it, or start a new "
                                          "run") from exc
    return manifest


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """Read (at most :data:`~hpc_sparse.checkpoint.format.MANIFEST_MAX_BYTES`), parse and
    structurally check ``ckpt/manifest.json``.

    Raises CheckpointError if the checkpoint is unusable, CheckpointEnvironmentError if the
    file system failed while reading it.
    """
    ckpt = Path(ckpt)
    try:
        if not ckpt.is_dir():
            raise fmt.invalid(ckpt, "no such folder", "pass a step-<N> folder under RUN_DIR/checkpoints")
        raw = fmt.read_regular_file(ckpt / fmt.MANIFEST_NAME, fmt.MANIFEST_MAX_BYTES, ckpt,
                                    missing=f"{fmt.MANIFEST_NAME} is missing (the save never committed)")
    except (OSError, MemoryError) as exc:
        raise fmt.reading_failed(exc, ckpt / fmt.MANIFEST_NAME) from exc
    return parse_manifest(ckpt, raw)
