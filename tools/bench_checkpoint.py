"""Checkpoint write/read throughput against a plain sequential write on the same disk.

Builds a model-sized state (default 3 CSR layers of 17 M nnz: float32 data, int32 indices, plus
float32 momentum of the same nnz), then per repeat, alternating to share the disk's state fairly:

* raw: every rank writes the same bytes (its share of the arrays) with open/write/fsync;
  (a warm-up raw write comes first, and ``os.sync`` + a short pause precede each timed write);
* save: ``save_checkpoint`` into a fresh run folder (fsync, checksums, manifest, rename);
* load: ``load_checkpoint`` on every rank (full verification; the page cache is warm).

Prints ONE JSON line (medians over repeats). Run with one process, or under
``mpiexec -n P python -m mpi4py tools/bench_checkpoint.py`` to use COMM_WORLD.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import scipy.sparse as sp
from mpi4py import MPI

try:
    import hpc_sparse  # noqa: F401
except ImportError:  # run from a source tree without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_sparse.checkpoint import load_checkpoint, save_checkpoint
from hpc_sparse.checkpoint import format as fmt


def random_csr(n_rows: int, per_row: int, rng: np.random.Generator) -> sp.csr_matrix:
    """CSR with ``per_row`` sorted, distinct random columns per row; float32 data, int32 indices."""
    gaps = rng.integers(1, 21, size=(n_rows, per_row), dtype=np.int32)  # mean gap 10.5
    cols = np.cumsum(gaps, axis=1, dtype=np.int32) - 1
    del gaps
    n_cols = int(cols.max()) + 1
    indptr = np.arange(0, n_rows * per_row + 1, per_row, dtype=np.int32)
    data = rng.standard_normal(n_rows * per_row, dtype=np.float32)
    mat = sp.csr_matrix((n_rows, n_cols), dtype=np.float32)
    mat.data, mat.indices, mat.indptr = data, cols.reshape(-1), indptr
    return mat


def build_state(n_layers: int, nnz_per_layer: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    per_row = 2000
    state: dict = {}
    for i in range(n_layers):
        w = random_csr(max(1, nnz_per_layer // per_row), per_row, rng)
        state[f"layers/{i}/W"] = w
        state[f"layers/{i}/b"] = rng.standard_normal(w.shape[1], dtype=np.float32)
        state[f"optimizer/layers/{i}/W_momentum"] = rng.standard_normal(w.nnz, dtype=np.float32)
    return state


def raw_write(path: Path, arrays: list[np.ndarray]) -> None:
    """The baseline: the same bytes, one file, sequential writes, then fsync."""
    with open(path, "wb", buffering=0) as fh:
        for arr in arrays:
            view = memoryview(np.ascontiguousarray(arr)).cast("B")
            while view:
                view = view[fh.write(view):]
        os.fsync(fh.fileno())


def timed(comm, fn):
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    comm.Barrier()  # the slowest rank defines the time
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir under .)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--nnz-per-layer", type=int, default=17_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--index-compression", choices=["none", "lzf", "gzip"], default="none",
                        help="HDF5 filter for CSR indices/indptr (to measure the trade-off)")
    args = parser.parse_args(argv)
    fmt.INDEX_COMPRESSION = None if args.index_compression == "none" else args.index_compression

    world = MPI.COMM_WORLD
    comm = world.Dup() if world.size > 1 else MPI.COMM_SELF.Dup()
    rank, size = comm.rank, comm.size
    base = None
    if rank == 0:
        parent = args.dir if args.dir is not None else Path.cwd()
        parent.mkdir(parents=True, exist_ok=True)
        base = tempfile.mkdtemp(prefix="bench-ckpt-", dir=parent)
    base = Path(comm.bcast(base, root=0))

    state = build_state(args.layers, args.nnz_per_layer)
    nnz = sum(x.nnz for x in state.values() if sp.issparse(x))
    specs = fmt.describe_state(state)
    mine = fmt.assign_keys({k: s["nbytes"] for k, s in specs.items()}, size)[rank]
    my_arrays = [a for k in mine for a in ((state[k].data, state[k].indices, state[k].indptr)
                                           if sp.issparse(state[k]) else (state[k],))]
    meta = {"epoch": 0, "config": {"bench": True}}

    def settle() -> None:
        # Flush and let the disk go idle so that no timed phase pays for the previous one's
        # write-back or deletions.
        comm.Barrier()
        os.sync()
        time.sleep(0.5)
        comm.Barrier()

    def bench_raw(rep: int) -> float:
        raw_path = base / f"raw-{rep}-{rank:05d}.bin"
        dt = timed(comm, lambda: raw_write(raw_path, my_arrays))[0]
        raw_path.unlink()
        return dt

    raw_t, save_t, load_t, total_bytes = [], [], [], 0
    try:
        bench_raw(-1)  # warm-up, not counted: the first big write also pays for page-cache setup
        for rep in range(args.repeats):
            settle()
            raw_t.append(bench_raw(rep))
            settle()
            run_dir = base / f"run-{rep}"
            dt, path = timed(comm, lambda: save_checkpoint(comm, run_dir, 1, state, meta, keep=2))
            save_t.append(dt)
            total_bytes = sum(p.stat().st_size for p in path.iterdir())
            dt, loaded = timed(comm, lambda: load_checkpoint(path, rank=rank))
            load_t.append(dt)
            del loaded
            if rep == args.repeats - 1:  # a second save into the same run also verifies the kept one
                settle()
                retention_t = timed(comm, lambda: save_checkpoint(comm, run_dir, 2, state, meta, keep=2))[0]
            comm.Barrier()
            if rank == 0:
                shutil.rmtree(run_dir)
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(base, ignore_errors=True)

    if rank == 0:
        mb = total_bytes / 1e6
        write, read, raw = mb / median(save_t), mb / median(load_t), mb / median(raw_t)
        print(json.dumps({
            "nnz": nnz, "bytes": total_bytes, "n_ranks": size,
            "write_s": round(median(save_t), 3), "read_s": round(median(load_t), 3),
            "raw_write_s": round(median(raw_t), 3), "save_with_retention_s": round(retention_t, 3),
            "write_mb_s": round(write, 1), "read_mb_s": round(read, 1), "raw_write_mb_s": round(raw, 1),
            "write_ratio": round(write / raw, 3), "index_compression": args.index_compression,
            "repeats": args.repeats, "read_cache": "warm", "dir": str(base.parent),
            "write_s_each": [round(t, 3) for t in save_t], "raw_write_s_each": [round(t, 3) for t in raw_t],
        }))
    comm.Free()


if __name__ == "__main__":
    main()
