"""One job per run directory (issue 18, defect 1), and what a resume does when checkpoints
exist but cannot be used (defect 2), through real processes; ``info`` and ``clean``.

The lock's rules are tested on crafted lock files (another host, a fake ``squeue`` on PATH, a
requeued SLURM job, a reused pid), the guarantees with real ``hpc-sparse train`` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from hpc_sparse.runtime.launcher import find_mpiexec
from hpc_sparse.runtime import run_lock
from hpc_sparse.runtime.run_lock import LOCK_NAME, LockRefused, acquire, this_process

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = find_mpiexec()
ENV = {**os.environ, "HPC_SPARSE_THREADS": "1"}
SMALL = ["--config", "configs/synthetic-quick.toml", "--set", "data.n_train=800", "--set", "data.n_test=200",
         "--set", "model.layers=[500,60,40,4]", "--set", "train.batch_size=32", "--set", "importance.enabled=false"]


def hpc(*args: str, ranks: int = 1, script: list[str] | None = None, check: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    head = script or ["-m", "mpi4py", "-m", "hpc_sparse"]
    cmd = [sys.executable, *head, *args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr}")
    return proc


def train(run_dir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return hpc("train", *SMALL, "--run-dir", str(run_dir), *extra, **kw)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def wait_for(predicate, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def committed(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-?????????"))


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A finished 2-epoch run with checkpoints at steps 12, 24, 36, 48 and 50 (every_steps=10
    rounded up to sync points, and the end)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(run_dir, "--set", "train.epochs=2", "--set", "checkpoint.every_steps=10", "--set", "checkpoint.keep=10",
          check=True)
    return run_dir


@pytest.fixture
def trained(trained_once, tmp_path):
    """A copy of :func:`trained_once` for one test to change."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_once, run_dir)
    return run_dir


# ---------------------------------------------------------------- the lock's rules


def write_lock(run_dir: Path, holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(asdict(holder)))


def elsewhere(**changes):
    return replace(this_process(), host="node-far-away", boot_id="another-boot", pid=4242, pid_start=7, **changes)


