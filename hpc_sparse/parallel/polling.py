"""Waiting on MPI requests without spinning: test, sleep with back-off, give up after a timeout.

MPICH's blocking calls busy-poll a core while they wait. That cost the paper's idle
parameter server most of a core ("Truly Sparse Neural Networks at Scale", Curci, Mocanu and
Pechenizkiy, 2021, the WASAP-SGD section), and on a machine with as many ranks as cores it
takes the core from a rank that still computes. So wherever a rank may wait for others that
are still working (WASAP-SGD's messages, its local phase's agreements), the wait is a
:class:`Poller`: it tests the requests and sleeps with an exponential back-off (20 us up to
1 ms) between tests, and raises :class:`WasapTimeout` naming what it waited for after
``timeout`` seconds. A failing rank normally ends the job at once (the engine aborts); the
timeout is the last resort.
"""

from __future__ import annotations

import os
import time

from mpi4py import MPI

DEFAULT_TIMEOUT = 3600.0
"""Seconds a rank waits for one message before giving up; the environment variable
``HPC_SPARSE_WASAP_TIMEOUT`` overrides it (read when a :class:`Poller` is made)."""


def default_timeout() -> float:
    """``HPC_SPARSE_WASAP_TIMEOUT`` if set, else :data:`DEFAULT_TIMEOUT` (seconds)."""
    return float(os.environ.get("HPC_SPARSE_WASAP_TIMEOUT", "") or DEFAULT_TIMEOUT)


class WasapTimeout(RuntimeError):
    """A peer did not answer in time: it probably failed; the job must end."""


class Poller:
    """Waits on MPI requests by testing and sleeping (exponential back-off), with a timeout.

    Attributes
    ----------
    wait_seconds : float
        Total wall time spent waiting in :meth:`wait` and :meth:`idle` (communication and
        idle time).
    """

    def __init__(self, timeout: float | None = None, min_sleep: float = 2e-5, max_sleep: float = 1e-3) -> None:
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.min_sleep, self.max_sleep = min_sleep, max_sleep
        self.wait_seconds = 0.0

    def wait(self, reqs: list[MPI.Request], what: str, timeout: float | None = None) -> None:
        """Complete every request of ``reqs``; raise WasapTimeout naming ``what`` after
        ``timeout`` seconds (default: this poller's; ``math.inf``: never)."""
        limit = self.timeout if timeout is None else timeout
        t0 = time.perf_counter()
        sleep = self.min_sleep
        try:
            while not MPI.Request.Testall(reqs):
                now = time.perf_counter()
                if now - t0 > limit:
                    for r in reqs:
                        if r != MPI.REQUEST_NULL:
                            try:
                                r.Cancel()
                            except MPI.Exception:  # pragma: no cover - best effort
                                pass
                    raise WasapTimeout(f"waited {limit:g} s for {what}; a peer rank has probably failed "
                                       "or hangs; fix: check the other ranks' errors (or raise "
                                       "HPC_SPARSE_WASAP_TIMEOUT if one epoch legitimately takes longer)")
                time.sleep(sleep)
                sleep = min(2 * sleep, self.max_sleep)
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def idle(self, sleep: float) -> float:
        """Sleep ``sleep`` seconds (counted as waiting); returns the next back-off interval."""
        t0 = time.perf_counter()
        time.sleep(sleep)
        self.wait_seconds += time.perf_counter() - t0
        return min(2 * sleep, self.max_sleep)
