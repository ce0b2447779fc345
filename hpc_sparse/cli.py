"""``hpc-sparse`` / ``python -m hpc_sparse``: train, evaluate, info, clean, convert, config-help.

Exit status: 0 success; 2 bad input (config, data, checkpoint; one line on stderr naming
the fix); 75 stopped by a signal after checkpointing (requeue me); 1 anything else.
Under MPI, an error on any rank aborts the whole job at once with that rank's message.
Statuses 2 and 75 leave through ``MPI.Finalize`` and ``os._exit`` on every rank
(:func:`hpc_sparse.parallel.comm.exit_with_status`), so that ``srun`` reports them as they
are; only an error on some ranks, where the others may wait in a collective, aborts.

``train`` picks the schedule by ``parallel.mode`` (:func:`hpc_sparse.schedules.schedule_for`)
and runs it on the engine. Its stop flag (SIGUSR1/SIGTERM) is installed first thing, before
the heavy imports; once it is installed on every rank, rank 0 creates the job script's ready
file (:func:`hpc_sparse.runtime.signals.announce_ready`), and only then does the script pass
stop signals on to the ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_sparse import __version__
from hpc_sparse.errors import EXIT_USER_ERROR, UserError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hpc-sparse", description="Truly sparse neural network training with MPI.")
    ap.add_argument("--version", action="version", version=f"hpc_sparse {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a network (run under mpiexec/srun for several ranks)")
    tr.add_argument("--config", help="TOML config file (see configs/)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key (repeatable), e.g. --set train.lr=0.05")
    tr.add_argument("--run-dir", required=True, help="output folder: metrics.jsonl, summary.json, checkpoints/")
    tr.add_argument("--resume", metavar="auto|PATH",
                    help="'auto': continue from the newest valid checkpoint in --run-dir (or start fresh if it has "
                         "none); PATH: continue from that checkpoint folder")
    tr.add_argument("--fresh-if-none-valid", action="store_true",
                    help="with --resume auto: start from step 0 even when committed checkpoints exist but none "
                         "is valid (they are set aside); without it that is refused")
    tr.add_argument("--break-lock", action="store_true",
                    help="take over the run dir's lock when its holder cannot be checked from here (another host "
                         "without SLURM); only if you know that job has ended")
    tr.add_argument("--quiet", action="store_true", help="no progress output")

    ev = sub.add_parser("evaluate", help="test loss and accuracy of a run's newest valid checkpoint")
    ev.add_argument("--run-dir", required=True, help="the training run to evaluate")
    ev.add_argument("--checkpoint", help="a specific checkpoint folder instead of the newest valid one")

    inf = sub.add_parser("info", help="layer shapes, nnz, density, neurons, config, checkpoints, set-aside "
                                      "folders and lock of a run")
    inf.add_argument("--run-dir", required=True, help="the training run to describe")

    cl = sub.add_parser("clean", help="list, and with --yes remove, a run's set-aside and temporary checkpoint "
                                      "folders (never a committed checkpoint)")
    cl.add_argument("--run-dir", required=True, help="the run whose leftover folders to list or remove")
    cl.add_argument("--yes", action="store_true", help="remove them (while holding the run dir's lock)")

    cv = sub.add_parser("convert", help="convert a trained run to N:M or transposable N:M sparsity, as a new run")
    cv.add_argument("--run-dir", required=True, help="the trained run (only read)")
    cv.add_argument("--structure", required=True, choices=("nm", "nm_transposable"),
                    help="nm: N:M per output neuron; nm_transposable: also per input neuron (see topology.structure)")
    cv.add_argument("--nm", required=True, metavar="N:M", help="e.g. 2:4")
    cv.add_argument("--out", required=True, help="new run dir to create (never overwritten)")
    cv.add_argument("--method", default="greedy", choices=("greedy", "exact"),
                    help="nm_transposable: greedy 2-approximation (default) or exact LP; nm is always exact (top-N)")
    cv.add_argument("--checkpoint", help="a checkpoint name (step-K) or folder instead of the newest valid one")
    cv.add_argument("--finetune-epochs", type=int, default=0, metavar="E",
                    help="then train the converted run E more epochs with the mask fixed")
    cv.add_argument("--quiet", action="store_true", help="no progress output or table")

    ch = sub.add_parser("config-help", help="list every config key with its default and meaning")
    ch.add_argument("--markdown", action="store_true",
                    help="print the configuration reference page (docs/configuration-reference.md) instead")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config-help":
        from hpc_sparse.config import describe

        if args.markdown:
            from hpc_sparse.reference import config_reference_markdown

            print(config_reference_markdown(), end="")
            return 0
        for key, default, text in describe():
            print(f"{key:28s} {default:24s} {text}")
        return 0

    from hpc_sparse.runtime.signals import EXIT_REQUEUE, StopFlag, announce_ready

    stop = StopFlag().install() if args.command == "train" else None
    from hpc_sparse.parallel import comm as pc

    comm = pc.world()
    try:
        if args.command == "train":
            announce_ready(comm)  # every rank takes stop signals now: the job script may forward them
            status = _train(args, comm, stop)
            if status == EXIT_REQUEUE:
                # the stop flag's handlers stay installed: a second signal now cannot turn 75
                # into death by signal; MPI is finalized and the rank leaves with 75 on every
                # launcher (never returns)
                pc.exit_with_status(status)
            return status
        if args.command == "evaluate":
            return _evaluate(args, comm)
        if args.command == "convert":
            return _convert(args, comm)
        from hpc_sparse import run_commands

        if args.command == "clean":
            return run_commands.clean(Path(args.run_dir), args.yes) if comm.Get_rank() == 0 else 0
        return run_commands.info(comm, Path(args.run_dir))
    except UserError as exc:
        if exc.every_rank:  # raised on every rank at once: nobody waits; rank 0 prints the one line
            pc.abort_on_error(pc.self_comm(), exc, EXIT_USER_ERROR, quiet=comm.Get_rank() != 0)
        else:  # aborts every rank (MPI_Abort) when there are several; returns with one
            pc.abort_on_error(comm, exc, EXIT_USER_ERROR)
        # the same exit as 75: a SystemExit(2) would become MPI_Abort(2) under `-m mpi4py`,
        # which srun reports as 137
        pc.exit_with_status(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - any failure on any rank must end the whole job
        if isinstance(exc, SystemExit):
            raise
        if comm.Get_size() > 1:
            import traceback

            traceback.print_exc()
            pc.abort_on_error(comm, exc, 1)
        raise


def _train(args: argparse.Namespace, comm, stop) -> int:  # noqa: ANN001
    from hpc_sparse.config import Config, load_config
    from hpc_sparse.engine import Engine
    from hpc_sparse.engine.failure import agreed
    from hpc_sparse.schedules import schedule_for

    def config() -> Config:
        if args.fresh_if_none_valid and args.resume != "auto":
            raise UserError("--fresh-if-none-valid only applies to --resume auto; fix: add --resume auto or drop it")
        return load_config(args.config, args.overrides)

    cfg = agreed(comm, config)  # a bad config exits 2 on every rank
    engine = Engine(cfg, comm, Path(args.run_dir), quiet=args.quiet, stop=stop)
    return engine.run_schedule(schedule_for(cfg.parallel.mode), args.resume,
                               fresh_if_none_valid=args.fresh_if_none_valid, break_lock=args.break_lock)


def _evaluate(args: argparse.Namespace, comm) -> int:  # noqa: ANN001
    from hpc_sparse.engine import configure_threads, evaluate, load_data
    from hpc_sparse.run_commands import load_run

    cfg, model, manifest, path = load_run(comm, Path(args.run_dir), args.checkpoint)
    configure_threads(cfg, comm)
    data = load_data(cfg, comm)
    loss, acc = evaluate(model, data, comm, cfg.train.eval_batch_size)
    if comm.Get_rank() == 0:
        print(json.dumps({"checkpoint": str(path), "step": manifest["step"], "test_loss": loss,
                          "test_accuracy": acc, "n_test": int(data.x_test.shape[0]),
                          "model_sha256": model.sha256()}))
    return 0


def _convert(args: argparse.Namespace, comm) -> int:  # noqa: ANN001
    from hpc_sparse.convert import ConvertRequest, parse_nm, run_convert
    from hpc_sparse.engine.failure import agreed

    n, m = agreed(comm, lambda: parse_nm(args.nm))
    req = ConvertRequest(Path(args.run_dir), Path(args.out), args.structure, n, m, args.method, args.checkpoint,
                         args.finetune_epochs)
    run_convert(comm, req, quiet=args.quiet)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
