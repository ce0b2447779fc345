"""One dataset cache per node (hpc_sparse.parallel.node_build): one process builds, the others
wait and map the same file. Holds at any size; run under ``mpiexec -n 2`` and ``-n 3``.

Two nodes are simulated by replacing the node communicator with a split by rank parity
(on one machine every rank shares memory, so ``Split_type`` finds one node)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_sparse.data import cache, load_dataset
from hpc_sparse.errors import UserError
from hpc_sparse.parallel import node_build

pytestmark = [pytest.mark.mpi]


@pytest.fixture
def count_builds(monkeypatch):
    """How many times this process built a cache entry."""
    calls = []
    real = cache.Entry.build

    def counting(self):
        calls.append(self.name)
        return real(self)

    monkeypatch.setattr(cache.Entry, "build", counting)
    return calls


@pytest.fixture
def two_nodes(monkeypatch):
    """Ranks of even and odd number on two different 'nodes'."""
    monkeypatch.setattr(node_build, "node_comm", lambda comm: comm.Split(comm.Get_rank() % 2, comm.Get_rank()))


def write_data(comm, run_dir: Path, bad_line: bool = False) -> tuple[Path, Path]:
    folder = run_dir / "data"
    if comm.rank == 0:
        rng = np.random.default_rng(0)
        folder.mkdir()
        np.savez(folder / "train.npz", X=rng.standard_normal((300, 8)), y=rng.integers(0, 3, 300))
        np.savez(folder / "test.npz", X=rng.standard_normal((50, 8)), y=rng.integers(0, 3, 50))
        rows = np.hstack([rng.integers(0, 2, (40, 1)), rng.standard_normal((40, 28))])
        text = "".join(",".join(f"{v:.9e}" for v in r) + "\n" for r in rows)
        (folder / "HIGGS.csv").write_text(("label,lepton pT\n" if bad_line else "") + text)
    comm.Barrier()
    return folder / "train.npz", folder / "test.npz"


def load(comm, train: Path, test: Path, cache_dir: Path | str):
    return load_dataset("file", str(train), str(test), cache_dir=str(cache_dir),
                        coordinate=node_build.coordinator(comm))


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def same_on_every_rank(comm, value: object) -> bool:
    return len(set(comm.allgather(value))) == 1


def test_one_rank_builds_for_all_ranks_of_a_shared_folder(comm, run_dir, count_builds):
    train, test = write_data(comm, run_dir)
    d = load(comm, train, test, run_dir / "cache")
    assert comm.allreduce(len(count_builds)) == 1 and (comm.rank == 0) == (len(count_builds) == 1)
    entry = next(p for p in (run_dir / "cache").iterdir() if not p.name.startswith("."))
    assert str(entry / "x_train.npy") in mapped_files()  # every rank maps the same file
    assert not d.x_train.flags.writeable and same_on_every_rank(comm, float(d.x_train.sum()))
    who = "built by this process" if comm.size == 1 else f"built by rank 0 for all {comm.size} ranks"
    assert who in d.notes[0], d.notes[0]
    # the next job maps the entry without building and without deciding who builds
    again = load(comm, train, test, run_dir / "cache")
    assert comm.allreduce(len(count_builds)) == 1 and "already built" in again.notes[0]


def test_nodes_that_do_not_share_the_folder_build_their_own(comm, run_dir, count_builds, two_nodes):
    train, test = write_data(comm, run_dir)
    mine = run_dir / f"node-local-{comm.rank % 2}"  # as /tmp on each node: same role, other folder
    d = load(comm, train, test, mine)
    n_nodes = min(comm.size, 2)
    assert comm.allreduce(len(count_builds)) == n_nodes
    assert (len(count_builds) == 1) == (comm.rank < 2)  # the first rank of each node
    entry = next(p for p in mine.iterdir() if not p.name.startswith("."))
    assert str(entry / "x_train.npy") in mapped_files()
    assert same_on_every_rank(comm, float(d.x_test.sum()))
    if comm.size > 1:
        assert f"built by 2 ranks, the first of each node that does not see rank 0's folder (2 nodes, " \
               f"{comm.size} ranks)" in d.notes[0]


def test_nodes_that_share_the_folder_build_once(comm, run_dir, count_builds, two_nodes):
    train, test = write_data(comm, run_dir)
    d = load(comm, train, test, run_dir / "shared")
    assert comm.allreduce(len(count_builds)) == 1 and (comm.rank == 0) == (len(count_builds) == 1)
    if comm.size > 1:
        assert f"({min(comm.size, 2)} node(s); every rank sees its folder)" in d.notes[0]


def test_a_bad_source_is_one_error_on_every_rank(comm, run_dir, count_builds):
    write_data(comm, run_dir, bad_line=True)
    with pytest.raises(UserError) as err:
        load_dataset("higgs", str(run_dir / "data"), n_test=5, cache_dir=str(run_dir / "cache"),
                     coordinate=node_build.coordinator(comm))
    assert "line 1 is not 29 comma-separated numbers" in str(err.value) and "(a header line?)" in str(err.value)
    assert err.value.every_rank or comm.size == 1  # raised on every rank alike: no abort, one message
    assert same_on_every_rank(comm, str(err.value))
    assert comm.allreduce(len(count_builds)) == 1  # parsed once, by the builder


def test_a_cache_that_cannot_be_written_loads_on_every_rank_without_it(comm, run_dir):
    train, test = write_data(comm, run_dir)
    blocker = run_dir / "a-file"
    if comm.rank == 0:
        blocker.write_text("not a folder")
    comm.Barrier()
    d = load(comm, train, test, blocker / "cache")
    assert d.notes[0].startswith("data cache: not used (cannot write the data cache")
    assert d.x_train.flags.writeable and same_on_every_rank(comm, float(d.x_train.sum()))


def test_a_data_file_missing_on_some_ranks_is_one_error_on_every_rank(comm, run_dir):
    """The engine's load_data agrees on the sources before the cache's collectives: a file that
    the last rank does not see (a node-local path) raises the same one-line error on every rank
    instead of one error per rank, an MPI_Abort, or ranks left waiting in the cache build."""
    from hpc_sparse.config import load_config
    from hpc_sparse.engine.services import load_data

    train, test = write_data(comm, run_dir)
    seen = run_dir / "missing.npz" if comm.rank == comm.size - 1 else train
    cfg = load_config(None, ['data.name="file"', f'data.path="{seen}"', f'data.test_path="{test}"',
                             f'data.cache_dir="{run_dir / "cache"}"'])
    with pytest.raises(UserError) as info:
        load_data(cfg, comm)
    assert info.value.every_rank and "missing.npz" in str(info.value), str(info.value)
    assert same_on_every_rank(comm, str(info.value))
    assert not (run_dir / "cache").exists() or not any((run_dir / "cache").iterdir())  # no build began
