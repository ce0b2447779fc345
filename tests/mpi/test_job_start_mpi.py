"""What a job does at start for its job script and log, at any communicator size: where the
ranks run (hosts, ranks and threads per host) and the ready file that lets the job script
pass stop signals on.

On one machine every rank shares one host name; the two-node SLURM test
(tests/slurm/test_slurm_real.py) checks the log line with two hosts.
"""

from __future__ import annotations

import signal

import pytest
from mpi4py import MPI

from hpc_sparse.engine.failure import agreed
from hpc_sparse.errors import UserError
from hpc_sparse.parallel.placement import HostPlacement, _ranges, describe_placement, gather_placement
from hpc_sparse.runtime.signals import READY_FILE_ENV, StopFlag, announce_ready


def test_every_rank_is_placed_once_with_its_threads(comm):
    hosts = gather_placement(comm, threads=comm.rank + 1)
    ranks = sorted(r for h in hosts for r in h.ranks)
    assert ranks == list(range(comm.size))
    assert [h.host for h in hosts] == [MPI.Get_processor_name()]  # one machine
    assert hosts[0].threads == tuple(r + 1 for r in range(comm.size))
    assert hosts[0].total_threads == sum(range(1, comm.size + 1))
    assert comm.allgather(hosts) == [hosts] * comm.size  # the same answer on every rank


def test_the_log_line_names_each_host_with_its_ranks_and_threads():
    hosts = [HostPlacement("node1", (0, 1, 2, 5), (2, 2, 2, 2)), HostPlacement("node2", (3,), (1,)),
             HostPlacement("node3", (4,), (2,))]
    assert describe_placement(hosts) == ("3 hosts: node1 (ranks 0-2,5, 8 threads), node2 (rank 3, 1 thread), "
                                         "node3 (rank 4, 2 threads)")
    assert describe_placement([HostPlacement("vm", (0,), (1,))]) == "1 host: vm (rank 0, 1 thread)"
    assert _ranges((0, 2, 3, 4, 7)) == "0,2-4,7"


def test_rank_0_creates_the_ready_file_once_every_rank_has_its_handlers(comm, run_dir):
    ready = run_dir / "sub" / ".ready-7-0"
    env = {READY_FILE_ENV: str(ready)}
    with StopFlag() as stop:
        assert signal.getsignal(signal.SIGUSR1) == stop._handler
        written = announce_ready(comm, env)
        assert (written == ready) if comm.rank == 0 else written is None
        comm.Barrier()
        assert ready.is_file() and f"{comm.size} ranks ready" in ready.read_text()
        assert not list(ready.parent.glob("*.tmp"))
    assert announce_ready(comm, {}) is None  # outside the job scripts: nothing written


def test_a_user_error_on_some_ranks_is_raised_on_every_rank_with_the_first_message(comm):
    def load():
        if comm.rank >= comm.size - 2:  # the last two ranks (the only one with one rank)
            raise UserError(f"bad input on rank {comm.rank}; fix: x")
        return comm.rank

    with pytest.raises(UserError) as info:
        agreed(comm, load)
    assert info.value.every_rank and str(info.value) == f"bad input on rank {max(comm.size - 2, 0)}; fix: x"
    assert agreed(comm, lambda: comm.rank * 2) == comm.rank * 2
