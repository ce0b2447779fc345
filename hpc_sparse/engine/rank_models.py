"""A rank's own model in a checkpoint's per-rank state (where every rank trains its own model,
as in WASAP-SGD's local phase): packed and unpacked here, and nowhere else.

The model's ``state_dict()`` goes under :data:`MODEL_PREFIX` into the rank's shard, CSR
weights as CSR (checkpoint schema 3). Checkpoints of schema 2 stored each weight as four
dense arrays (``W/data``, ``W/indices``, ``W/indptr``, ``W/shape``); those still unpack.
"""

from __future__ import annotations

from typing import Any

import scipy.sparse as sp

from hpc_sparse.sparse import SparseMLP

MODEL_PREFIX = "model/"
"""Key prefix of a rank's own model in its per-rank state."""


def pack(model: SparseMLP) -> dict[str, Any]:
    """``model`` as per-rank state: its ``state_dict()`` under :data:`MODEL_PREFIX` (no copies)."""
    return {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}


def unpack(rank_state: dict[str, Any] | None) -> dict[str, Any]:
    """The model ``state_dict()`` held in ``rank_state`` ({} if it holds none). Raises
    ValueError for a schema-2 weight whose four arrays do not form a CSR matrix."""
    mine = {k[len(MODEL_PREFIX):]: v for k, v in (rank_state or {}).items() if k.startswith(MODEL_PREFIX)}
    for key in [k[:-len("/data")] for k in mine if k.endswith("/W/data")]:  # schema 2
        parts = {p: mine.pop(f"{key}/{p}") for p in ("data", "indices", "indptr", "shape")}
        w = sp.csr_matrix(tuple(int(s) for s in parts["shape"]), dtype=parts["data"].dtype)
        w.data, w.indices, w.indptr = parts["data"], parts["indices"], parts["indptr"]
        w.check_format(full_check=True)
        mine[key] = w
    return mine

