"""The model without the trainer: one SGD step at a time on a SparseMLP, SET after each epoch.

    python docs/examples/sparse_mlp_steps.py

No MPI, no run folder, no checkpoints: the model math only (hpc_sparse.sparse and
hpc_sparse.topology never see a communicator). Every weight matrix stays a scipy CSR matrix.
"""

import numpy as np

from hpc_sparse.config import config_from_dict
from hpc_sparse.model_builder import build_model
from hpc_sparse.sparse import SGD, dropout_key
from hpc_sparse.topology import evolve_model

rng = np.random.default_rng(0)
centres = rng.normal(size=(3, 20))
y = rng.integers(0, 3, size=1200).astype(np.int32)
X = (centres[y] + 1.5 * rng.normal(size=(1200, 20))).astype(np.float32)  # float32, (samples, features)
x_train, y_train, x_test, y_test = X[:1000], y[:1000], X[1000:], y[1000:]

cfg = config_from_dict({"model": {"layers": [20, 256, 256, 3], "epsilon": 10.0, "dropout": 0.2}})
model = build_model(cfg)  # Erdős–Rényi CSR layers from cfg.seed, All-ReLU, dropout
print(f"widths {list(model.widths)}, nnz {model.nnz}, layer 0 is a {type(model.layers[0].weight).__name__}")
sgd = SGD(lr=0.05, momentum=0.9)
batch, step = 32, 0
for epoch in range(3):
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(x_train))
    for lo in range(0, len(order) - batch + 1, batch):
        idx = order[lo:lo + batch]
        result = model.train_step(x_train[idx], y_train[idx], sgd, dropout_key(cfg.seed, step, 0, 0))
        step += 1
    test = model.evaluate(x_test, y_test)  # summed loss and hits, no dropout
    print(f"epoch {epoch + 1}: last batch loss {result.loss_sum / result.count:.3f}, "
          f"test accuracy {test.correct / test.count:.3f}")
    if epoch < 2:  # SET: prune the weakest 30% of each hidden matrix's connections, regrow as many
        replaced = evolve_model(model, zeta=0.3, growth="random", seed=cfg.seed, evolution=epoch,
                                init=cfg.model.init)
        print(f"  evolved: {replaced} connections replaced per hidden matrix; nnz {model.nnz}")
