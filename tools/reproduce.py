#!/usr/bin/env python3
"""Reproduce the paper's claims as ablation studies: tables, JSON and figures, mean ± std over seeds.

Studies (``--studies``, default all):
  parallel    sequential, sync P=2, WASAP-SGD P=2 and P=3, at equal epochs
  activation  All-ReLU, ReLU, LeakyReLU
  topology    SET, RigL, static sparse (no evolution) at the same nnz
  importance  importance pruning on/off, the paper's schedule scaled to the run's length
  density     epsilon 5, 10, 20, 40
  structure   unstructured vs N:M vs transposable N:M (2:4 and 1:16) at the same nnz
  precision   float32 vs bfloat16 activations (train.activation_dtype)

Profiles (exactly one):
  --quick         run every study here on Fashion-MNIST (10 epochs, 3 seeds; about 15-30 min on
                  2 cores), then write the results. Finished runs in --runs-dir are reused.
  --sweep FILE    write the same runs as a jobs/sweep.sbatch sweep file (with the sbatch lines
                  to submit it), for a cluster. A dataset read from files needs --data-path
                  (where the cluster's nodes find it) unless the config sets data.path.
  --collect DIR   build the results from finished run folders under DIR (any depth, from
                  anywhere); pass the same --config/--epochs/--seeds as for --sweep. Folders
                  that are not finished training runs (a `convert` output, an unfinished run)
                  are skipped and listed; when several folders match one run, all are listed
                  and the one used is named.

Every run is the product's own CLI:
  [mpiexec -n P] python -m mpi4py -m hpc_sparse train --config CONFIG --set seed=S ... --run-dir DIR
Results: OUT/<study>.md, .json, .png (default OUT = docs/results).

    python tools/reproduce.py --quick
    python tools/reproduce.py --sweep sweep.txt --epochs 100 --seeds 5 --data-path /scratch/fashion-mnist
    python tools/reproduce.py --collect runs/ --epochs 100 --seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))  # a fresh clone works without `pip install -e .` (dependencies still needed)

from _reproduce_plan import Plan, Run, make_plan, sweep_lines, studies  # noqa: E402

from hpc_sparse.runtime import launcher  # noqa: E402

DEFAULT_CONFIG = "configs/fashion-mnist.toml"

# Cost model for the estimate, measured on this project's 2-core VM with Fashion-MNIST
# (60,000 training samples) and 1 thread per rank: an idle machine runs an epoch of the
# 784-1000-1000-1000-10 network (nnz 125k) in about 1.7 s (training, SET, evaluation);
# time grows about linearly with nnz. Start-up (imports, data, cached kernels) ~6 s, and the
# very first run of a fresh clone compiles the numba kernels (~60 s).
EPOCH_S_PER_NNZ = 1.7 / 125_000
STARTUP_S, FIRST_COMPILE_S = 6.0, 60.0
RANK_FACTOR = {1: 1.0, 2: 0.55, 3: 0.8}  # epoch time relative to 1 rank (3 ranks share 2 cores)
# RigL scores candidate connections every epoch; N:M regrowth samples with rejection (transposable
# 1:16 on the 784-1000-1000-1000 layers: ~0.9 s per evolution, 2:4 ~0.1-0.2 s)
EXTRA_FACTOR = {"topology.growth=gradient": 1.25, "topology.structure=nm": 1.1,
                "topology.structure=nm_transposable": 1.3}


def estimate_seconds(run: Run, plan: Plan) -> float:
    """Wall seconds of one run on an idle 2-core machine (see the constants above)."""
    from hpc_sparse.config import load_config

    cfg = load_config(plan.base_config, list(run.sets))
    # Erdos-Renyi: each connection present with p = epsilon (n_in + n_out) / (n_in n_out), at most 1
    nnz = sum(min(1.0, cfg.model.epsilon * (a + b) / (a * b)) * a * b
              for a, b in zip(cfg.model.layers[:-1], cfg.model.layers[1:]))
    factor = RANK_FACTOR.get(run.ranks, run.ranks / 2) * max([EXTRA_FACTOR.get(s, 1.0) for s in run.sets] + [1.0])
    return STARTUP_S + plan.epochs * EPOCH_S_PER_NNZ * nnz * factor


def find_mpiexec() -> str:
    try:
        return launcher.find_mpiexec()
    except RuntimeError as exc:
        sys.exit(f"reproduce: {exc}")


def environment_sets(data_path: str | None) -> list[str]:
    """Overrides that say where a run finds its data (not part of what it computes)."""
    return [] if data_path is None else [f"data.path={data_path}"]


def command(run: Run, plan: Plan, run_dir: Path, threads: int, data_path: str | None = None) -> list[str]:
    head = [] if run.ranks == 1 else [find_mpiexec(), "-n", str(run.ranks)]
    sets = [*run.sets, *environment_sets(data_path), f"train.threads={threads}"]
    return [*head, sys.executable, "-m", "mpi4py", "-m", "hpc_sparse", "train", "--config", str(plan.base_config),
            *[a for s in sets for a in ("--set", s)], "--run-dir", str(run_dir), "--quiet"]


def preflight(plan: Plan, data_path: str | None) -> None:
    """Fail in one line, before any run, if a dependency or the dataset is missing."""
    missing = []
    for mod in ("numpy", "scipy", "numba", "h5py", "mpi4py", "matplotlib", "tqdm"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        sys.exit(f"reproduce: missing Python packages {', '.join(missing)}; fix: pip install -e '.[plot]'")
    from hpc_sparse.config import load_config
    from hpc_sparse.data import load_dataset
    from hpc_sparse.errors import UserError

    try:
        sets = [f"train.epochs={plan.epochs}", *environment_sets(data_path)]
        load_dataset(**dataclasses.asdict(load_config(plan.base_config, sets).data))
    except UserError as exc:
        sys.exit(f"reproduce: {exc}")


def run_all(plan: Plan, runs_dir: Path, jobs: int, timeout: float, data_path: str | None = None) -> dict[Run, str]:
    """Run every planned run not finished yet; exclusive runs alone, the others ``jobs`` at a time.
    Returns {run: error text} for the runs that failed."""
    from tqdm import tqdm

    from _reproduce_report import NotARun, read_run

    todo = []
    for run in plan.runs:
        try:
            if plan.signatures.get(read_run(runs_dir / run.name())["signature"]) == run:
                continue
        except NotARun:
            pass
        todo.append(run)
    cost = {run: estimate_seconds(run, plan) for run in todo}
    numba_cached = any((ROOT / "hpc_sparse" / "sparse" / "__pycache__").glob("*.nbi"))
    first = 0.0 if numba_cached or not todo else FIRST_COMPILE_S
    exclusive = [r for r in todo if r.exclusive]
    shared = [r for r in todo if not r.exclusive]
    wall = first + sum(cost[r] for r in exclusive) + 1.1 * sum(cost[r] for r in shared) / max(1, jobs)
    print(f"reproduce: {len(plan.runs)} runs planned, {len(plan.runs) - len(todo)} already finished in {runs_dir}, "
          f"{len(todo)} to run; estimate {wall / 60:.0f} min on an idle 2-core machine (longer if other jobs "
          "share it)", flush=True)
    tty = sys.stderr.isatty() and not os.environ.get("CI")
    bar = tqdm(total=round(sum(cost.values())), unit="s", disable=not tty, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")
    failed: dict[Run, str] = {}
    done = 0
    t_start = time.monotonic()

    def finished(run: Run, proc: subprocess.Popen, log: Path) -> None:
        nonlocal done
        done += 1
        if proc.returncode != 0:
            tail = log.read_text()[-800:] if log.is_file() else ""
            failed[run] = f"exit status {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        bar.update(round(cost[run]))
        bar.set_postfix_str(f"runs {done}/{len(todo)}")
        line = (f"[{time.strftime('%H:%M:%S')}] {done}/{len(todo)} {run.name()}: "
                + (f"FAILED ({failed[run]})" if run in failed else "ok")
                + f"; {(time.monotonic() - t_start) / 60:.1f} min elapsed")
        (bar.write(line, file=sys.stderr) if tty else print(line, file=sys.stderr, flush=True))

    def start(run: Run, threads: int) -> tuple[Run, subprocess.Popen, Path]:
        run_dir = runs_dir / run.name()
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
        run_dir.mkdir(parents=True)
        log = run_dir / "reproduce.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(command(run, plan, run_dir, threads, data_path), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "HPC_SPARSE_THREADS": str(threads)})
        return run, proc, log

    def wait(active: list[tuple[Run, subprocess.Popen, Path]], until_free: int) -> None:
        while len(active) > until_free:
            for item in list(active):
                run, proc, log = item
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    if time.monotonic() - item_started[id(proc)] > timeout:
                        stop(proc)
                    else:
                        continue
                active.remove(item)
                finished(run, proc, log)

    item_started: dict[int, float] = {}
    active: list[tuple[Run, subprocess.Popen, Path]] = []
    try:
        for run in exclusive + shared:
            wait(active, 0 if run.exclusive else jobs - 1)
            item = start(run, 1)
            item_started[id(item[1])] = time.monotonic()
            active.append(item)
            if run.exclusive:
                wait(active, 0)
        wait(active, 0)
    finally:
        for _, proc, _ in active:
            stop(proc)
        bar.close()
    return failed


def stop(proc: subprocess.Popen) -> None:
    """End a run: SIGTERM first (mpiexec forwards it to every rank), SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def write_results(plan: Plan, roots: list[Path], out: Path, profile: str, jobs: int, commit: str, config: str
                  ) -> int:
    """Collect, write every study's files, print the tables. Returns the number of missing cells."""
    from _reproduce_report import collect, write_study

    collected = collect(plan, roots)
    for line in collected.report(plan):
        print(line, file=sys.stderr)
    found = collected.found
    meta = {"profile": profile, "config": config, "epochs": plan.epochs, "seeds": plan.seeds,
            "jobs": jobs, "date": datetime.date.today().isoformat(), "commit": commit,
            "runs_found": len(found), "runs_planned": len(plan.runs)}
    for study in plan.studies.values():
        print(write_study(plan, study, collected, out, meta))
    print(f"reproduce: {len(found)}/{len(plan.runs)} runs found; tables, JSON and figures in {out}/")
    return len(plan.runs) - len(found)


