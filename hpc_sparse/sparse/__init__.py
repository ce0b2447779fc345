"""Model math: CSR layers, activations, loss and SGD. Never sees a communicator."""

from hpc_sparse.sparse.activations import Activation, dropout_key, hidden_activations
from hpc_sparse.sparse.linear import SparseLinear, as_canonical_csr
from hpc_sparse.sparse.mlp import SparseMLP, StepResult
from hpc_sparse.sparse.optim import SGD

__all__ = ["Activation", "SGD", "SparseLinear", "SparseMLP", "StepResult", "as_canonical_csr",
           "dropout_key", "hidden_activations"]
