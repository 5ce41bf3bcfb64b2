"""Walk in torch against the numpy path: aggregation, pi, power walk, graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffcut.accel.walk import (
    aggregate_attention_torch,
    build_affinity_torch,
    power_walk_torch,
    similarity_affinity_torch,
    stationary_distribution_torch,
    walk_affinity_torch,
)
from napari_diffcut.core.walk import (
    aggregate_attention,
    power_walk,
    similarity_affinity,
    stationary_distribution,
    walk_affinity,
)


def _softmax_rows(rng: np.random.Generator, n: int, scale: float = 3.0) -> np.ndarray:
    x = np.exp(scale * rng.normal(size=(n, n))).astype(np.float32)
    return x / x.sum(1, keepdims=True)


def test_aggregation_matches_numpy(rng: np.random.Generator) -> None:
    per_res = {
        (16, 12): _softmax_rows(rng, 192),
        (8, 6): _softmax_rows(rng, 48),
        (4, 3): _softmax_rows(rng, 12),
    }
    weights = {(16, 12): 0.5, (8, 6): 0.3, (4, 3): 0.2}
    for w in (None, weights):
        ref = aggregate_attention(per_res, w)
        out = aggregate_attention_torch({g: torch.from_numpy(a) for g, a in per_res.items()}, w)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-8)


def test_aggregation_accepts_numpy_and_checks_weights(rng: np.random.Generator) -> None:
    per_res = {(8, 8): _softmax_rows(rng, 64), (4, 4): _softmax_rows(rng, 16)}
    out = aggregate_attention_torch(per_res)
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="weights"):
        aggregate_attention_torch(per_res, {(8, 8): -1.0, (4, 4): 0.5})
    with pytest.raises(ValueError, match="empty"):
        aggregate_attention_torch({})
    with pytest.raises(ValueError, match="divide"):
        aggregate_attention_torch({(9, 9): _softmax_rows(rng, 81), (4, 4): per_res[(4, 4)]})


def _exact_pi(p: np.ndarray) -> np.ndarray:
    """pi (I - P) = 0 with sum(pi) = 1 replacing one equation: a direct float64 solve."""
    n = p.shape[0]
    a = np.eye(n) - p.astype(np.float64).T
    a[-1] = 1.0
    rhs = np.zeros(n)
    rhs[-1] = 1.0
    return np.linalg.solve(a, rhs)


def test_stationary_distribution_is_exact(planted: tuple) -> None:
    _, _, p = planted
    pi = stationary_distribution_torch(torch.from_numpy(p))
    assert pi.dtype == torch.float64
    exact = _exact_pi(p)
    np.testing.assert_allclose(pi.numpy(), exact, rtol=1e-6, atol=0)
    # The numpy path multiplies in float32 from 1024 nodes on: it agrees to ~1e-5.
    np.testing.assert_allclose(pi.numpy(), stationary_distribution(p), rtol=1e-4)


def test_stationary_distribution_slow_mixing() -> None:
    # A lazy, drifting ring walk: second eigenvalue 1 - 2.3e-4. An explicitly
    # restarted Arnoldi stalls here (residual stuck at 2e-4 after 200 cycles);
    # the Krylov-Schur restart converges.
    n = 200
    p = np.zeros((n, n), np.float64)
    idx = np.arange(n)
    p[idx, idx] = 0.5
    p[idx, (idx + 1) % n] = 0.35
    p[idx, (idx - 1) % n] = 0.15
    p[0, 0], p[0, 1] = 0.55, 0.3  # break the uniform solution
    pi = stationary_distribution_torch(torch.from_numpy(p))
    np.testing.assert_allclose(pi.numpy(), _exact_pi(p), rtol=1e-8)


@pytest.mark.parametrize("power", [1, 2, 3, 8])
def test_power_walk_matches_numpy(rng: np.random.Generator, power: int) -> None:
    p = _softmax_rows(rng, 100, 1.0)
    np.testing.assert_allclose(
        power_walk_torch(torch.from_numpy(p), power).numpy(), power_walk(p, power), rtol=1e-4
    )
    with pytest.raises(ValueError, match="power"):
        power_walk_torch(torch.from_numpy(p), 0)


def test_walk_affinity_matches_numpy_and_is_symmetric(planted: tuple) -> None:
    _, _, p = planted
    w = walk_affinity_torch(torch.from_numpy(p))
    assert w.dtype == torch.float32
    assert torch.equal(w, w.T)  # exactly symmetric
    ref = walk_affinity(p, dtype=np.float32)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-4, atol=1e-12)
    # Row sums are pi (method.md 3.1): the degrees are the stationary distribution.
    pi = stationary_distribution_torch(torch.from_numpy(p)).numpy()
    np.testing.assert_allclose(w.sum(1, dtype=torch.float64).numpy(), pi, rtol=1e-5)


def test_similarity_affinity_matches_numpy(rng: np.random.Generator) -> None:
    p = _softmax_rows(rng, 120)
    w = similarity_affinity_torch(torch.from_numpy(p))
    np.testing.assert_allclose(w.numpy(), similarity_affinity(p, dtype=np.float32), atol=1e-6)
    assert float(w.min()) >= 0 and float(w.max()) <= 1


def test_build_affinity_checks_its_input(rng: np.random.Generator) -> None:
    p = torch.from_numpy(_softmax_rows(rng, 30))
    w, walk = build_affinity_torch(p, power=2, graph="similarity")
    assert w.shape == walk.shape == (30, 30)
    with pytest.raises(ValueError, match="graph"):
        build_affinity_torch(p, graph="nope")
    with pytest.raises(ValueError, match="row-stochastic"):
        build_affinity_torch(p * 2)
    with pytest.raises(ValueError, match="square"):
        build_affinity_torch(p[:, :10])


def test_aggregation_onto_an_uncaptured_fine_grid(rng: np.random.Generator) -> None:
    # A zero weight on the latent grid leaves it uncaptured; the graph stays on it (engine).
    per_res = {(8, 6): _softmax_rows(rng, 48), (4, 3): _softmax_rows(rng, 12)}
    weights = {(16, 12): 0.0, (8, 6): 0.7, (4, 3): 0.3}
    ref = aggregate_attention(per_res, weights, fine_grid=(16, 12))
    out = aggregate_attention_torch(per_res, weights, fine_grid=(16, 12))
    assert out.shape == (192, 192)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="no attention was captured"):
        aggregate_attention_torch(per_res, {(16, 12): 1.0}, fine_grid=(16, 12))
