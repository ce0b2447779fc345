"""Everything MPI: communicators, replica averaging, topology agreement, SLURM and signals.

The only package that imports mpi4py. It sees flat numpy arrays, never layers.
"""
