"""jobs/_run_training.sh without SLURM: the signal path of the batch shell, with a fake launcher.

The launcher is a small script named ``mpiexec`` (the name selects the mpiexec branch); it
records the signals it gets. The real launcher, trainer and SLURM are exercised by
tests/slurm/test_slurm_real.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_TRAINING = ROOT / "jobs" / "_run_training.sh"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def fake_launcher(tmp_path: Path, body: str) -> Path:
    launcher = tmp_path / "bin" / "mpiexec"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/bash\n" + body + "\n")
    launcher.chmod(0o755)
    return launcher


def shell(tmp_path: Path, launcher: Path, before: str = "") -> subprocess.Popen:
    script = (f'source "{RUN_TRAINING}"\n{before}\n'
              f'CONFIG=c.toml RUN_DIR="{tmp_path}/run" LAUNCHER="{launcher}"\n'
              'HS_EXTRA_ARGS=()\nhs_run_training\necho "status=$?"\n')
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, cwd=tmp_path)


def test_a_stop_signal_before_the_launch_ends_the_job_with_75_not_by_the_signal(tmp_path):
    """Issue 11, defect 5: a SIGUSR1 that reaches the batch shell before the launcher runs (here:
    while it logs the command) is not lost and does not kill the shell: the trainer is not
    started and the status is 75, so the job would be requeued."""
    mark = tmp_path / "started"
    launcher = fake_launcher(tmp_path, f'touch "{mark}"; exit 0')
    signal_while_logging = 'hs_log() { echo "$*"; case "$*" in command:*) kill -USR1 $$ ;; esac; }'
    proc = shell(tmp_path, launcher, signal_while_logging)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out  # the shell itself was not killed by SIGUSR1
    assert "status=75" in out and "before the trainer started" in out
    assert not mark.exists()


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_a_stop_signal_during_the_run_is_forwarded_to_the_launcher(tmp_path):
    """Once the trainer created its ready file (HPC_SPARSE_READY_FILE: every rank has its stop
    handler), a stop reaches the launcher, and the ready file is removed at the end."""
    got = tmp_path / "got"
    launcher = fake_launcher(tmp_path, f'trap \'echo USR1 > "{got}"; exit 75\' USR1\n'
                                       'touch "$HPC_SPARSE_READY_FILE"\n'
                                       'for i in $(seq 600); do sleep 0.1; done\nexit 0')
    proc = shell(tmp_path, launcher)
    ready = tmp_path / "run" / f".ready-pid{proc.pid}-0"
    wait_for(ready)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert got.read_text().strip() == "USR1"
    assert "status=75" in out and "forwarding to launcher pid" in out and "trainer exited with status 75" in out
    assert not ready.exists()


def test_a_stop_signal_before_every_rank_is_ready_ends_the_launcher_and_gives_75(tmp_path):
    """Issue 18, defect 12: before the ready file exists (ranks still starting: interpreter,
    MPI_Init, no stop handler yet) a stop is not passed on (it would kill a rank, and the job
    would not be requeued); the launcher is ended with SIGTERM and the status is 75."""
    started, got = tmp_path / "started", tmp_path / "got"
    launcher = fake_launcher(tmp_path, f'trap \'echo USR1 >> "{got}"; exit 1\' USR1\n'
                                       f'trap \'echo TERM >> "{got}"; exit 143\' TERM\ntouch "{started}"\n'
                                       'for i in $(seq 600); do sleep 0.1; done\nexit 0')
    proc = shell(tmp_path, launcher)
    wait_for(started)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert got.read_text().split() == ["TERM"], out
    assert "before every rank was ready" in out and "trainer exited with status 143" in out, out
    assert "status=75" in out, out
