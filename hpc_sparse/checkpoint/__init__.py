"""Checkpoint I/O: sharded HDF5 + JSON manifest, atomic commit, retention, verified load.

Sees dicts of arrays only, never models, and takes the communicator as an argument (it never
imports mpi4py). Layout and file format: ``format.py``; collective save and discovery: ``manager.py``.
"""

from hpc_sparse.checkpoint.format import SCHEMA_VERSION, CheckpointError
from hpc_sparse.checkpoint.manager import (
    checkpoint_dir,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointError",
    "checkpoint_dir",
    "find_latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
