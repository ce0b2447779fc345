"""Train a truly sparse network on numpy arrays of your own, from Python.

    python docs/examples/train_numpy.py runs/numpy-example
    mpiexec -n 2 python -m mpi4py docs/examples/train_numpy.py runs/numpy-example

The trainer reads its data from files that the run's config names, so that a resume, a
requeued SLURM job, ``hpc-sparse evaluate`` and ``hpc-sparse convert`` find the same data
later: write the arrays to ``.npz`` (or ``.h5``) files with datasets ``X`` and ``y``.
"""

import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpc_sparse.config import config_from_dict
from hpc_sparse.train import Trainer, evaluate, load_data, load_run

comm = MPI.COMM_WORLD
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/numpy-example")

# 1. Your data: X (n_samples, n_features) float, y (n_samples,) integer labels 0 .. C-1.
#    Here three noisy clusters in 20 dimensions; rank 0 writes the files, every rank reads them.
rng = np.random.default_rng(0)
centres = rng.normal(size=(3, 20))
y = rng.integers(0, 3, size=1200)
X = centres[y] + 1.5 * rng.normal(size=(1200, 20))
if comm.Get_rank() == 0:
    (out / "data").mkdir(parents=True, exist_ok=True)
    np.savez(out / "data" / "train.npz", X=X[:1000], y=y[:1000])
    np.savez(out / "data" / "test.npz", X=X[1000:], y=y[1000:])
comm.Barrier()

# 2. The config: one dict per TOML table; keys left out keep their defaults
#    (docs: Configuration reference). It is validated like a TOML file.
cfg = config_from_dict({
    "data": {"name": "file", "path": str(out / "data" / "train.npz"),
             "test_path": str(out / "data" / "test.npz")},
    "model": {"layers": [20, 256, 256, 3], "epsilon": 10.0},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
})

# 3. Train: SET evolution after each epoch, averaging across ranks under mpiexec, a checkpoint
#    at the end. run() returns 0 when finished (75 if a stop signal ended it after a checkpoint).
status = Trainer(cfg, comm, out / "run", quiet=True).run()

# 4. Load the trained model back and use it. The run standardised the features with the
#    training set's mean and std; load_data(cfg) gives the data exactly as the run saw it.
run = load_run(out / "run")
data = load_data(run.cfg)
loss, accuracy = evaluate(run.model, data, comm, batch_size=500)
predicted = run.model.predict_logits(data.x_test).argmax(axis=1)  # (n_test,) class labels
if comm.Get_rank() == 0:
    print(f"status {status}; widths {list(run.model.widths)}, nnz {run.model.nnz}; "
          f"test accuracy {accuracy:.3f}, first predictions {predicted[:5].tolist()}")
