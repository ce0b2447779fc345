"""Pieces of the engine that hold without MPI: the epoch record's JSON and log line, the
complete-run test, per-rank models in a checkpoint (also in schema 2's layout)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from helpers import tiny_mlp
from hpc_sparse.engine import AsyncFigures, EpochRecord, MergeFigures, Progress, Traffic
from hpc_sparse.engine import rank_models
from hpc_sparse.engine.metrics import describe

COMMON = dict(epoch=2, step=40, train_loss=0.5, train_accuracy=0.75, test_loss=0.6, test_accuracy=0.7, nnz=100,
              neurons=20, widths=[5, 20, 3], epoch_seconds=1.5, train_seconds=1.0, evolve_seconds=0.1,
              samples_per_second=400.0, ranks=2)


def test_a_record_is_flat_json_without_absent_fields():
    sync = EpochRecord(**COMMON, traffic=Traffic(0.25, 4096)).to_json()
    assert sync == {**COMMON, "comm_share": 0.25, "bytes_per_sync": 4096}  # no phase, as sync mode wrote
    server = EpochRecord(**{**COMMON, "train_accuracy": None}, phase="async",
                         asynchronous=AsyncFigures(30, 2, 1, 0.1, 512.0)).to_json()
    assert "train_accuracy" not in server and server["phase"] == "async"
    assert {k: server[k] for k in ("updates", "stale_updates", "dropped_updates", "server_wait_share",
                                   "bytes_per_update")} == {"updates": 30, "stale_updates": 2, "dropped_updates": 1,
                                                            "server_wait_share": 0.1, "bytes_per_update": 512.0}
    merged = EpochRecord(**COMMON, phase="merge", merge=MergeFigures(0.2, 0.3, 0.7, 0.8))
    assert set(merged.to_json()) == set(COMMON) | {"phase", "merge_seconds", "merge_repruned_fraction",
                                                   "local_test_loss", "local_test_accuracy"}
    line = describe(merged.to_json(), merged.details(), epochs=3)
    assert line.startswith("epoch 2/3 (merge): train_loss 0.5000") and "the local models had test_acc 0.8000" in line


@pytest.mark.parametrize("progress,epochs,max_steps,want", [
    (Progress(step=30, epoch=3), 3, 0, True),
    (Progress(step=30, epoch=3, step_in_epoch=2), 3, 0, False),  # steps of a 4th epoch: not the end of 3
    (Progress(step=29, epoch=2, step_in_epoch=9), 3, 0, False),
    (Progress(step=12, epoch=1, step_in_epoch=2), 3, 12, True),
    (Progress(step=11, epoch=1, step_in_epoch=1), 3, 12, False),
])
def test_the_run_is_complete(progress, epochs, max_steps, want):
    assert progress.complete(epochs, max_steps) is want


def test_a_rank_model_packs_as_csr_and_unpacks_also_from_schema_2():
    model = tiny_mlp()
    packed = rank_models.pack(model)
    assert all(k.startswith(rank_models.MODEL_PREFIX) for k in packed) and sp.issparse(packed["model/layers/0/W"])
    state = rank_models.unpack({**packed, "other": np.zeros(1)})
    assert state.keys() == model.state_dict().keys()
    legacy = {}  # schema 2: a weight as four dense arrays
    for k, v in packed.items():
        if sp.issparse(v):
            legacy.update({f"{k}/data": v.data, f"{k}/indices": v.indices, f"{k}/indptr": v.indptr,
                           f"{k}/shape": np.asarray(v.shape, np.int64)})
        else:
            legacy[k] = v
    again = rank_models.unpack(legacy)
    for k, v in model.state_dict().items():
        got = again[k]
        if sp.issparse(v):
            assert sp.issparse(got) and (got != v).nnz == 0 and np.array_equal(got.indptr, v.indptr)
        else:
            assert np.array_equal(got, v)
    assert rank_models.unpack(None) == {}
