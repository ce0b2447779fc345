"""Conversion of unstructured CSR weights to N:M and transposable N:M (topology/nm_convert.py),
against dense references and brute force on small shapes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from hpc_sparse.topology.structure import NMStructure, violations
from hpc_sparse.topology.nm_convert import (
    apply_keep,
    nm_keep,
    retained_l1_fraction,
    transposable_exact_keep,
    transposable_greedy_keep,
)


def random_csr(rng: np.random.Generator, n_in: int, n_out: int, density: float) -> sp.csr_matrix:
    dense = rng.standard_normal((n_in, n_out)).astype(np.float32)
    dense[rng.random((n_in, n_out)) >= density] = 0.0
    return sp.csr_matrix(dense)


def dense_violations(d: np.ndarray, n: int, m: int, transposable: bool) -> int:
    """Reference checker on a dense array, zero-padded to multiples of m."""
    n_in, n_out = d.shape
    p = np.zeros((-(-n_in // m) * m, -(-n_out // m) * m), bool)
    p[:n_in, :n_out] = d != 0
    bad = 0
    for k in range(0, p.shape[0], m):
        bad += int(np.count_nonzero(p[k:k + m, :n_out].sum(axis=0) > n))  # per output neuron
    if transposable:
        for l in range(0, p.shape[1], m):
            bad += int(np.count_nonzero(p[:n_in, l:l + m].sum(axis=1) > n))  # per input neuron
    return bad


def kept_dense(w: sp.csr_matrix, keep: np.ndarray) -> np.ndarray:
    return apply_keep(w, keep).toarray()


@pytest.mark.parametrize("shape", [(12, 9), (10, 7), (1, 5), (16, 16)])
@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (2, 3), (3, 8)])
def test_nm_keep_matches_dense_top_n(shape: tuple[int, int], nm: tuple[int, int]) -> None:
    n, m = nm
    rng = np.random.default_rng(hash((shape, nm)) % 2**32)
    w = random_csr(rng, *shape, density=0.7)
    w.data[::5] = w.data[0]  # some exact ties: resolved by the lower input index
    keep = nm_keep(w, n, m)
    got = kept_dense(w, keep)
    d = w.toarray()
    want = np.zeros_like(d)
    for j in range(shape[1]):
        for k in range(0, shape[0], m):
            col = d[k:k + m, j]
            idx = [i for i in np.argsort(-np.abs(col), kind="stable") if col[i] != 0][:n]
            want[k + np.array(idx, int), j] = col[idx] if idx else 0
    np.testing.assert_array_equal(got, want)
    assert violations(apply_keep(w, keep), NMStructure(n, m, False)) == 0 == dense_violations(got, n, m, False)


def greedy_reference(d: np.ndarray, n: int, m: int) -> np.ndarray:
    """The paper's greedy, block by block, on a dense array (ties: lower row, then column)."""
    out = np.zeros_like(d)
    for k in range(0, d.shape[0], m):
        for l in range(0, d.shape[1], m):
            blk = d[k:k + m, l:l + m]
            cand = [(-abs(blk[i, j]), i, j) for i in range(blk.shape[0]) for j in range(blk.shape[1]) if blk[i, j] != 0]
            rows, cols = np.zeros(m, int), np.zeros(m, int)
            for _, i, j in sorted(cand):
                if rows[i] < n and cols[j] < n:
                    rows[i] += 1
                    cols[j] += 1
                    out[k + i, l + j] = blk[i, j]
    return out


@pytest.mark.parametrize("shape", [(12, 9), (10, 7), (16, 16), (3, 30)])
@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (2, 3), (3, 8)])
def test_greedy_matches_reference_and_is_transposable(shape: tuple[int, int], nm: tuple[int, int]) -> None:
    n, m = nm
    rng = np.random.default_rng(hash((shape, nm, 1)) % 2**32)
    w = random_csr(rng, *shape, density=0.8)
    w.data[::4] = w.data[1]  # ties
    keep = transposable_greedy_keep(w, n, m)
    got = kept_dense(w, keep)
    np.testing.assert_array_equal(got, greedy_reference(w.toarray(), n, m))
    assert dense_violations(got, n, m, True) == 0
    assert violations(apply_keep(w, keep), NMStructure(n, m, True)) == 0
    assert violations(apply_keep(w, keep).T.tocsr(), NMStructure(n, m, True)) == 0  # W^T too


