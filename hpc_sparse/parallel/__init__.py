"""Everything MPI and nothing else: communicators, replica averaging, agreement checks,
WASAP-SGD's point-to-point messages, aborting a job, finalising with an exit status.

The only package that imports mpi4py. It sees flat numpy arrays, never layers. Stop
signals and the SLURM environment are not MPI: they live in :mod:`hpc_sparse.runtime`.
"""
