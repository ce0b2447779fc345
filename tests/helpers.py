"""Small builders shared by the tests: random sparse layers, tiny networks and dense references."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from hpc_sparse.sparse import SparseLinear, SparseMLP, hidden_activations
from hpc_sparse.topology import erdos_renyi


def random_csr(rng: np.random.Generator, n_in: int, n_out: int, density: float, idx=np.int32) -> sp.csr_matrix:
    w = sp.random(n_in, n_out, density=density, format="csr", random_state=rng, dtype=np.float32)
    w.data = rng.uniform(-1, 1, w.nnz).astype(np.float32)
    w.indices = w.indices.astype(idx)
    w.indptr = w.indptr.astype(idx)
    return w


def tiny_mlp(widths=(12, 9, 7, 4), activation="allrelu", alpha=0.6, dropout=0.0, epsilon=3.0, seed=0) -> SparseMLP:
    rng = np.random.default_rng(seed)
    layers = [SparseLinear(erdos_renyi(rng, a, b, epsilon, "he_uniform"),
                           rng.uniform(-0.2, 0.2, b).astype(np.float32))
              for a, b in zip(widths[:-1], widths[1:])]
    return SparseMLP(layers, hidden_activations(activation, alpha, len(widths) - 2), dropout)


def dense_forward(model: SparseMLP, x: np.ndarray, weights=None, biases=None) -> np.ndarray:
    """float64 numpy reference of the network's logits (B, C), without dropout."""
    weights = weights or [l.weight.toarray().astype(np.float64) for l in model.layers]
    biases = biases or [l.bias.astype(np.float64) for l in model.layers]
    a = x.astype(np.float64)
    for l, (w, b) in enumerate(zip(weights, biases)):
        z = a @ w + b
        a = model.activations[l](z) if l < len(weights) - 1 else z
    return a


def dense_loss(model: SparseMLP, x: np.ndarray, y: np.ndarray, weights=None, biases=None) -> float:
    z = dense_forward(model, x, weights, biases)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def dropout_keep_reference(key: np.uint64, shape: tuple[int, int], p: float) -> np.ndarray:
    """numpy reference of the kernels' dropout mask (uint8): :func:`activations.dropout_keep_mask`."""
    from hpc_sparse.sparse.activations import dropout_keep_mask

    return dropout_keep_mask(key, shape, p).astype(np.uint8)


class StopWhen:
    """A stop flag that reads as requested on the ranks in ``ranks`` once ``when(progress)``
    holds for the trainer ``ref[0]``, as if SIGUSR1 had arrived then; its handlers are real
    (install/restore)."""

    def __init__(self, ref: list, ranks: set[int], when) -> None:
        from hpc_sparse.runtime.signals import StopFlag

        self.flag, self.ref, self.ranks, self.when = StopFlag(), ref, ranks, when

    def __getattr__(self, name):
        return getattr(self.flag, name)

    @property
    def requested(self) -> bool:
        t = self.ref[0]
        return t.rank in self.ranks and self.when(t.progress)


def run_with_stop(comm, cfg, run_dir, ranks: set[int], when) -> tuple[list[int], dict, object]:
    """Train ``cfg`` in ``run_dir`` with a :class:`StopWhen` flag; return every rank's status,
    ``summary.json`` ({} if none was written) and the trainer. Collective."""
    import json

    from hpc_sparse.train import Trainer

    ref: list = []
    t = Trainer(cfg, comm, run_dir, quiet=True, stop=StopWhen(ref, ranks, when))
    ref.append(t)
    statuses = comm.allgather(t.run())
    comm.Barrier()
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    return statuses, summary, t
