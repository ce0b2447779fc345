"""Which ``mpiexec`` launches this interpreter's MPI: for the tools and tests that start jobs."""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

__all__ = ["find_mpiexec"]


def find_mpiexec() -> str:
    """The ``mpiexec`` that belongs to this Python, else the one on PATH.

    PyPI's mpich puts ``mpiexec`` beside the interpreter (or in the scripts folder of its
    environment); ``python -m pip`` does not refresh pyenv's shims, so PATH alone is not enough
    on a fresh machine. Raises RuntimeError naming the fix when there is none."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / "mpiexec").exists():
            return str(folder / "mpiexec")
    found = shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpiexec beside the interpreter or on PATH; fix: pip install mpich")
    return found
