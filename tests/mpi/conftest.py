"""Fixtures shared by the MPI test modules; they hold at any communicator size."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from mpi4py import MPI


@pytest.fixture(scope="module")
def comm():
    dup = MPI.COMM_WORLD.Dup()  # isolate our collectives from anything else on COMM_WORLD
    yield dup
    dup.Free()


@pytest.fixture
def run_dir(comm):
    """A folder shared by all ranks (rank 0 creates it, everyone gets its name)."""
    path = tempfile.mkdtemp(prefix="hpc_sparse_mpi_") if comm.rank == 0 else None
    path = Path(comm.bcast(path, root=0))
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