def write_sweep(plan: Plan, args: argparse.Namespace, names: list[str]) -> None:
    """The plan as a jobs/sweep.sbatch sweep file, with the sbatch lines that submit it."""
    from hpc_sparse.config import load_config

    data = load_config(plan.base_config, []).data
    if args.data_path is None and not data.path and data.name != "synthetic":
        sys.exit(f"reproduce: --sweep needs --data-path DIR: {args.config} leaves data.path empty, i.e. the "
                 f"{data.name} loader's default place on this machine (for fashion-mnist, Debian's "
                 "dataset-fashion-mnist folder), which cluster nodes rarely have; fix: --data-path DIR, the "
                 "dataset's folder as the nodes see it (or set data.path in the config)")
    env = environment_sets(args.data_path)
    if any(" " in s for s in env):
        sys.exit(f"reproduce: --data-path {args.data_path!r} has a space; sweep files split words on spaces")
    lines, ranges = sweep_lines(plan, str(args.config), env)
    submit = [f"#   SWEEP_FILE={args.sweep} RUN_DIR=runs/reproduce PYTHON={sys.executable} sbatch --ntasks={p} "
              f"--array={a}-{b} jobs/sweep.sbatch" for p, a, b in ranges]
    header = [f"# tools/reproduce.py sweep: {len(lines)} runs of {args.config}, {args.epochs} epochs, seeds "
              f"1..{args.seeds}; studies {', '.join(names)}.",
              "# Lines are ordered by rank count; from the repository root, submit each range with its --ntasks",
              "# (PYTHON: the interpreter that wrote this file; give the cluster's own if the jobs run elsewhere):",
              *submit,
              f"# then: python tools/reproduce.py --collect runs/ --config {args.config} --epochs {args.epochs} "
              f"--seeds {args.seeds} --studies {','.join(names)}"]
    Path(args.sweep).write_text("\n".join(header + lines) + "\n")
    print(f"reproduce: wrote {len(lines)} runs to {args.sweep}; submit with:")
    print("\n".join(s[2:] for s in submit))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="run every study here, then write the results")
    mode.add_argument("--sweep", metavar="FILE", help="write the runs as a jobs/sweep.sbatch sweep file")
    mode.add_argument("--collect", metavar="DIR", nargs="+", help="results from finished run folders under DIR")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"base config (default {DEFAULT_CONFIG})")
    ap.add_argument("--data-path", help="data.path of every run (where the dataset's files are; for --sweep: "
                                        "as the cluster's nodes see it); ignored when matching finished runs")
    ap.add_argument("--epochs", type=int, default=10, help="train.epochs of every run (default 10)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N per cell (default 3; at least 3 for a spread)")
    ap.add_argument("--studies", default=",".join(studies(10)), help="comma-separated subset of the studies")
    ap.add_argument("--runs-dir", default="runs/reproduce-quick", help="--quick: where the runs go")
    ap.add_argument("--out", default="docs/results", help="where the tables, JSON and figures go")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="--quick: 1-rank runs of studies without timings run this many at a time")
    ap.add_argument("--timeout", type=float, default=3600, help="--quick: seconds before a run is killed")
    args = ap.parse_args(argv)
    commit = git_commit()  # before the runs: the code they ran, whatever is edited meanwhile
    names = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = set(names) - set(studies(args.epochs))
    if unknown or args.seeds < 1 or args.epochs < 1:
        ap.error(f"unknown studies {sorted(unknown)}" if unknown else "--seeds and --epochs must be >= 1")
    config = Path(args.config)
    if not (ROOT / config).is_file() and not config.is_file():
        ap.error(f"config '{config}' not found")
    plan = make_plan((config if config.is_file() else ROOT / config).resolve(), args.epochs, list(range(1, args.seeds + 1)), names)
    if args.sweep:
        write_sweep(plan, args, names)
        return 0
    if args.collect:
        missing = write_results(plan, [Path(d) for d in args.collect], Path(args.out), "collect", args.jobs, commit,
                                args.config)
        return 1 if missing else 0
    preflight(plan, args.data_path)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    failed = run_all(plan, runs_dir.resolve(), max(1, args.jobs), args.timeout, args.data_path)  # cwd: the repo
    for run, why in failed.items():
        print(f"reproduce: run {run.name()} failed: {why} (log: {runs_dir / run.name() / 'reproduce.log'})",
              file=sys.stderr)
    missing = write_results(plan, [runs_dir], Path(args.out), "quick", args.jobs, commit, args.config)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