def brute_force_best(block: np.ndarray, n: int) -> float:
    """Largest retained |w| of a transposable mask of one block, by trying every subset."""
    entries = [(i, j, abs(float(block[i, j]))) for i in range(block.shape[0]) for j in range(block.shape[1])
               if block[i, j] != 0]
    best = 0.0
    for r in range(len(entries) + 1):
        for sub in itertools.combinations(entries, r):
            rows = np.bincount([e[0] for e in sub], minlength=block.shape[0])
            cols = np.bincount([e[1] for e in sub], minlength=block.shape[1])
            if (rows <= n).all() and (cols <= n).all():
                best = max(best, sum(e[2] for e in sub))
    return best


@pytest.mark.parametrize("n,m", [(1, 3), (2, 3), (1, 4), (2, 4)])
def test_exact_equals_brute_force_on_tiny_blocks(n: int, m: int) -> None:
    rng = np.random.default_rng(7 + 10 * n + m)
    for trial in range(12):
        density = 0.45 if m == 4 else 0.8
        w = random_csr(rng, m, m, density)
        if w.nnz > 11:  # keep the enumeration small
            continue
        keep = transposable_exact_keep(w, n, m)
        got = np.abs(w.data[keep]).astype(np.float64).sum()
        assert got == pytest.approx(brute_force_best(w.toarray(), n), rel=1e-9, abs=1e-12)
        assert violations(apply_keep(w, keep), NMStructure(n, m, True)) == 0


def test_exact_on_a_layer_equals_per_block_brute_force_and_batching_does_not_matter() -> None:
    rng = np.random.default_rng(3)
    w = random_csr(rng, 11, 10, 0.35)  # padded edge blocks on both axes
    keep = transposable_exact_keep(w, 2, 4)
    keep_small_batches = transposable_exact_keep(w, 2, 4, max_variables=5)
    d = w.toarray()
    want = sum(brute_force_best(d[k:k + 4, l:l + 4], 2) for k in range(0, 11, 4) for l in range(0, 10, 4))
    for kp in (keep, keep_small_batches):
        assert np.abs(w.data[kp]).astype(np.float64).sum() == pytest.approx(want, rel=1e-9)
        assert violations(apply_keep(w, kp), NMStructure(2, 4, True)) == 0


def test_greedy_is_within_half_of_the_optimum(capsys: pytest.CaptureFixture[str]) -> None:
    """The 2-approximation bound, on 600 random blocks (dense and sparse, several N:M); the
    mean ratio is printed (run with -s to see it)."""
    rng = np.random.default_rng(11)
    ratios = {}
    for n, m in [(2, 4), (1, 4), (4, 8)]:
        r = []
        for _ in range(200):
            w = random_csr(rng, m, m, rng.uniform(0.3, 1.0))
            if w.nnz == 0:
                continue
            g = np.abs(w.data[transposable_greedy_keep(w, n, m)]).astype(np.float64).sum()
            x = np.abs(w.data[transposable_exact_keep(w, n, m)]).astype(np.float64).sum()
            assert x >= g - 1e-9 * x  # the exact solution is never worse
            assert g >= 0.5 * x - 1e-12
            r.append(g / x)
        ratios[f"{n}:{m}"] = (float(np.mean(r)), float(np.min(r)))
    with capsys.disabled():
        print(f"\ngreedy / exact retained L1 over random blocks (mean, min): {ratios}")


def test_greedy_can_be_suboptimal_and_exact_finds_the_optimum() -> None:
    # 1:2 block [[3, 2], [2, 0]]: greedy keeps 3 and then nothing fits (row 0 and column 0 are
    # full), retaining 3; the optimum keeps both 2s, retaining 4.
    w = sp.csr_matrix(np.array([[3.0, 2.0], [2.0, 0.0]], np.float32))
    assert np.abs(w.data[transposable_greedy_keep(w, 1, 2)]).sum() == 3.0
    assert np.abs(w.data[transposable_exact_keep(w, 1, 2)]).sum() == 4.0


def test_apply_keep_retained_fraction_and_edge_cases() -> None:
    rng = np.random.default_rng(9)
    w = random_csr(rng, 10, 6, 0.5)
    keep = rng.random(w.nnz) < 0.5
    out = apply_keep(w, keep)
    out.check_format(full_check=True)
    np.testing.assert_array_equal(out.toarray(), np.where(
        sp.csr_matrix((keep.astype(np.float32), w.indices, w.indptr), shape=w.shape).toarray() > 0, w.toarray(), 0))
    assert retained_l1_fraction(w, keep) == pytest.approx(np.abs(w.data[keep]).sum() / np.abs(w.data).sum())
    empty = sp.csr_matrix((5, 7), dtype=np.float32)
    for f in (nm_keep, transposable_greedy_keep, transposable_exact_keep):
        assert f(empty, 2, 4).shape == (0,)
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_keep(w, 4, 4)
