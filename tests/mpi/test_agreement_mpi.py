"""The engine's agreement at a meeting point, at any communicator size: a flag set on one
rank is seen by every rank, figures are summed, and the blocking and the polled reduction
give the same fields."""

from __future__ import annotations

import pytest

pytest.importorskip("mpi4py.MPI")

from hpc_sparse.engine.agreement import agree  # noqa: E402


@pytest.mark.parametrize("polled", [False, True])
def test_a_flag_of_one_rank_is_every_rank_s_and_figures_are_summed(comm, polled):
    last = comm.size - 1
    got = agree(comm, stop=comm.rank == last, save_due=comm.rank == 0, nonfinite=False,
                figures=(1.0, float(comm.rank)), polled=polled)
    quiet = agree(comm, stop=False, save_due=False, polled=polled)
    everyone = comm.allgather((got.stop, got.save_due, got.nonfinite, got.figures.tolist(), quiet.stop,
                               quiet.save_due, quiet.figures.size))
    want = (True, True, False, [float(comm.size), float(sum(range(comm.size)))], False, False, 0)
    assert everyone == [want] * comm.size


def test_nonfinite_on_one_rank_is_agreed(comm):
    got = agree(comm, stop=False, save_due=False, nonfinite=comm.rank == comm.size - 1, polled=True)
    assert comm.allgather(got.nonfinite) == [True] * comm.size
