"""Memory a node spends on the dataset at P = 1, 2, 3 ranks: one mapped copy against one copy per rank.

    python tools/bench_data_memory.py [--datasets fashion-mnist,higgs] [--ranks 1,2,3]
                                      [--higgs-rows 1000000] [--workdir /tmp/hpc_sparse_bench]

For each dataset and each P it starts ``mpiexec -n P`` three times, on the product's own
path (``hpc_sparse.engine.load_data`` with the node coordinator, as ``hpc-sparse train``):

- ``cold``: an empty cache folder, so rank 0 builds the entry while the others wait, then
  every rank maps it (the first job on a dataset);
- ``mapped``: the same folder again, the entry exists (every later job);
- ``off``: ``data.cache_dir=off``, every rank loads its own copy (the baseline: how every
  rank loaded before the cache).

Each rank reads ``/proc/self/smaps_rollup`` after importing everything and starting MPI
(its *empty* PSS), then loads, reads every byte of the four arrays (as an epoch of
batches would: pages count only once touched), and reads it again. ``node_bytes_for_data``
is the sum over the ranks of PSS after minus PSS empty: the node's memory for the data,
shared pages split between the ranks that map them. ``dataset_bytes`` is the arrays' size.

Prints one JSON line per dataset and P; ``ratio_to_p1`` compares ``node_bytes_for_data``
with P = 1's of the same run (target at P = 3: at most 1.2). HIGGS is a file in HIGGS's
format with ``--higgs-rows`` random rows (label, 28 features, ``%.18e`` as the publisher's),
written into ``--workdir`` the first time (about 740 MB for 1 M rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpc_sparse.runtime.launcher import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]


def smaps_rollup() -> dict[str, int]:
    """This process's PSS, private and RSS bytes, from /proc/self/smaps_rollup."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return {"pss": out["Pss"], "private": out["Private_Clean"] + out["Private_Dirty"], "rss": out["Rss"]}


def worker(args: argparse.Namespace) -> None:
    """One rank of a measurement job: load through the engine, touch every byte, report."""
    import numpy as np
    from mpi4py import MPI

    from hpc_sparse.config import load_config
    from hpc_sparse.engine import load_data

    comm = MPI.COMM_WORLD
    sets = [f"data.name={args.dataset}", f"data.cache_dir={args.cache_dir}"]
    if args.dataset == "higgs":
        sets += [f"data.path={args.higgs_dir}", f"data.n_test={args.higgs_test}"]
    cfg = load_config(None, sets)
    gc.collect()
    comm.Barrier()
    empty = smaps_rollup()
    comm.Barrier()
    t0 = time.perf_counter()
    data = load_data(cfg, comm)
    seconds = time.perf_counter() - t0
    arrays = (data.x_train, data.y_train, data.x_test, data.y_test)
    checksum = sum(float(a.sum(dtype=np.float64)) for a in arrays)  # reads every page
    gc.collect()
    comm.Barrier()
    after = smaps_rollup()
    rows = comm.gather({"empty": empty, "after": after, "seconds": seconds, "checksum": checksum,
                        "bytes": sum(int(a.nbytes) for a in arrays), "note": data.notes[0]}, root=0)
    if comm.Get_rank() == 0:
        print("RESULT " + json.dumps(rows), flush=True)


def measure(ranks: int, dataset: str, cache_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__, "--worker",
           "--dataset", dataset, "--cache-dir", cache_dir, "--higgs-dir", str(args.workdir / "higgs"),
           "--higgs-test", str(args.higgs_test)]
    env = {**os.environ, "HPC_SPARSE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench_data_memory: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    if len({r["checksum"] for r in rows}) != 1:
        raise SystemExit(f"bench_data_memory: the ranks read different data: {[r['checksum'] for r in rows]}")
    return {"node_bytes_for_data": sum(r["after"]["pss"] - r["empty"]["pss"] for r in rows),
            "pss_bytes": [r["after"]["pss"] for r in rows], "empty_pss_bytes": [r["empty"]["pss"] for r in rows],
            "private_bytes": [r["after"]["private"] for r in rows], "dataset_bytes": rows[0]["bytes"],
            "load_seconds": round(max(r["seconds"] for r in rows), 2), "note": rows[0]["note"]}


def write_higgs(path: Path, n_rows: int, seed: int = 0) -> None:
    """A HIGGS-format CSV of ``n_rows`` random rows (written to a temporary name, then renamed)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as fh:
        for lo in range(0, n_rows, 50_000):
            k = min(50_000, n_rows - lo)
            block = np.hstack([rng.integers(0, 2, (k, 1)).astype(np.float64), rng.standard_normal((k, 28))])
            np.savetxt(fh, block, fmt="%.18e", delimiter=",")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="fashion-mnist,higgs")
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--higgs-rows", type=int, default=1_000_000)
    ap.add_argument("--higgs-test", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hpc_sparse_bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--higgs-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    higgs_csv = args.workdir / "higgs" / "HIGGS.csv"
    ranks = [int(p) for p in args.ranks.split(",")]
    for dataset in args.datasets.split(","):
        if dataset == "higgs" and not higgs_csv.is_file():
            print(f"bench_data_memory: writing {args.higgs_rows:,} rows to {higgs_csv}", file=sys.stderr)
            write_higgs(higgs_csv, args.higgs_rows)
        first = None
        for p in ranks:
            folder = Path(tempfile.mkdtemp(prefix="cache-", dir=args.workdir))
            try:
                cold = measure(p, dataset, str(folder), args)
                mapped = measure(p, dataset, str(folder), args)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            off = measure(p, dataset, "off", args)
            first = first or (cold, mapped, off)
            line = {"benchmark": "data_memory", "dataset": dataset, "ranks": p,
                    "dataset_bytes": cold["dataset_bytes"],
                    "node_bytes_for_data": cold["node_bytes_for_data"],
                    "ratio_to_p1": round(cold["node_bytes_for_data"] / first[0]["node_bytes_for_data"], 3),
                    "pss_bytes": cold["pss_bytes"], "private_bytes": cold["private_bytes"],
                    "empty_pss_bytes": cold["empty_pss_bytes"], "load_seconds": cold["load_seconds"],
                    "mapped_node_bytes_for_data": mapped["node_bytes_for_data"],
                    "mapped_ratio_to_p1": round(mapped["node_bytes_for_data"] / first[1]["node_bytes_for_data"], 3),
                    "mapped_pss_bytes": mapped["pss_bytes"], "mapped_private_bytes": mapped["private_bytes"],
                    "mapped_load_seconds": mapped["load_seconds"],
                    "baseline_off_node_bytes_for_data": off["node_bytes_for_data"],
                    "baseline_off_ratio_to_p1": round(off["node_bytes_for_data"] / first[2]["node_bytes_for_data"], 3),
                    "baseline_off_private_bytes": off["private_bytes"], "baseline_off_load_seconds": off["load_seconds"],
                    "cold_note": cold["note"]}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
