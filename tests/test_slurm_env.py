"""Unit tests of hpc_sparse.runtime.slurm (explicit environ dicts), .signals and .host."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

from hpc_sparse.runtime.signals import EXIT_REQUEUE, StopFlag
from hpc_sparse.runtime.slurm import SlurmEnv, describe, read_slurm_env

# What `sbatch --ntasks=2 --cpus-per-task=1` showed inside the batch script on the
# project's single-node slurm-wlm 22.05 (requeued once).
BATCH_ENV = {
    "SLURM_JOB_ID": "17",
    "SLURM_JOBID": "17",
    "SLURM_RESTART_COUNT": "1",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_NPROCS": "2",
    "SLURM_LOCALID": "0",
    "SLURMD_NODENAME": "vm",
    "SLURM_CPUS_PER_TASK": "1",
    "SLURM_CPUS_ON_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2",
    "SLURM_JOB_NAME": "hpc-sparse",
}


def test_not_under_slurm():
    assert read_slurm_env({}) is None
    assert read_slurm_env({"PATH": "/usr/bin", "SLURM_CONF": "/etc/slurm/slurm.conf"}) is None
    assert describe(None) == "not under SLURM"


def test_batch_environment():
    env = read_slurm_env(BATCH_ENV)
    assert env == SlurmEnv(
        job_id="17", array_job_id=None, array_task_id=None, restart_count=1, procid=0,
        ntasks=2, localid=0, nodename="vm", cpus_per_task=1, cpus_on_node=2,
        ntasks_per_node=2,
    )
    assert env.requeued and not env.in_array


def test_minimal_environment_defaults():
    env = read_slurm_env({"SLURM_JOB_ID": "5"})
    assert env is not None
    assert env.job_id == "5"
    assert env.restart_count == 0 and not env.requeued
    assert env.procid is None and env.ntasks is None and env.cpus_per_task is None
    assert env.nodename is None and env.ntasks_per_node is None
    assert describe(env) == "slurm job 5"


def test_old_variable_names_are_fallbacks():
    env = read_slurm_env({"SLURM_JOBID": "9", "SLURM_NPROCS": "3", "SLURM_NODENAME": "n1"})
    assert env.job_id == "9" and env.ntasks == 3 and env.nodename == "n1"


def test_array_task():
    env = read_slurm_env({**BATCH_ENV, "SLURM_JOB_ID": "31", "SLURM_ARRAY_JOB_ID": "30",
                          "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "0"})
    assert env.in_array and env.array_job_id == "30" and env.array_task_id == 1
    assert env.job_id == "31" and env.restart_count == 0
    assert describe(env).startswith("slurm job 30_1 (id 31) on vm")


def test_tasks_per_node_compressed_form():
    # SLURM_TASKS_PER_NODE is e.g. "2(x3),1"; the explicit --ntasks-per-node wins
    assert read_slurm_env({"SLURM_JOB_ID": "1", "SLURM_TASKS_PER_NODE": "2(x3),1"}).ntasks_per_node == 2
    env = read_slurm_env({"SLURM_JOB_ID": "1", "SLURM_TASKS_PER_NODE": "2(x3),1",
                          "SLURM_NTASKS_PER_NODE": "4"})
    assert env.ntasks_per_node == 4


def test_blank_and_garbage_values_are_absent():
    env = read_slurm_env({"SLURM_JOB_ID": "3", "SLURM_RESTART_COUNT": "", "SLURM_NTASKS": "x",
                          "SLURM_CPUS_PER_TASK": " "})
    assert env.restart_count == 0 and env.ntasks is None and env.cpus_per_task is None


def test_frozen_and_describe_line():
    env = read_slurm_env(BATCH_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.restart_count = 2  # type: ignore[misc]
    line = describe(env)
    assert "\n" not in line
    assert line == ("slurm job 17 (restart 1) on vm: 2 tasks, 2/node, 1 cpu/task, "
                    "2 cpus on node, procid 0")


def test_reads_os_environ_by_default(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM"):
            monkeypatch.delenv(key)
    assert read_slurm_env() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    env = read_slurm_env()
    assert env.job_id == "77" and env.restart_count == 2


# --- signals -----------------------------------------------------------------------


def test_exit_requeue_value_is_the_one_the_job_scripts_requeue_on():
    """The trainer's stop status and the status jobs/_run_training.sh requeues on are one value,
    and the CLI's and the docs' exit-status tables name it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shell = (root / "jobs" / "_run_training.sh").read_text()
    assert f"HS_EXIT_REQUEUE={EXIT_REQUEUE}\n" in shell
    assert f"| {EXIT_REQUEUE} | stopped by SIGUSR1/SIGTERM" in (root / "docs" / "running.md").read_text()
    import hpc_sparse.cli as cli

    assert f"{EXIT_REQUEUE} stopped by a signal" in cli.__doc__


def test_usr1_sets_flag_and_restore_puts_previous_handler_back():
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        stop = StopFlag().install()
        assert not stop.requested and stop.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
        assert stop.signal_name == "SIGUSR1"
        assert seen == []  # our handler replaced the previous one
        stop.restore()
        assert signal.getsignal(signal.SIGUSR1) is previous
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_first_signal_name_is_kept_and_clear():
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGTERM"
        stop.clear()
        assert not stop.requested
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_context_manager_restores_default_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with StopFlag() as stop:
        assert signal.getsignal(signal.SIGUSR1) is not before[signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
    for sig, handler in before.items():
        assert signal.getsignal(sig) is handler


def test_custom_signals_and_restore_is_idempotent():
    stop = StopFlag().install(signals=(signal.SIGUSR2,))
    try:
        assert signal.getsignal(signal.SIGUSR1) is not stop._handler
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.signal_name == "SIGUSR2"
    finally:
        stop.restore()
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


_EXIT_CODE = ("from hpc_sparse.parallel.comm import exit_with_status; print('x', end=''); "
              "exit_with_status(75)")


@pytest.mark.parametrize("prefix", [[], ["-m", "mpi4py"]], ids=["plain", "python-m-mpi4py"])
def test_exit_requeue_status_and_flush(prefix):
    """exit_with_status(75) leaves with 75 and flushed output, also under ``python -m mpi4py``
    (where ``sys.exit(75)`` would become ``MPI_Abort``)."""
    import subprocess
    import sys
    from pathlib import Path

    if prefix:
        pytest.importorskip("mpi4py")
    code = _EXIT_CODE if not prefix else "from mpi4py import MPI; MPI.COMM_WORLD.Barrier(); " + _EXIT_CODE
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, *prefix, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    assert proc.stdout == "x"
    assert "Abort" not in proc.stderr


# --- host CPU ------------------------------------------------------------------------


def test_cpu_model_and_host_comparison(tmp_path):
    from hpc_sparse.runtime.host import compare_hosts, cpu_model, host_info

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
    here = host_info()
    assert set(here) == {"cpu_model", "machine", "numba_cpu_name", "numba_cpu_features"} and all(here.values())
    same, line = compare_hosts(dict(here), here)
    assert same and "bit-identical" in line
    other, line = compare_hosts(dict(here, numba_cpu_features="0123456789abcdef"), here)
    assert not other and "may differ" in line and "0123456789abcdef" in line
    unknown, line = compare_hosts(None, here)
    assert not unknown and "does not record its CPU" in line
