"""Checkpoint I/O: sharded HDF5 + JSON manifest, atomic commit, retention, verified load.

Sees dicts of arrays only, never models, and takes the communicator as an argument (it never
imports mpi4py). Layout and file format: ``format.py``; collective save: ``manager.py``;
verification: ``verify.py``; discovery and setting folders aside: ``discovery.py``; the
rank-agreed load of a resuming run: ``agreed.py``.
"""

from hpc_sparse.checkpoint.agreed import Loaded, choose_and_load, load_agreed
from hpc_sparse.checkpoint.discovery import (
    checkpoint_dir,
    committed_checkpoints,
    find_latest_valid,
    list_checkpoints,
    set_aside,
    set_aside_newer,
)
from hpc_sparse.checkpoint.format import SCHEMA_VERSION, CheckpointError
from hpc_sparse.checkpoint.manager import save_checkpoint
from hpc_sparse.checkpoint.verify import load_checkpoint, read_manifest, verify_checkpoint

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointError",
    "Loaded",
    "checkpoint_dir",
    "choose_and_load",
    "committed_checkpoints",
    "find_latest_valid",
    "list_checkpoints",
    "load_agreed",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "set_aside",
    "set_aside_newer",
    "verify_checkpoint",
]
