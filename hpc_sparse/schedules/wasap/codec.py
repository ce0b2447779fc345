"""WASAP-SGD's message contents: a model as flat float32 / int64 payloads and back.

The layout of each payload is given in :mod:`hpc_sparse.parallel.wasap_header`. No MPI here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from hpc_sparse.parallel import wasap_header as wh
from hpc_sparse.sparse import SparseMLP


def model_shapes(model: SparseMLP) -> list[tuple[int, int, int]]:
    """(nnz, n_in, n_out) of every layer, as carried in message headers."""
    return [(l.nnz, l.shape[0], l.shape[1]) for l in model.layers]


def pack_floats(model: SparseMLP, momentum: bool) -> np.ndarray:
    """float32: per layer ``W.data``, ``b``; then (momentum) per layer ``W momentum``, ``b momentum``."""
    parts = [a for l in model.layers for a in (l.weight.data, l.bias)]
    if momentum:
        parts += [a for l in model.layers for a in (l.w_velocity, l.b_velocity)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def pack_indices(model: SparseMLP) -> np.ndarray:
    """int64: per layer ``indptr``, ``indices``."""
    return np.concatenate([a.astype(np.int64) for l in model.layers for a in (l.weight.indptr, l.weight.indices)])


def unpack_layers(header: wh.Header, floats: np.ndarray, ints: np.ndarray | None) -> list[dict[str, Any]]:
    """Split a MODEL/FINAL/MERGE payload into per-layer arrays (views into the payload):
    ``data``, ``bias``, and if present ``velocity``, ``b_velocity``, ``indptr``, ``indices``."""
    out: list[dict[str, Any]] = [{"shape": (n_in, n_out)} for _, n_in, n_out in header.shapes]
    pos = 0
    keys = [("data", "bias")]
    if header.kind in (wh.MODEL, wh.FINAL) and header.flags & wh.FLAG_MOMENTUM:
        keys.append(("velocity", "b_velocity"))
    for kw, kb in keys:
        for rec, (nnz, _, n_out) in zip(out, header.shapes):
            rec[kw] = floats[pos:pos + nnz]
            rec[kb] = floats[pos + nnz:pos + nnz + n_out]
            pos += nnz + n_out
    if ints is not None:
        ipos = 0
        for rec, (nnz, n_in, _) in zip(out, header.shapes):
            rec["indptr"] = ints[ipos:ipos + n_in + 1]
            rec["indices"] = ints[ipos + n_in + 1:ipos + n_in + 1 + nnz]
            ipos += n_in + 1 + nnz
    if pos != floats.size:
        raise wh.ProtocolError(f"payload has {floats.size} floats, its header describes {pos}; this is a bug")
    return out


def install(model: SparseMLP, header: wh.Header, floats: np.ndarray, ints: np.ndarray | None) -> None:
    """Replace ``model``'s weights and biases (and momentum, if sent) by a received model. With
    indices the topology is rebuilt; without, values are copied into the current topology."""
    widths = model.widths
    for layer, rec in zip(model.layers, unpack_layers(header, floats, ints)):
        vel = rec.get("velocity")
        if "indptr" in rec:
            layer.bias = rec["bias"].copy()
            layer.b_velocity = rec["b_velocity"].copy() if vel is not None else np.zeros_like(layer.bias)
            w = sp.csr_matrix((rec["data"], rec["indices"], rec["indptr"]), shape=rec["shape"])
            layer.set_weight(w, vel)
        else:
            if layer.shape != rec["shape"] or layer.nnz != rec["data"].size:
                raise wh.ProtocolError(f"values for shape {rec['shape']} with nnz {rec['data'].size} sent without "
                                       f"indices to a layer of shape {layer.shape}, nnz {layer.nnz}; this is a bug")
            np.copyto(layer.weight.data, rec["data"])
            np.copyto(layer.bias, rec["bias"])
            if vel is not None:
                np.copyto(layer.w_velocity, vel)
                np.copyto(layer.b_velocity, rec["b_velocity"])
    if model.widths != widths:
        model.topology_changed()


def final_message(model: SparseMLP, version: int = 0) -> tuple[wh.Header, np.ndarray, np.ndarray]:
    """The FINAL message of ``model`` (topology ``version``): header, floats with momentum,
    indices."""
    h = wh.Header(wh.FINAL, version=version, flags=wh.FLAG_INDICES | wh.FLAG_MOMENTUM, shapes=model_shapes(model))
    return h, pack_floats(model, True), pack_indices(model)