@pytest.fixture
def fake_squeue(tmp_path, monkeypatch):
    """Put a ``squeue`` on PATH whose answer the test chooses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def answer(stdout: str = "", stderr: str = "", status: int = 0) -> None:
        script = bin_dir / "squeue"
        script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {status}\n")
        script.chmod(0o755)

    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return answer


def test_a_second_taker_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
    lock, note = acquire(tmp_path)
    assert note is None and (tmp_path / LOCK_NAME).is_file()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["token"] == lock.token
    with pytest.raises(LockRefused) as info:
        acquire(tmp_path, break_lock=True)  # a live process on this machine: not even --break-lock
    text = str(info.value)
    assert f"pid {os.getpid()}" in text and "in use by" in text and "fix:" in text and "\n" not in text
    assert lock.release() and not (tmp_path / LOCK_NAME).exists()
    assert not lock.release()  # idempotent
    acquire(tmp_path)[0].release()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, replace(this_process(), pid=gone.pid, pid_start=run_lock.process_start(os.getpid())))
    lock, note = acquire(tmp_path)
    assert note and f"pid {gone.pid}" in note and "no longer runs" in note
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token


def test_a_reused_pid_is_recognised_by_its_start_time(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = None
        while start is None:
            start = run_lock.process_start(sleeper.pid)
        write_lock(tmp_path, replace(this_process(), pid=sleeper.pid, pid_start=start - 1))  # not that process
        lock, note = acquire(tmp_path)
        assert note and "another process" in note
        lock.release()
        write_lock(tmp_path, replace(this_process(), pid=sleeper.pid, pid_start=start))  # that very process
        with pytest.raises(LockRefused, match=f"pid {sleeper.pid}"):
            acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("answer, taken", [
    ({"stdout": "RUNNING\n"}, False),
    ({"stdout": "COMPLETING\n"}, False),
    ({"stdout": "COMPLETED\n"}, True),
    ({"stdout": "PENDING\n"}, True),  # requeued and waiting: its processes are gone
    ({"stdout": ""}, True),
    ({"stderr": "slurm_load_jobs error: Invalid job id specified", "status": 1}, True),
    ({"stderr": "slurm_load_jobs error: Unable to contact slurm controller", "status": 1}, False),
])
def test_another_hosts_lock_is_judged_by_its_slurm_job(tmp_path, fake_squeue, answer, taken):
    fake_squeue(**answer)
    write_lock(tmp_path, elsewhere(job_id="4242"))
    if taken:
        lock, note = acquire(tmp_path)
        assert note and "SLURM job 4242" in note
    else:
        with pytest.raises(LockRefused) as info:
            acquire(tmp_path)
        assert "SLURM job 4242 on host node-far-away" in str(info.value) and "--break-lock" in str(info.value)
        acquire(tmp_path, break_lock=True)[0].release()  # the user's explicit word


def test_a_requeued_job_takes_over_its_previous_start(tmp_path, fake_squeue):
    """The requeued job has the same id, a higher SLURM_RESTART_COUNT, maybe another node;
    SLURM says RUNNING (that is this very job), and it must still take over."""
    fake_squeue(stdout="RUNNING\n")
    write_lock(tmp_path, elsewhere(job_id="77", restart_count=0))
    lock, note = acquire(tmp_path, environ={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    assert note and "requeued" in note
    lock.release()
    write_lock(tmp_path, elsewhere(job_id="77", restart_count=1))  # same start: another step of it
    with pytest.raises(LockRefused):
        acquire(tmp_path, environ={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})


def test_a_lock_from_another_host_without_slurm_needs_break_lock(tmp_path):
    write_lock(tmp_path, elsewhere(job_id=None))
    with pytest.raises(LockRefused, match="--break-lock"):
        acquire(tmp_path)
    lock, note = acquire(tmp_path, break_lock=True)
    assert note and "--break-lock" in note


def test_an_unreadable_lock_is_taken_over_only_after_a_grace_time(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text("")
    monkeypatch.setattr(run_lock, "_UNREADABLE_GRACE_SECONDS", 0.5)
    t0 = time.monotonic()
    lock, note = acquire(tmp_path)
    assert note and "unreadable" in note and time.monotonic() - t0 >= 0.4


def test_only_one_of_several_racing_jobs_takes_over_a_stale_lock(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, replace(this_process(), pid=gone.pid))
    results, barrier = [], threading.Barrier(6)

    def contender():
        barrier.wait()
        try:
            results.append(acquire(tmp_path)[0])
        except LockRefused as exc:
            results.append(exc)

    threads = [threading.Thread(target=contender) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if not isinstance(r, LockRefused)]
    assert len(winners) == 1, results
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == winners[0].token
    assert not (tmp_path / (LOCK_NAME + ".takeover")).exists()


# ---------------------------------------------------------------- real jobs


def test_two_jobs_on_one_run_dir_the_second_is_refused_and_nothing_is_lost(tmp_path):
    """What submitting `RUN_DIR=... sbatch jobs/train.sbatch` twice did: both jobs failed and
    19 checkpoints were set aside as each overwrote the other's. Now the second job (alone, and
    under mpiexec -n 2) is refused with one line naming the holder; the first one goes on, and
    its stop (SIGTERM -> checkpoint -> 75) releases the lock."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "hpc_sparse", "train", *SMALL, "--set", "train.epochs=400",
                              "--set", "checkpoint.every_steps=5", "--run-dir", str(run_dir)],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: committed(run_dir), "the first job's first checkpoint")
        for ranks in (1, 2):
            second = train(run_dir, "--set", "train.epochs=400", "--set", "checkpoint.every_steps=5",
                           "--resume", "auto", ranks=ranks)
            assert second.returncode == 2, second.stderr[-3000:]
            lines = error_lines(second.stderr)
            assert len(lines) == 1 and "is in use by a job outside SLURM" in lines[0], second.stderr[-3000:]
            assert f"pid {first.pid}" in lines[0] and "fix:" in lines[0]
            assert "resumed from" not in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None, "the first job must still be running"
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 75, err[-3000:]
    assert not (run_dir / LOCK_NAME).exists(), "exit 75 must release the lock"
    names = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert not [n for n in names if "." in n], names  # nothing set aside, nothing replaced
    resumed = train(run_dir, "--set", "train.epochs=2", "--resume", "auto", check=True)
    assert "resumed from" in resumed.stderr and not (run_dir / LOCK_NAME).exists()


def test_a_killed_jobs_lock_is_taken_over_and_its_temporary_folder_removed(tmp_path):
    run_dir = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "hpc_sparse", "train", *SMALL, "--set", "train.epochs=400",
                            "--set", "checkpoint.every_steps=5", "--run-dir", str(run_dir)],
                           cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: committed(run_dir), "the first checkpoint")
    finally:
        job.kill()  # SIGKILL: no chance to release anything
        job.wait()
    assert (run_dir / LOCK_NAME).is_file()
    (run_dir / "checkpoints" / ".tmp-step-000099999").mkdir()  # as a save killed mid-way leaves it
    proc = train(run_dir, "--set", "train.epochs=400", "--set", "train.max_steps=5", "--resume", "auto",
                 check=True)
    assert f"took over the stale lock of a job outside SLURM on host" in proc.stderr
    assert f"pid {job.pid}" in proc.stderr and "no longer runs" in proc.stderr
    assert "removed .tmp-step-000099999" in proc.stderr
    assert not (run_dir / "checkpoints" / ".tmp-step-000099999").exists() and not (run_dir / LOCK_NAME).exists()


def test_the_lock_is_released_when_every_rank_raises(trained):
    proc = train(trained, "--set", "train.epochs=3", "--set", "train.lr=1e30", "--set", "model.dropout=0",
                 "--resume", "auto", ranks=2)
    assert proc.returncode == 2 and "diverged" in proc.stderr
    assert not (trained / LOCK_NAME).exists(), proc.stderr[-2000:]


