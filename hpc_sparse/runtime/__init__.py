"""The process's environment outside MPI: POSIX stop signals, SLURM variables, the host CPU.

Nothing here imports mpi4py (that is :mod:`hpc_sparse.parallel`'s job).
"""
