"""One job per run directory: the lock file ``RUN_DIR/hpc-sparse.lock`` (no MPI here).

The lock is a file created with ``O_EXCL`` that holds, as JSON, who took it: a random
token, the SLURM job id and restart count (if any), the host, its boot id and PID
namespace, the pid and the process's start time, and the wall-clock time. A second job
finds it and is refused with one line naming the holder, unless the holder is provably gone:

* **Same machine** (host name, boot id and PID namespace all equal): the holder is gone if
  its pid no longer runs, or runs a process that started at another time (the pid was
  reused; the start time is field 22 of ``/proc/<pid>/stat``).
* **Another machine** (or container): its pids cannot be checked from here.
  - The holder was an earlier start of *this* SLURM job (same job id, lower
    ``SLURM_RESTART_COUNT``): a requeued job's previous processes are gone.
  - The holder has a SLURM job id: gone unless ``squeue`` reports that job in a state with
    live processes (RUNNING, COMPLETING, ...); if SLURM cannot be asked, undecided.
  - No job id: undecided.
  An undecided holder is only taken over with an explicit ``--break-lock``; a live process
  on this machine never is.

Taking over a stale lock is serialised by a second ``O_EXCL`` file
(``hpc-sparse.lock.takeover``), so two jobs that both find the same stale lock cannot both
win: the loser then finds the winner's fresh lock and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from hpc_sparse.errors import UserError
from hpc_sparse.runtime.slurm import read_slurm_env

LOCK_NAME = "hpc-sparse.lock"
SLURM_LIVE_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                               "RESIZING", "STAGE_OUT"})
"""``squeue`` states in which a job may still have processes that write to the run dir."""
_TAKEOVER_STALE_SECONDS = 60.0
_UNREADABLE_GRACE_SECONDS = 10.0  # a lock file this young may be in the middle of being written
_MAX_LOCK_BYTES = 1 << 16


class LockRefused(UserError):
    """Another job holds the run directory (or may hold it: see the module docstring)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a run directory's lock."""

    token: str
    pid: int
    host: str
    boot_id: str | None
    pid_namespace: str | None
    pid_start: int | None
    """Start time of the process in clock ticks since boot (``/proc/<pid>/stat``, field 22)."""
    started: str
    """When the lock was taken (UTC, ISO 8601)."""
    job_id: str | None
    restart_count: int = 0
    command: str = ""

    def describe(self) -> str:
        """E.g. ``SLURM job 4242 (restart 1) on host n01, pid 5678, since 2026-12-03T10:00:00Z``."""
        if self.job_id:
            who = f"SLURM job {self.job_id}" + (f" (restart {self.restart_count})" if self.restart_count else "")
        else:
            who = "a job outside SLURM"
        return f"{who} on host {self.host}, pid {self.pid}, since {self.started}"

    def same_machine(self, other: Holder) -> bool:
        """True if pids of ``other`` can be checked here (same host, boot and PID namespace)."""
        return (self.host, self.boot_id, self.pid_namespace) == (other.host, other.boot_id, other.pid_namespace)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read(4096).strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, or None if it does not run
    (or on a system without ``/proc``)."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def this_process(environ: Mapping[str, str] | None = None, command: str = "") -> Holder:
    """The :class:`Holder` record of this process (with a fresh token)."""
    slurm = read_slurm_env(environ)
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return Holder(token=uuid.uuid4().hex, pid=os.getpid(), host=socket.gethostname(),
                  boot_id=_read_text("/proc/sys/kernel/random/boot_id"), pid_namespace=namespace,
                  pid_start=process_start(os.getpid()), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  job_id=slurm.job_id if slurm else None, restart_count=slurm.restart_count if slurm else 0,
                  command=command)


def slurm_job_state(job_id: str, timeout: float = 20.0) -> str | None:
    """The job's state as ``squeue`` reports it (e.g. "RUNNING"), "GONE" if SLURM no longer
    knows it, None if SLURM cannot be asked (no ``squeue``, no controller, a timeout)."""
    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "--noheader", "--jobs", job_id, "--format", "%T"], capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode == 0:
        words = proc.stdout.split()
        return words[0].upper() if words else "GONE"
    if "invalid job id" in proc.stderr.lower():
        return "GONE"
    return None


def judge(holder: Holder, me: Holder) -> tuple[str, str]:
    """("alive" | "gone" | "undecided", why) for the lock ``holder`` as seen by ``me``."""
    if holder.same_machine(me):
        runs = _pid_runs(holder.pid) if me.pid_start is None else process_start(holder.pid) is not None
        if not runs:  # (without /proc only whether the pid runs can be checked)
            return "gone", f"process {holder.pid} no longer runs on {holder.host}"
        if holder.pid_start is not None and me.pid_start is not None and process_start(holder.pid) != holder.pid_start:
            return "gone", f"pid {holder.pid} now belongs to another process, started later"
        return "alive", f"process {holder.pid} still runs on this host"
    if holder.job_id:
        if holder.job_id == me.job_id and me.restart_count > holder.restart_count:
            return "gone", (f"it was taken by start {holder.restart_count} of this SLURM job, which was requeued "
                            f"(this is start {me.restart_count})")
        state = slurm_job_state(holder.job_id)
        if state is None:
            return "undecided", (f"it is held on another host ({holder.host}) and SLURM cannot be asked about job "
                                 f"{holder.job_id} from here")
        if state in SLURM_LIVE_STATES:
            return "alive", f"SLURM job {holder.job_id} is {state}"
        return "gone", f"SLURM job {holder.job_id} is {'no longer known to SLURM' if state == 'GONE' else state}"
    return "undecided", (f"it is held on another host or container ({holder.host}), whose processes cannot be "
                         "checked from here")


