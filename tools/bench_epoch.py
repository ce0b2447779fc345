"""One epoch of the paper's Fashion-MNIST setup through the real Trainer, on ONE thread.

784-1000-1000-1000-10, epsilon 20, All-ReLU alpha 0.6, dropout 0.3, batch 128, lr 0.01,
momentum 0.9, SET zeta 0.3, on the full 60 000-sample training set: training + SET
evolution + evaluation on the 10 000 test samples, timed by the Trainer itself (its
epoch record). The run has two epochs cut short one step into the second (SET never
runs after the last epoch), so the first epoch is a complete, ordinary one.

``evolve_over_step`` is the SET step's cost in training steps (target <= 5).
The peers' epoch times in the output (SET's reference implementation, 18.3 s/epoch; the
All-ReLU paper's code, ~20 s/epoch) were measured separately, not by this tool: they are
constants, under the key ``peers_measured_separately_not_by_this_tool``.

    python tools/bench_epoch.py [--threads 1] [--data-dir /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=FMNIST)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    from hpc_sparse.config import load_config
    from hpc_sparse.data import steps_per_epoch
    from hpc_sparse.parallel import comm as pc
    from hpc_sparse.train import Trainer

    have_data = Path(args.data_dir, "train-images-idx3-ubyte.gz").exists() or \
        Path(args.data_dir, "train-images-idx3-ubyte").exists()
    data_sets = (["data.name=fashion-mnist", f"data.path={args.data_dir}"] if have_data else
                 ["data.name=synthetic", "data.n_train=60000", "data.n_test=10000", "data.n_features=784",
                  "data.n_classes=10", "data.n_informative=20"])
    spe = steps_per_epoch(60000, 1, 128)
    sets = data_sets + [
        "model.layers=[784,1000,1000,1000,10]", "model.epsilon=20", "model.activation=allrelu", "model.alpha=0.6",
        "model.dropout=0.3", "model.init=he_uniform",
        "train.epochs=2", "train.batch_size=128", "train.lr=0.01", "train.momentum=0.9",
        f"train.threads={args.threads}", f"train.max_steps={spe + 1}", "train.eval_batch_size=1000",
        "topology.growth=random", "topology.zeta=0.3", "topology.evolve_every=1",
        "checkpoint.at_end=false", "checkpoint.every_seconds=0", "checkpoint.every_steps=0",
        f"seed={args.seed}",
    ]
    cfg = load_config(None, sets)
    comm = pc.self_comm()
    with tempfile.TemporaryDirectory() as tmp:
        # compile the kernels first (numba cache), so JIT time is not counted
        warm = load_config(None, ["data.name=synthetic", "data.n_train=256", "data.n_test=256",
                                  "data.n_features=784", "data.n_classes=10", "model.layers=[784,50,50,50,10]",
                                  "train.epochs=2", "train.batch_size=128", "checkpoint.at_end=false",
                                  f"train.threads={args.threads}"])
        Trainer(warm, comm, Path(tmp) / "warm", quiet=True).run()
        t0 = time.perf_counter()
        trainer = Trainer(cfg, comm, Path(tmp) / "run", quiet=True)
        trainer.run()
        wall = time.perf_counter() - t0
        rec = trainer.history[0]
    steps = rec["step"]
    step_s = rec["train_seconds"] / steps
    eval_s = rec["epoch_seconds"] - rec["train_seconds"] - rec["evolve_seconds"]
    import numba

    bc.emit({
        "bench": "epoch", "data": "fashion-mnist" if have_data else
        "synthetic stand-in (60000x784, 10 classes): Fashion-MNIST not found at " + args.data_dir,
        "widths": [784, 1000, 1000, 1000, 10], "nnz": rec["nnz"], "threads": numba.get_num_threads(),
        "epoch_seconds": rec["epoch_seconds"], "train_seconds": rec["train_seconds"], "eval_seconds": eval_s,
        "evolve_seconds": rec["evolve_seconds"], "steps": steps, "ms_per_step": 1e3 * step_s,
        "evolve_over_step": rec["evolve_seconds"] / step_s,
        "test_accuracy": rec["test_accuracy"], "train_loss": rec["train_loss"],
        "peers_measured_separately_not_by_this_tool": {"set_reference_epoch_seconds": 18.3,
                                                       "paper_code_epoch_seconds": 20},
        "target_epoch_seconds": 12, "target_evolve_over_step": 5,
        "run_wall_seconds": wall,
    })


if __name__ == "__main__":
    main()
