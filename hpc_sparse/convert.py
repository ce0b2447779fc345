"""``hpc-sparse convert``: a trained unstructured run -> a new run in N:M or transposable N:M form.

Reads one checkpoint of run ``D`` (the newest valid one, or ``--checkpoint``), converts every
weight matrix except the output one (:mod:`hpc_sparse.topology.nm_convert`), drops the
momentum of every removed connection with it, and writes ``D2`` as a normal run folder
through the project's checkpoint writer (manifest, checksums): ``evaluate``, ``info`` and
``train --resume`` work on it. ``D`` is only read. Optionally fine-tunes ``D2`` for a few
epochs with the mask fixed, on the training engine.

Why the output layer stays unstructured: it is the layer the training side leaves
unconstrained too (``topology.structure`` applies to every layer but the output one, which
SET never evolves either), so the converted run is one the N:M trainer accepts; its width
(the number of classes, e.g. 10) is usually not a multiple of M, and it is small (on
Fashion-MNIST 1000 x 10, dense at epsilon 20: 10,000 of 125,310 weights).

Collective: every rank converts the same replica identically (deterministic), the save is
the usual collective one, and evaluation splits the test set over the ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_sparse.checkpoint import choose_and_load, save_checkpoint
from hpc_sparse.config import Config, config_from_dict, largest_nm_epsilon
from hpc_sparse.convert_report import format_table, write_config_toml
from hpc_sparse.engine import Engine, Progress, configure_threads, evaluate, load_data
from hpc_sparse.engine.failure import agreed
from hpc_sparse.engine.resume import check_meta, checkpoint_model
from hpc_sparse.errors import UserError
from hpc_sparse.log import RunLog
from hpc_sparse.runtime.host import host_info
from hpc_sparse.sparse import SparseMLP
from hpc_sparse.topology.structure import NMStructure, violations
from hpc_sparse.topology.nm_convert import (
    apply_keep,
    nm_keep,
    retained_l1_fraction,
    transposable_exact_keep,
    transposable_greedy_keep,
)

STRUCTURES = ("nm", "nm_transposable")
METHODS = ("greedy", "exact")
REPORT_NAME = "conversion.json"


@dataclass(frozen=True)
class ConvertRequest:
    """What to convert and where to (the command line's options)."""

    run_dir: Path
    out: Path
    structure: str
    n: int
    m: int
    method: str = "greedy"
    checkpoint: str | None = None
    finetune_epochs: int = 0


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; a UserError naming the fix for anything else or N >= M."""
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise UserError(f"--nm {text!r} is not of the form N:M; fix: e.g. --nm 2:4") from None
    if not 1 <= n < m:
        raise UserError(f"--nm {text} needs 1 <= N < M; fix: e.g. --nm 2:4")
    return n, m


def check_request(req: ConvertRequest) -> None:
    """Refuse bad options, a missing source and an existing output before anything is read
    (a UserError naming the fix)."""
    if req.structure not in STRUCTURES:
        raise UserError(f"--structure {req.structure!r} is not one of {', '.join(STRUCTURES)}; fix: pick one")
    if req.method not in METHODS:
        raise UserError(f"--method {req.method!r} is not one of {', '.join(METHODS)}; fix: pick one")
    if req.finetune_epochs < 0:
        raise UserError(f"--finetune-epochs {req.finetune_epochs} is negative; fix: pass 0 or more")
    if not req.run_dir.is_dir():
        raise UserError(f"run dir '{req.run_dir}' does not exist; fix: pass the --run-dir of a training run")
    src, out = req.run_dir.resolve(), req.out.resolve()
    if out == src or src in out.parents:
        raise UserError(f"--out '{req.out}' is the source run dir or inside it, and convert never writes into the "
                        "source; fix: pass a new folder outside it")
    if req.out.exists() or req.out.is_symlink():
        raise UserError(f"--out '{req.out}' already exists and convert never overwrites a run; fix: pass a new "
                        "folder or remove that one")


def _checkpoint_path(comm: Any, req: ConvertRequest) -> str:
    """``--checkpoint`` as a folder (a name under the run's checkpoints/, or a path; rank 0
    decides), or "auto" for the newest valid one."""
    if not req.checkpoint:
        return "auto"
    found = None
    if comm.Get_rank() == 0:
        named = req.run_dir / "checkpoints" / req.checkpoint
        path = named if named.is_dir() else Path(req.checkpoint)
        found = str(path) if path.is_dir() else None
    found = comm.bcast(found, root=0)
    if found is None:
        raise UserError(f"checkpoint '{req.checkpoint}' is neither a folder of '{req.run_dir / 'checkpoints'}' "
                        "nor a path; fix: pass a name listed by `hpc-sparse info --run-dir` (e.g. "
                        "step-000004690) or a checkpoint folder", every_rank=True)
    return found


def _load_source(comm: Any, req: ConvertRequest) -> tuple[Config, SparseMLP, dict[str, Any], Path]:
    """The source checkpoint's config, replica model and manifest (chosen by rank 0, verified
    collectively as a resume's; its user errors agreed by every rank)."""
    loaded = choose_and_load(comm, req.run_dir, _checkpoint_path(comm, req), check=check_meta)
    if loaded.path is None:
        raise UserError(f"no valid checkpoint in '{req.run_dir}'; fix: train with checkpoint.at_end=true "
                        "(the default) or pass --checkpoint", every_rank=True)
    path, state, manifest = loaded.path, loaded.state, loaded.manifest

    def check() -> tuple[Config, SparseMLP]:
        meta = manifest["meta"]
        if not state:
            raise UserError(f"checkpoint {path} holds one model per rank (WASAP-SGD's local phase), not one replica; "
                            "fix: convert the checkpoint written at the end of training")
        cfg = config_from_dict(meta["config"])
        if meta.get("schedule", "sync") != "sync" and not Progress(**meta["progress"]).complete(cfg.train.epochs):
            raise UserError(f"checkpoint {path} was written mid-run by parallel.mode={meta['schedule']!r}; fix: "
                            "convert the checkpoint written at the end of training")
        return cfg, checkpoint_model(cfg, state, None, str(path))

    cfg, model = agreed(comm, check)
    return cfg, model, manifest, path


def converted_config(cfg: Config, req: ConvertRequest) -> Config:
    """The output run's config: the source's, in sync mode (the converted model is a replica),
    with the structure recorded in ``topology.structure/nm_n/nm_m``. ``model.epsilon``
    only sets the initial density, so where it is above what N:M allows it is lowered to the
    largest allowed value (the converted weights are kept as they are)."""
    raw = cfg.to_dict()
    raw["parallel"]["mode"] = "sync"
    raw["topology"].update({"structure": req.structure, "nm_n": req.n, "nm_m": req.m})
    raw["model"]["epsilon"] = min(raw["model"]["epsilon"], largest_nm_epsilon(raw["model"]["layers"], req.n, req.m))
    try:
        return config_from_dict(raw)
    except UserError as exc:
        raise UserError(f"the converted run's config is refused: {exc}") from exc


def convert_layers(model: SparseMLP, req: ConvertRequest) -> list[dict[str, Any]]:
    """Convert every layer but the output one in place (weights and momentum together);
    return one report row per layer (the output layer's row says it was kept)."""
    transposable = req.structure == "nm_transposable"
    if not transposable:
        keep_fn = nm_keep  # top-N per group: already the optimum, whatever --method says
    else:
        keep_fn = transposable_exact_keep if req.method == "exact" else transposable_greedy_keep
    rows = []
    last = len(model.layers) - 1
    for l, layer in enumerate(model.layers):
        w = layer.weight
        row: dict[str, Any] = {"layer": l, "shape": list(w.shape), "nnz_before": int(w.nnz)}
        if l == last:
            row.update(nnz_after=int(w.nnz), retained_l1=1.0, converted=False, seconds=0.0)
            rows.append(row)
            continue
        t0 = time.perf_counter()
        keep = keep_fn(w, req.n, req.m)
        new_w = apply_keep(w, keep)
        bad = violations(new_w, NMStructure(req.n, req.m, transposable))
        if bad:
            raise RuntimeError(f"layer {l}: the converted weight still has {bad} groups over {req.n}:{req.m}; "
                               "this is a bug")
        retained = retained_l1_fraction(w, keep)
        layer.set_weight(new_w, layer.w_velocity[keep])  # momentum stays aligned with the kept weights
        row.update(nnz_after=int(new_w.nnz), retained_l1=retained, converted=True,
                   seconds=time.perf_counter() - t0)
        rows.append(row)
    model.topology_changed()
    return rows


def _meta(cfg2: Config, meta: dict[str, Any], model: SparseMLP, conversion: dict[str, Any],
          record: dict[str, Any]) -> dict[str, Any]:
    out = dict(meta)
    out.update(config=cfg2.to_dict(), history=list(meta["history"]) + [record], widths=list(model.widths),
               schedule="sync", schedule_state={}, host=host_info(), model_sha256=model.sha256(),
               conversion=conversion)
    out.pop("rank_model_sha256", None)
    return out


def run_convert(comm: Any, req: ConvertRequest, quiet: bool = False) -> dict[str, Any]:
    """Convert, save ``req.out``, evaluate before/after, optionally fine-tune; return the
    report (also written to ``req.out/conversion.json``). Collective over ``comm``."""
    agreed(comm, lambda: check_request(req))
    rank = comm.Get_rank()
    log = RunLog(req.out, rank, quiet)
    cfg, model, manifest, src_path = _load_source(comm, req)
    cfg2 = agreed(comm, lambda: converted_config(cfg, req))
    configure_threads(cfg, comm)
    data = load_data(cfg, comm)
    before_loss, before_acc = evaluate(model, data, comm, cfg.train.eval_batch_size)
    src_sha = model.sha256()
    log.info(f"converting {src_path} ({req.structure} {req.n}:{req.m}, method {req.method}); "
             f"test accuracy before {before_acc:.4f}")
    layers = convert_layers(model, req)
    after_loss, after_acc = evaluate(model, data, comm, cfg.train.eval_batch_size)
    meta = manifest["meta"]
    step = int(manifest["step"])
    method = "top-n" if req.structure == "nm" else req.method
    conversion = {
        "source": {"run_dir": str(req.run_dir.resolve()), "checkpoint": str(src_path.resolve()), "step": step,
                   "model_sha256": src_sha},
        "structure": req.structure, "nm_n": req.n, "nm_m": req.m, "method": method,
        "output_layer": "kept unstructured (the training side constrains every layer but the output one)",
        "layers": layers,
        "before": {"test_loss": before_loss, "test_accuracy": before_acc, "nnz": int(sum(r["nnz_before"] for r in layers))},
        "after": {"test_loss": after_loss, "test_accuracy": after_acc, "nnz": model.nnz,
                  "model_sha256": model.sha256()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    last = dict(meta["history"][-1]) if meta["history"] else {}
    record = {**{k: last.get(k) for k in ("epoch", "train_loss", "train_accuracy")}, "step": meta["progress"]["step"],
              "phase": f"converted to {req.structure} {req.n}:{req.m} ({method})", "test_loss": after_loss,
              "test_accuracy": after_acc, "nnz": model.nnz, "neurons": model.hidden_neurons,
              "widths": list(model.widths), "ranks": comm.Get_size()}
    # rank 0's report (its timings, date and host) is the one every rank saves and writes
    conversion = comm.bcast(conversion if rank == 0 else None, root=0)
    new_meta = comm.bcast(_meta(cfg2, meta, model, conversion, record) if rank == 0 else None, root=0)
    path = save_checkpoint(comm, req.out, step, model.state_dict(), new_meta, keep=cfg2.checkpoint.keep)
    log.info(f"checkpoint {path} written")
    if rank == 0:
        (req.out / "config.json").write_text(cfg2.to_json() + "\n")
        write_config_toml(req.out / "config.toml", cfg2.to_dict())
    log.write_metrics(list(meta["history"]) + [record])
    log.write_json("summary.json", {**record, "model_sha256": model.sha256(), "hidden_neurons": model.hidden_neurons,
                                    "steps": meta["progress"]["step"], "epochs_completed": meta["progress"]["epoch"],
                                    "mode": "sync", "converted_from": conversion["source"]})
    log.write_json(REPORT_NAME, conversion)
    if req.finetune_epochs > 0:
        conversion["finetune"] = finetune(comm, req, cfg2, int(meta["progress"]["epoch"]), quiet)
        log.write_json(REPORT_NAME, conversion)
    if rank == 0 and not quiet:
        print(format_table(conversion))
    return conversion


def finetune(comm: Any, req: ConvertRequest, cfg2: Config, epochs_done: int, quiet: bool) -> dict[str, Any]:
    """Continue training ``req.out`` for ``req.finetune_epochs`` epochs on the engine (resume
    from the converted checkpoint; a checkpoint taken mid-epoch first finishes that epoch),
    with topology evolution and importance pruning off, so the converted mask stays fixed
    (prune-and-fine-tune; it also keeps this command independent of N:M-aware evolution).
    ``config.toml`` is rewritten first, so a fine-tune stopped by a signal can be continued
    with it. Returns the fine-tune's figures; the constraint is checked again at the end."""
    raw = cfg2.to_dict()
    raw["train"]["epochs"] = epochs_done + req.finetune_epochs
    raw["topology"]["evolve_every"] = 0
    raw["importance"]["enabled"] = False
    cfg_ft = config_from_dict(raw)
    from hpc_sparse.schedules import schedule_for  # the schedules import the engine: keep it lazy

    if comm.Get_rank() == 0:
        write_config_toml(req.out / "config.toml", cfg_ft.to_dict())
    engine = Engine(cfg_ft, comm, req.out, quiet=quiet)
    status = engine.run_schedule(schedule_for("sync"), "auto")
    if status != 0:
        raise UserError(f"the fine-tune of {req.out} stopped early (status {status}) after a checkpoint; fix: "
                        f"continue it with hpc-sparse train --config {req.out / 'config.toml'} --run-dir {req.out} "
                        f"--resume auto", every_rank=True)
    transposable = req.structure == "nm_transposable"
    s = NMStructure(req.n, req.m, transposable)
    bad = [violations(layer.weight, s) for layer in engine.model.layers[:-1]]
    if any(bad):
        raise RuntimeError(f"the fine-tuned model violates {req.n}:{req.m} ({bad}); this is a bug")
    last = engine.history[-1]
    return {"epochs": req.finetune_epochs, "evolve_every": 0, "importance_enabled": False,
            "test_loss": last["test_loss"], "test_accuracy": last["test_accuracy"], "nnz": engine.model.nnz,
            "model_sha256": engine.model.sha256(), "step": engine.progress.step}