def _create(path: Path, me: Holder) -> bool:
    """Create the lock file holding ``me``; False if it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(asdict(me), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return True


def read_holder(path: Path) -> tuple[Holder | None, float | None]:
    """(the lock's holder or None if its content is unusable, the file's age in seconds or
    None if there is no lock file). Raises OSError if the file exists but cannot be read
    (permissions, I/O error, a symbolic link): that says nothing about its holder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    try:
        age = time.time() - os.fstat(fd).st_mtime
        raw = os.read(fd, _MAX_LOCK_BYTES)
    finally:
        os.close(fd)
    try:
        fields = json.loads(raw.decode())
        known = {f.name for f in dataclasses.fields(Holder)}
        holder = Holder(**{k: v for k, v in fields.items() if k in known})  # a newer version may add fields
        if not (isinstance(holder.pid, int) and isinstance(holder.token, str) and isinstance(holder.host, str)):
            raise TypeError("mistyped fields")
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        return None, age
    return holder, age


@dataclass(frozen=True)
class RunLock:
    """A held lock: ``release()`` removes the file if it is still this token's."""

    path: Path
    token: str

    def release(self) -> bool:
        """Remove the lock file if it still holds this token; True if it was removed. Safe
        to call from any rank that knows the token, and more than once."""
        try:
            holder, _ = read_holder(self.path)
        except OSError:
            return False
        if holder is None or holder.token != self.token:
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True


def _take_over(path: Path, stale_token: str | None, me: Holder) -> bool:
    """Replace the stale lock (``stale_token``; None: an unreadable file) by ``me``'s, unless
    it changed meanwhile. Serialised by the takeover file; False if someone else moved first."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_SECONDS:  # its owner died mid-takeover
                guard.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.2)
        return False
    try:
        try:
            current, _ = read_holder(path)
        except OSError:  # still unreadable (the caller had --break-lock for that)
            current = None
        if (current.token if current else None) != stale_token:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return _create(path, me)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def acquire(run_dir: str | Path, break_lock: bool = False, environ: Mapping[str, str] | None = None,
            command: str = "") -> tuple[RunLock, str | None]:
    """Take the lock of ``run_dir`` (which must exist) for this process.

    Returns the lock and, if a stale lock was taken over, one line saying whose and why.
    Raises :class:`LockRefused` (one line naming the holder and the fix) if another job
    holds it or may hold it; ``break_lock`` takes over a holder that cannot be checked
    (another host without SLURM), never a process that runs on this machine.
    """
    path = Path(run_dir) / LOCK_NAME
    me = this_process(environ, command)
    deadline = time.monotonic() + 2 * _UNREADABLE_GRACE_SECONDS + 10
    while time.monotonic() < deadline:
        if _create(path, me):
            return RunLock(path, me.token), None
        unreadable = None
        try:
            holder, age = read_holder(path)
        except OSError as exc:
            holder, age, unreadable = None, math.inf, exc
        if age is None:  # released meanwhile
            continue
        if unreadable is not None:
            verdict, why = "undecided", f"the lock file cannot be read ({unreadable})"
        elif holder is None:
            if age < _UNREADABLE_GRACE_SECONDS:  # being written right now
                time.sleep(0.2)
                continue
            verdict, why = "gone", "the lock file is empty or unreadable (its writer died while creating it)"
        else:
            verdict, why = judge(holder, me)
        who = holder.describe() if holder else f"an unreadable lock file ({path})"
        local = holder is not None and holder.same_machine(me)
        if verdict == "alive" and (local or not break_lock):
            fix = ("stop that process first" if local else "wait for that job to end, or pass --break-lock if you "
                   "know it is gone")
            raise LockRefused(f"run dir {run_dir} is in use by {who} ({why}); two jobs must never share a run dir; "
                              f"fix: use another --run-dir, or {fix}")
        if verdict == "undecided" and not break_lock:
            raise LockRefused(f"run dir {run_dir} is locked by {who}, and {why}; fix: if that job has ended, run "
                              "again with --break-lock; otherwise use another --run-dir")
        if _take_over(path, holder.token if holder else None, me):
            forced = "" if verdict == "gone" else " (--break-lock)"
            return RunLock(path, me.token), f"took over the stale lock of {who}{forced}: {why}"
    raise LockRefused(f"could not take the lock of run dir {run_dir}: other jobs keep taking it; fix: make sure only "
                      "one job uses this run dir")