def test_the_lock_is_released_when_one_rank_aborts_the_job(tmp_path):
    run_dir = tmp_path / "run"
    proc = hpc("train", *SMALL, "--set", "train.epochs=50", "--run-dir", str(run_dir), ranks=2,
               script=["tests/mpi/fault_main.py", "raise"])
    assert proc.returncode != 0 and "injected failure on rank 1" in proc.stderr
    assert run_dir.is_dir() and not (run_dir / LOCK_NAME).exists(), proc.stderr[-2000:]


# ---------------------------------------------------------------- resume refuses to lose work


def corrupt(ckpt: Path) -> None:
    shard = next(ckpt.glob("shard-*.h5"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_auto_resume_refuses_to_start_afresh_when_no_checkpoint_is_valid(trained):
    run_dir = trained
    steps = committed(run_dir)
    for ckpt in steps:
        corrupt(ckpt)
    proc = train(run_dir, "--set", "train.epochs=2", "--resume", "auto", ranks=2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and all(p.name in lines[0] for p in steps) and "--fresh-if-none-valid" in lines[0]
    assert committed(run_dir) == steps  # nothing set aside, nothing trained
    fresh = train(run_dir, "--set", "train.epochs=2", "--resume", "auto", "--fresh-if-none-valid", check=True)
    assert "starting from scratch" in fresh.stderr
    assert len(list((run_dir / "checkpoints").glob("step-*.invalid-*"))) == len(steps)


def test_an_io_error_on_resume_stops_the_job_and_sets_nothing_aside(trained):
    run_dir = trained
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    for ranks in (1, 2):
        proc = train(run_dir, "--set", "train.epochs=3", "--resume", "auto", ranks=ranks,
                     script=["tests/mpi/fault_main.py", "eio-on-load"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and "EIO" in lines[0] and "shard-0000" in lines[0] and "not of the checkpoint" \
            in lines[0], proc.stderr[-2000:]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
        assert not (run_dir / LOCK_NAME).exists()


# ---------------------------------------------------------------- info and clean


def test_info_and_clean_show_and_reclaim_set_aside_folders(trained):
    run_dir = trained
    steps = committed(run_dir)
    train(run_dir, "--resume", str(steps[0]), "--set", "train.epochs=2", "--set", "train.max_steps=12",
          "--set", "checkpoint.keep=10", check=True)  # sets the newer ones aside (abandoned)
    (run_dir / "checkpoints" / ".tmp-step-000000077").mkdir()
    kept = committed(run_dir)
    aside = sorted((run_dir / "checkpoints").glob("step-*.abandoned-*"))
    assert aside and kept
    info = hpc("info", "--run-dir", str(run_dir), check=True).stdout
    assert f"set aside and temporary: {len(aside) + 1} folder(s)" in info and "lock: free" in info
    assert all(p.name in info for p in aside) and ".tmp-step-000000077" in info
    dry = hpc("clean", "--run-dir", str(run_dir), check=True).stdout
    assert "--yes" in dry and all(p.is_dir() for p in aside)
    held, _ = acquire(run_dir)  # a job holds the run dir: clean must not remove anything
    try:
        refused = hpc("clean", "--run-dir", str(run_dir), "--yes")
        assert refused.returncode == 2 and "is in use by" in refused.stderr and all(p.is_dir() for p in aside)
    finally:
        held.release()
    done = hpc("clean", "--run-dir", str(run_dir), "--yes", check=True).stdout
    assert f"removed {len(aside) + 1} folder(s)" in done
    assert committed(run_dir) == kept and not list((run_dir / "checkpoints").glob("*.abandoned-*"))
    assert not (run_dir / "checkpoints" / ".tmp-step-000000077").exists()
    assert "nothing to clean" in hpc("clean", "--run-dir", str(run_dir), check=True).stdout


def test_info_and_evaluate_survive_a_malformed_manifest(trained):
    run_dir = trained
    older, newest = committed(run_dir)[-2:]
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["shards"][0]["keys"] = [["layers/0/W"]]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    info = hpc("info", "--run-dir", str(run_dir), check=True)
    assert "INVALID" in info.stdout and f"model (from {older.name})" in info.stdout
    ev = hpc("evaluate", "--run-dir", str(run_dir), ranks=2, check=True)
    assert json.loads(ev.stdout)["checkpoint"] == str(older)


def test_a_lock_file_that_cannot_be_read_needs_break_lock(tmp_path):
    (tmp_path / "elsewhere").write_text("{}")
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")  # opened with O_NOFOLLOW: ELOOP
    with pytest.raises(LockRefused, match="cannot be read"):
        acquire(tmp_path)
    lock, note = acquire(tmp_path, break_lock=True)
    assert note and "--break-lock" in note and not (tmp_path / LOCK_NAME).is_symlink()
