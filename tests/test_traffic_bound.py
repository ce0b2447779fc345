"""The traffic bound of tools/_bench_common.py: its arithmetic on small cases worked by hand,
and the properties that make it a lower bound (more cache never raises it; with no cache it
is every value read once per phase that uses it and written once)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import _bench_common as bc  # noqa: E402


def test_one_layer_by_hand() -> None:
    # one layer (100 -> 200, 1000 weights), batch 8, float32 activations, int32 indices:
    # batch x 3200 B (forward, backward); indices + weights + bias 4000 + 4800 (forward, backward);
    # momentum 4800 (backward); updated weights + momentum 9600 (kept); logits 6400 (forward -> backward)
    shapes = [(100, 200, 1000)]
    # no cache: forward reads 12000 and writes the logits 6400; backward reads 23200, writes 9600
    assert bc.step_bound_bytes(shapes, 8, cache=0) == 12000 + 6400 + 23200 + 9600
    # 10,000 B of cache: forward 12000 - 10000 read, logits stay; backward 23200 - 10000 read,
    # writes stay cached; one window for both phases would give only 16800 - 10000
    assert bc.step_bound_bytes(shapes, 8, cache=10_000) == 2000 + 13200
    assert bc.step_bound_bytes(shapes, 8, cache=30_000) == 0
    # bfloat16 activations halve the batch and the logits: forward 1600 + 8800, backward
    # 1600 + 8800 + 4800 + 3200 read
    assert bc.step_bound_bytes(shapes, 8, cache=0, act_bytes=2) == 10400 + 3200 + 18400 + 9600


def _no_cache_closed_form(widths: list[int], nnz: list[int], batch: int, e: int) -> int:
    """With no cache each value moves once per phase that reads it and once when written:
    per weight 4+4 read twice (index, value), momentum read once, value and momentum written
    (28 B); per bias 20 B; the batch read twice; a hidden activation written, read by the
    next forward and by the backward, its delta written and read (5 e); logits written, read."""
    hidden = sum(widths[1:-1])
    return (28 * sum(nnz) + 20 * sum(widths[1:])
            + batch * e * (2 * widths[0] + 5 * hidden + 2 * widths[-1]))


@pytest.mark.parametrize("e", [4, 2])
def test_no_cache_is_every_read_and_write(e: int) -> None:
    widths, nnz = [30, 500, 700, 10], [900, 8000, 6000]
    shapes = list(zip(widths[:-1], widths[1:], nnz))
    assert bc.step_bound_bytes(shapes, 16, cache=0, act_bytes=e) == _no_cache_closed_form(widths, nnz, 16, e)


def test_more_cache_never_raises_the_bound_and_enough_removes_it() -> None:
    widths, nnz = [784, 20000, 20000, 10], [400_000, 800_000, 200_000]
    shapes = list(zip(widths[:-1], widths[1:], nnz))
    caches = [0, 1 << 20, 8 << 20, 32 << 20, 64 << 20, 1 << 30]
    bounds = [bc.step_bound_bytes(shapes, 128, cache=c) for c in caches]
    assert all(a >= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] > bounds[3] > 0 and bounds[-1] == 0


def test_the_best_partition_of_the_phases_is_taken() -> None:
    # two 10 -> 10 layers of 1000 weights, batch 1, 10,000 B of cache. Per layer: indices +
    # weights + bias 8040 B, momentum 4040 B, updated weights + momentum 8080 B; activations,
    # deltas, logits and the batch 40 B each. Phase by phase, every forward fits and each
    # backward reads 12,160 B: 2 x 2160 B. The whole step as one window: 24,200 B read and
    # 16,160 B left updated, 14,200 + 6160 B. Best: the forward pass as one window (both layers'
    # weights, 16,120 B read) and the backward pass as another (24,280 B read, 16,160 B left):
    shapes = [(10, 10, 1000), (10, 10, 1000)]
    assert bc.step_bound_bytes(shapes, 1, cache=10_000) == 6120 + 14_280 + 6160


def test_onchip_cache_and_probe() -> None:
    assert bc.onchip_cache_bytes() > 0
    probe = bc.BandwidthProbe(n=1 << 16)
    probe.read()
    probe.triad()
    # the same quotient computed two ways differs in its last bit: allow for round-off
    assert probe.bound_bps() >= probe.triad_stream_bps() * 32 / 24 * (1 - 1e-12) > 0
    assert np.isfinite(probe.bound_bps())
