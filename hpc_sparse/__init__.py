"""hpc_sparse: truly sparse neural network training on CSR matrices, data-parallel with MPI."""

__version__ = "0.1.0"
