"""Dump one checkpoint: manifest summary, shards, every array (name, kind, shape, dtype, shard, nnz).

Usage::

    python tools/inspect_checkpoint.py RUN_DIR/checkpoints/step-000000123 [--verify] [--json]
    python tools/inspect_checkpoint.py RUN_DIR            # list the run's checkpoints

Reads the shards directly with h5py, so it also shows what is inside a folder whose manifest is
missing (an interrupted save). ``--verify`` runs the full load-time verification; the exit
status is then 1 if the checkpoint is invalid. Never modifies anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import h5py

try:
    import hpc_sparse  # noqa: F401
except ImportError:  # run from a source tree without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_sparse.checkpoint import CheckpointError, checkpoint_dir, list_checkpoints, verify_checkpoint
from hpc_sparse.checkpoint import read_manifest


def scan_shard(path: Path) -> list[dict[str, Any]]:
    """Arrays stored in one shard, as found in the file (independent of the manifest)."""
    rows: list[dict[str, Any]] = []

    def visit(name: str, node: Any) -> None:
        if isinstance(node, h5py.Group) and node.attrs.get("kind") == "csr":
            shape = tuple(int(s) for s in node["shape"][()])
            rows.append({"key": name, "kind": "csr", "shape": shape, "dtype": str(node["data"].dtype),
                         "index_dtype": str(node["indices"].dtype), "nnz": int(node["indices"].shape[0]),
                         "bytes": sum(node[d].id.get_storage_size() for d in ("data", "indices", "indptr"))})
        elif isinstance(node, h5py.Dataset) and not any(r["kind"] == "csr" and name.startswith(r["key"] + "/")
                                                        for r in rows):
            rows.append({"key": name, "kind": "dense", "shape": node.shape, "dtype": str(node.dtype),
                         "nnz": None, "bytes": node.id.get_storage_size()})

    with h5py.File(path, "r") as f:
        for group in ("state", "rank_state"):
            if group in f:
                start = len(rows)
                f[group].visititems(visit)
                for row in rows[start:]:
                    row["group"] = group
    return rows


def describe(ckpt: Path) -> dict[str, Any]:
    """Everything worth printing about one checkpoint folder."""
    out: dict[str, Any] = {"path": str(ckpt)}
    try:
        manifest = read_manifest(ckpt)
        out["manifest"] = {k: manifest.get(k) for k in ("schema_version", "step", "epoch", "n_ranks",
                                                        "created", "versions")}
        out["meta_keys"] = sorted(manifest["meta"])
        out["shards"] = [{k: s.get(k) for k in ("file", "bytes", "sha256", "keys", "has_rank_state")}
                         for s in manifest["shards"]]
    except CheckpointError as exc:
        out["manifest_error"] = str(exc)
    arrays = []
    for shard in sorted(ckpt.glob("shard-*.h5")):
        try:
            for row in scan_shard(shard):
                arrays.append(row | {"shard": shard.name, "shape": list(row["shape"])})
        except OSError as exc:
            arrays.append({"key": "?", "shard": shard.name, "error": f"unreadable: {exc}"})
    out["arrays"] = arrays
    return out


def print_text(info: dict[str, Any]) -> None:
    print(f"checkpoint {info['path']}")
    if "manifest_error" in info:
        print(f"  manifest: {info['manifest_error']}")
    else:
        m = info["manifest"]
        print(f"  schema {m['schema_version']}  step {m['step']}  epoch {m['epoch']}  ranks {m['n_ranks']}  "
              f"created {m['created']}")
        print("  versions: " + ", ".join(f"{k} {v}" for k, v in (m["versions"] or {}).items()))
        print("  meta keys: " + ", ".join(info["meta_keys"]))
        for s in info["shards"]:
            print(f"  {s['file']}  {s['bytes']:>14,d} B  sha256 {s['sha256'][:16]}…  {len(s['keys'])} arrays"
                  + ("  + rank_state" if s["has_rank_state"] else ""))
    print(f"  {'array':<40} {'kind':<6} {'shape':<18} {'dtype':<9} {'nnz':>12} {'bytes':>14}  shard")
    for a in info["arrays"]:
        if "error" in a:
            print(f"  {a['shard']}: {a['error']}")
            continue
        name = a["key"] if a["group"] == "state" else f"[rank_state] {a['key']}"
        nnz = "" if a["nnz"] is None else f"{a['nnz']:,d}"
        print(f"  {name:<40} {a['kind']:<6} {str(tuple(a['shape'])):<18} {a['dtype']:<9} {nnz:>12} "
              f"{a['bytes']:>14,d}  {a['shard']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a step-<N> folder, or a run folder to list its checkpoints")
    parser.add_argument("--verify", action="store_true", help="full verification (checksums, CSR structure)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    if checkpoint_dir(args.path).is_dir():  # a run folder: list, always verified
        rows = [r | {"path": str(r["path"])} for r in list_checkpoints(args.path)]
        if args.json:
            print(json.dumps(rows))
        for r in rows if not args.json else []:
            state = "valid" if r["valid"] else f"INVALID: {r['reason']}"
            print(f"{r['path']}  step {r['step']}  epoch {r['epoch']}  ranks {r['n_ranks']}  "
                  f"{r['bytes']:,d} B  {state}")
        return 0 if all(r["valid"] for r in rows) else 1

    info = describe(args.path)
    status = 0
    if args.verify:
        try:
            verify_checkpoint(args.path)
            info["verify"] = "ok"
        except CheckpointError as exc:
            info["verify"], status = str(exc), 1
    if args.json:
        print(json.dumps(info, default=str))
    else:
        print_text(info)
        if args.verify:
            print(f"  verify: {info['verify']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
