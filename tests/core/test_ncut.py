"""Cut: one two-way Normalized Cut."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.core.ncut import bipartition, fiedler_vector, ncut_cost, sweep_cut


def block_affinity(sizes: list[int], inside: float = 1.0, between: float = 0.01) -> np.ndarray:
    n = sum(sizes)
    w = np.full((n, n), between)
    start = 0
    for s in sizes:
        w[start : start + s, start : start + s] = inside
        start += s
    return w


@pytest.mark.parametrize("n", [40, 300])  # dense eigh path and Lanczos path
def test_bipartition_finds_blocks(n: int) -> None:
    w = block_affinity([n // 4, n - n // 4])
    part = bipartition(w, seed=0)
    labels = part.mask.astype(int)
    assert len(np.unique(labels[: n // 4])) == 1
    assert len(np.unique(labels[n // 4 :])) == 1
    assert labels[0] != labels[-1]
    assert part.cost == pytest.approx(ncut_cost(w, part.mask))
    assert part.cost < 0.1
    assert part.eigenvalue <= part.cost + 1e-9  # relaxation lower bound


def test_fiedler_solves_generalised_problem(rng: np.random.Generator) -> None:
    x = rng.random((200, 200))
    w = x + x.T
    d = w.sum(1)
    z, lam = fiedler_vector(w, d, seed=1)
    np.testing.assert_allclose((np.diag(d) - w) @ z, lam * d * z, atol=1e-6 * np.abs(d * z).max())
    assert z[np.argmax(np.abs(z))] > 0  # sign rule


def test_sweep_is_exact_minimum(rng: np.random.Generator) -> None:
    x = rng.random((30, 30))
    w = x + x.T
    d = w.sum(1)
    z = rng.normal(size=30)
    mask, cost = sweep_cut(w, d, z, min_size=3)
    order = np.argsort(-z)
    best = min(ncut_cost(w, np.isin(np.arange(30), order[:j])) for j in range(3, 28))
    assert cost == pytest.approx(best)
    assert 3 <= mask.sum() <= 27


def test_min_size_respected() -> None:
    w = block_affinity([2, 50])
    part = bipartition(w, min_size=10)
    assert min(part.mask.sum(), (~part.mask).sum()) >= 10


def test_seeded_result_is_reproducible(rng: np.random.Generator) -> None:
    x = rng.random((150, 150))
    w = x + x.T
    a, b = bipartition(w, seed=3), bipartition(w, seed=3)
    np.testing.assert_array_equal(a.mask, b.mask)


@pytest.mark.parametrize("n", [40, 400])
def test_disconnected_parts_are_split_exactly(rng: np.random.Generator, n: int) -> None:
    """Eigenvalue 1 is degenerate here; deflation must still find the zero-cost split."""
    half = n // 2
    x = rng.random((half, half))
    block = x + x.T + 1.0
    w = np.zeros((n, n))
    w[:half, :half] = block
    w[half:, half:] = block[::-1, ::-1]
    part = bipartition(w, seed=0)
    assert part.cost == pytest.approx(0.0, abs=1e-9)
    assert part.mask[:half].all() != part.mask[half:].all()
    assert len(np.unique(part.mask[:half])) == 1 and len(np.unique(part.mask[half:])) == 1


def test_index_equals_the_gathered_sub_graph(rng: np.random.Generator) -> None:
    """``index``: the same Fiedler vector, split and cost as on ``W[index][:, index]``."""
    from napari_diffcut.core.ncut import restrict, restricted_degree

    w = block_affinity([60, 140], between=0.05) + 0.02 * rng.random((200, 200))
    w = ((w + w.T) / 2).astype(np.float32)
    idx = np.flatnonzero(rng.random(200) < 0.9)
    sub = restrict(w, idx)
    np.testing.assert_array_equal(sub, w[np.ix_(idx, idx)])
    degree = sub.sum(axis=1, dtype=np.float64)
    np.testing.assert_allclose(
        restricted_degree(w, idx, w.sum(axis=1, dtype=np.float64)), degree, rtol=1e-12
    )
    z, lam = fiedler_vector(sub, degree, seed=3)
    z_i, lam_i = fiedler_vector(w, degree, seed=3, index=idx)
    np.testing.assert_allclose(z_i, z, rtol=1e-5, atol=1e-8 * np.abs(z).max())
    assert lam_i == pytest.approx(lam, rel=1e-6)
    mask, cost = sweep_cut(sub, degree, z, 4)
    mask_i, cost_i = sweep_cut(w, degree, z, 4, index=idx)
    np.testing.assert_array_equal(mask_i, mask)
    assert cost_i == pytest.approx(cost, rel=1e-6)
