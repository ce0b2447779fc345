"""The SLURM environment of this process, read once into a frozen dataclass (no MPI here).

This is the one place that reads ``SLURM_*`` variables. Everything else asks for a
:class:`SlurmEnv` (``None`` outside SLURM), so tests pass an explicit ``environ``
dict instead of patching ``os.environ``.

Variables used (all set by ``sbatch``/``srun``). Under ``mpiexec`` inside a batch job,
PyPI MPICH's hydra starts one proxy per node with ``srun -n 1``, so every rank sees
that step's values (``SLURM_PROCID=0``, ``SLURM_NTASKS=1``): take rank and size from
MPI, never from here.

==========================  =====================================================
``SLURM_JOB_ID``            job id; stays the same when the job is requeued
``SLURM_ARRAY_JOB_ID``      job array's id (``None`` outside an array)
``SLURM_ARRAY_TASK_ID``     index of this task in the array
``SLURM_RESTART_COUNT``     how many times the job was requeued (absent: 0)
``SLURM_PROCID``            global task rank under ``srun``
``SLURM_NTASKS``            number of tasks (``SLURM_NPROCS`` on old versions)
``SLURM_LOCALID``           task rank on this node
``SLURMD_NODENAME``         this node's name (``SLURM_NODENAME`` as fallback)
``SLURM_CPUS_PER_TASK``     ``--cpus-per-task`` (absent when not requested)
``SLURM_CPUS_ON_NODE``      CPUs allocated to the job on this node
``SLURM_NTASKS_PER_NODE``   ``--ntasks-per-node``; else derived from
                            ``SLURM_TASKS_PER_NODE`` (e.g. ``"2(x3),1"``)
==========================  =====================================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SlurmEnv", "read_slurm_env", "describe"]


@dataclass(frozen=True)
class SlurmEnv:
    """What SLURM told this process. Integers are ``None`` where SLURM did not say."""

    job_id: str
    """``SLURM_JOB_ID``: the job id (a string: ids are opaque and may be large)."""
    array_job_id: str | None = None
    """``SLURM_ARRAY_JOB_ID``: the array's id, ``None`` outside a job array."""
    array_task_id: int | None = None
    """``SLURM_ARRAY_TASK_ID``: this task's index in the array."""
    restart_count: int = 0
    """``SLURM_RESTART_COUNT``: times this job was requeued; 0 on the first start."""
    procid: int | None = None
    """``SLURM_PROCID``: global task rank (meaningful under ``srun``)."""
    ntasks: int | None = None
    """``SLURM_NTASKS``: number of tasks of the job or step."""
    localid: int | None = None
    """``SLURM_LOCALID``: task rank on this node."""
    nodename: str | None = None
    """``SLURMD_NODENAME``: name of the node this process runs on."""
    cpus_per_task: int | None = None
    """``SLURM_CPUS_PER_TASK``: CPUs per task (only set when requested)."""
    cpus_on_node: int | None = None
    """``SLURM_CPUS_ON_NODE``: CPUs allocated to the job on this node."""
    ntasks_per_node: int | None = None
    """Tasks on this node: ``SLURM_NTASKS_PER_NODE`` or the first count of
    ``SLURM_TASKS_PER_NODE``."""

    @property
    def in_array(self) -> bool:
        """True for a task of a job array."""
        return self.array_job_id is not None

    @property
    def requeued(self) -> bool:
        """True when this start is a restart of a requeued job."""
        return self.restart_count > 0


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    """First of ``names`` that is set and parses as an integer, else ``None``."""
    for name in names:
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        match = re.match(r"^(\d+)", raw)  # "4(x2)" style values: take the leading count
        if match:
            return int(match.group(1))
    return None


def _str(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        raw = environ.get(name, "").strip()
        if raw:
            return raw
    return None


def read_slurm_env(environ: Mapping[str, str] | None = None) -> SlurmEnv | None:
    """Read the SLURM variables of ``environ`` (default ``os.environ``).

    Parameters
    ----------
    environ : mapping of str to str, optional
        The environment to read; tests pass a plain dict.

    Returns
    -------
    SlurmEnv or None
        ``None`` when not running under SLURM (no ``SLURM_JOB_ID``, nor the older
        ``SLURM_JOBID``).
    """
    env = os.environ if environ is None else environ
    job_id = _str(env, "SLURM_JOB_ID", "SLURM_JOBID")
    if job_id is None:
        return None
    return SlurmEnv(
        job_id=job_id,
        array_job_id=_str(env, "SLURM_ARRAY_JOB_ID"),
        array_task_id=_int(env, "SLURM_ARRAY_TASK_ID"),
        restart_count=_int(env, "SLURM_RESTART_COUNT") or 0,
        procid=_int(env, "SLURM_PROCID"),
        ntasks=_int(env, "SLURM_NTASKS", "SLURM_NPROCS"),
        localid=_int(env, "SLURM_LOCALID"),
        nodename=_str(env, "SLURMD_NODENAME", "SLURM_NODENAME"),
        cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK"),
        cpus_on_node=_int(env, "SLURM_CPUS_ON_NODE"),
        ntasks_per_node=_int(env, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
    )


def describe(env: SlurmEnv | None) -> str:
    """One line for the log, e.g. ``slurm job 42 (restart 1) on node1: 2 tasks, 1 cpu/task``."""
    if env is None:
        return "not under SLURM"
    job = env.job_id
    if env.in_array:
        job = f"{env.array_job_id}_{env.array_task_id} (id {env.job_id})"
    parts = [f"slurm job {job}"]
    if env.restart_count:
        parts.append(f"(restart {env.restart_count})")
    if env.nodename:
        parts.append(f"on {env.nodename}")
    details = []
    if env.ntasks is not None:
        details.append(f"{env.ntasks} task{'s' if env.ntasks != 1 else ''}")
    if env.ntasks_per_node is not None:
        details.append(f"{env.ntasks_per_node}/node")
    if env.cpus_per_task is not None:
        details.append(f"{env.cpus_per_task} cpu/task")
    if env.cpus_on_node is not None:
        details.append(f"{env.cpus_on_node} cpus on node")
    if env.procid is not None:
        details.append(f"procid {env.procid}")
    line = " ".join(parts)
    return f"{line}: {', '.join(details)}" if details else line
