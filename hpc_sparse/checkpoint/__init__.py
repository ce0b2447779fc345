"""Checkpoint I/O: sharded HDF5 + JSON manifest, atomic commit, retention, verified load.

Sees dicts of arrays only, never models, and takes the communicator as an argument (it never
imports mpi4py). Layout and file format: ``format.py``; collective save: ``manager.py``;
verification: ``verify.py`` (the manifest and the shards are read as untrusted input by
``manifest.py`` and ``shard_reader.py``); discovery and setting folders aside:
``discovery.py``; the rank-agreed load of a resuming run: ``agreed.py``.
"""

from hpc_sparse.checkpoint.agreed import Loaded, choose_and_load, load_agreed
from hpc_sparse.checkpoint.discovery import (
    checkpoint_dir,
    committed_checkpoints,
    find_latest_valid,
    folder_bytes,
    list_checkpoints,
    set_aside,
    set_aside_folders,
    set_aside_newer,
    temporary_folders,
)
from hpc_sparse.checkpoint.format import SCHEMA_VERSION, CheckpointEnvironmentError, CheckpointError
from hpc_sparse.checkpoint.manager import save_checkpoint
from hpc_sparse.checkpoint.verify import load_checkpoint, read_manifest, verify_checkpoint

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointEnvironmentError",
    "CheckpointError",
    "Loaded",
    "checkpoint_dir",
    "choose_and_load",
    "committed_checkpoints",
    "find_latest_valid",
    "folder_bytes",
    "list_checkpoints",
    "load_agreed",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "set_aside",
    "set_aside_folders",
    "set_aside_newer",
    "temporary_folders",
    "verify_checkpoint",
]
