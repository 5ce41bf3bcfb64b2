"""Walk: aggregation across resolutions, stationary distribution, power walks, graphs."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.core.walk import (
    aggregate_attention,
    build_affinity,
    check_resolution_weights,
    check_transition,
    default_factor_weights,
    interpolation_matrix,
    lift_attention,
    power_walk,
    similarity_affinity,
    stationary_distribution,
    walk_affinity,
)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("n_out", "n_in"), [(8, 4), (5, 3), (4, 4), (3, 7)])
def test_interpolation_matrix_rows_sum_to_one(n_out: int, n_in: int) -> None:
    m = interpolation_matrix(n_out, n_in)
    assert m.shape == (n_out, n_in)
    np.testing.assert_allclose(m.sum(1), 1, atol=1e-6)


def test_interpolation_matches_torch_bilinear(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    x = rng.random((3, 5)).astype(np.float32)
    ours = interpolation_matrix(6, 3) @ x @ interpolation_matrix(10, 5).T
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], size=(6, 10), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_lift_attention_is_row_stochastic_and_tiles_queries(rng: np.random.Generator) -> None:
    coarse = softmax_rows(rng.normal(size=(6, 6)))  # grid (2, 3)
    lifted = lift_attention(coarse, (2, 3), (4, 6))
    assert lifted.shape == (24, 24)
    np.testing.assert_allclose(lifted.sum(1), 1, atol=1e-5)
    grid_rows = lifted.reshape(4, 6, 24)
    # Fine queries (0, 0), (0, 1), (1, 0), (1, 1) all copy coarse query (0, 0).
    for y, x in [(0, 1), (1, 0), (1, 1)]:
        np.testing.assert_array_equal(grid_rows[y, x], grid_rows[0, 0])
    assert not np.allclose(grid_rows[0, 0], grid_rows[0, 2])


def test_lift_attention_rejects_non_dividing_grids(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="does not divide"):
        lift_attention(softmax_rows(rng.normal(size=(6, 6))), (2, 3), (5, 6))


def test_aggregate_is_weighted_mean(rng: np.random.Generator) -> None:
    fine = softmax_rows(rng.normal(size=(16, 16)))
    coarse = softmax_rows(rng.normal(size=(4, 4)))
    p = aggregate_attention({(4, 4): fine, (2, 2): coarse}, {(4, 4): 3.0, (2, 2): 1.0})
    expected = (3 * fine + lift_attention(coarse, (2, 2), (4, 4))) / 4
    np.testing.assert_allclose(p, expected, atol=1e-6)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


def test_aggregate_default_weights_proportional_to_side(rng: np.random.Generator) -> None:
    fine = softmax_rows(rng.normal(size=(16, 16)))
    coarse = softmax_rows(rng.normal(size=(4, 4)))
    p = aggregate_attention({(4, 4): fine, (2, 2): coarse})
    expected = (4 * fine + 2 * lift_attention(coarse, (2, 2), (4, 4))) / 6
    np.testing.assert_allclose(p, expected, atol=1e-6)


def test_aggregate_errors() -> None:
    with pytest.raises(ValueError, match="no self-attention"):
        aggregate_attention({})
    with pytest.raises(ValueError, match="weights"):
        aggregate_attention({(2, 2): np.eye(4, dtype=np.float32)}, {(2, 2): -1.0})


def test_aggregate_lifts_to_the_given_fine_grid(rng: np.random.Generator) -> None:
    """Issue 14: no captured grid at the caller's grid; every one is lifted onto it."""
    mid = softmax_rows(rng.normal(size=(16, 16)))  # (4, 4)
    coarse = softmax_rows(rng.normal(size=(4, 4)))  # (2, 2)
    p = aggregate_attention(
        {(4, 4): mid, (2, 2): coarse}, {(8, 8): 0.0, (4, 4): 1.0, (2, 2): 1.0}, fine_grid=(8, 8)
    )
    expected = (lift_attention(mid, (4, 4), (8, 8)) + lift_attention(coarse, (2, 2), (8, 8))) / 2
    assert p.shape == (64, 64)
    np.testing.assert_allclose(p, expected, atol=1e-6)
    only = aggregate_attention({(4, 4): mid}, fine_grid=(8, 8))
    np.testing.assert_allclose(only, lift_attention(mid, (4, 4), (8, 8)), atol=1e-6)
    same = aggregate_attention({(4, 4): mid, (2, 2): coarse}, fine_grid=(4, 4))
    np.testing.assert_allclose(same, aggregate_attention({(4, 4): mid, (2, 2): coarse}))


def test_aggregate_fine_grid_errors(rng: np.random.Generator) -> None:
    mid = softmax_rows(rng.normal(size=(16, 16)))
    with pytest.raises(ValueError, match="does not divide"):
        aggregate_attention({(4, 4): mid}, fine_grid=(2, 2))  # captured finer than the target
    with pytest.raises(ValueError, match="does not divide"):
        aggregate_attention({(4, 4): mid}, fine_grid=(6, 8))
    with pytest.raises(ValueError, match=r"no attention was captured"):
        aggregate_attention({(4, 4): mid}, {(4, 4): 1.0, (8, 8): 1.0}, fine_grid=(8, 8))


def test_default_factor_weights_follow_diffseg() -> None:
    w = default_factor_weights([8, 1, 4, 2])
    assert list(w) == [1, 2, 4, 8]
    np.testing.assert_allclose(list(w.values()), [8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert default_factor_weights([2, 4]) == pytest.approx({2: 2 / 3, 4: 1 / 3})


def test_check_resolution_weights() -> None:
    assert check_resolution_weights(None, (2, 4)) == pytest.approx({2: 2 / 3, 4: 1 / 3})
    assert check_resolution_weights({1: 0.0, 2: 1.0}, (1, 2, 4, 8)) == {
        1: 0.0, 2: 1.0, 4: 0.0, 8: 0.0
    }
    assert check_resolution_weights({1: 0.0, 2: 1.0, 8: 0.0}, (2, 4)) == {2: 1.0, 4: 0.0}
    with pytest.raises(ValueError, match=r"factor\(s\) \[1\].*\[2, 4\]"):
        check_resolution_weights({1: 1.0, 2: 1.0}, (2, 4))
    with pytest.raises(ValueError, match="no positive weight"):
        check_resolution_weights({2: 0.0}, (2, 4))
    with pytest.raises(ValueError, match=">= 0"):
        check_resolution_weights({2: -1.0}, (2, 4))
    with pytest.raises(ValueError, match="no self-attention"):
        check_resolution_weights(None, ())


def test_stationary_distribution(rng: np.random.Generator) -> None:
    p = softmax_rows(rng.normal(size=(100, 100)) * 3)
    pi = stationary_distribution(p)
    np.testing.assert_allclose(pi @ p, pi, atol=1e-8)
    assert pi.min() > 0
    assert pi.sum() == pytest.approx(1)


def test_power_walk_matches_matrix_power(rng: np.random.Generator) -> None:
    p = softmax_rows(rng.normal(size=(30, 30)))
    for k in (1, 2, 3, 5):
        np.testing.assert_allclose(
            power_walk(p, k), np.linalg.matrix_power(p.astype(np.float64), k), atol=1e-5
        )
    with pytest.raises(ValueError, match="power"):
        power_walk(p, 0)


def test_walk_affinity_ncut_equals_escape_probability(rng: np.random.Generator) -> None:
    """S1 symmetrisation: row sums equal pi, the cut equals the stationary flow (method.md 3.1)."""
    p = softmax_rows(rng.normal(size=(40, 40)) * 2)
    w = walk_affinity(p)
    pi = stationary_distribution(p)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w.sum(1), pi, atol=1e-8)
    a = np.zeros(40, bool)
    a[:15] = True
    flow_ab = (pi[a][:, None] * p[np.ix_(a, ~a)]).sum()
    escape = flow_ab / pi[a].sum() + flow_ab / pi[~a].sum()
    cut = w[np.ix_(a, ~a)].sum()
    assert cut / w[a].sum() + cut / w[~a].sum() == pytest.approx(escape, rel=1e-6)


def test_similarity_affinity_is_cosine(rng: np.random.Generator) -> None:
    p = softmax_rows(rng.normal(size=(20, 20)))
    w = similarity_affinity(p)
    np.testing.assert_allclose(np.diag(w), 1, atol=1e-5)
    f = p / np.linalg.norm(p, axis=1, keepdims=True)
    np.testing.assert_allclose(w, f @ f.T, atol=1e-5)


def test_build_affinity_validates(rng: np.random.Generator) -> None:
    p = softmax_rows(rng.normal(size=(10, 10)))
    with pytest.raises(ValueError, match="graph must be one of"):
        build_affinity(p, graph="knn")
    with pytest.raises(ValueError, match="row-stochastic"):
        check_transition(p * 2)
    with pytest.raises(ValueError, match="square"):
        check_transition(p[:5])
    w, walk = build_affinity(p, power=2)
    np.testing.assert_allclose(walk, p.astype(np.float64) @ p, atol=1e-5)


@pytest.mark.parametrize("coupling", [1e-5, 1e-7])
def test_stationary_distribution_nearly_reducible_float32(
    rng: np.random.Generator, coupling: float
) -> None:
    """Weakly joined parts: float32 products alone get their masses wrong by O(1) (issue 11)."""
    n, a = 1024, 300
    k = rng.random((n, n))
    k = k + k.T  # reversible: pi is proportional to the row sums of k
    k[:a, a:] *= coupling
    k[a:, :a] *= coupling
    k[:a, :a] *= 3.0
    exact = k.sum(1) / k.sum()
    p = (k / k.sum(1, keepdims=True)).astype(np.float32)
    pi = stationary_distribution(p)
    np.testing.assert_allclose(pi, exact, rtol=1e-3)
    # float32 products alone: 1.4 % and 97 % off.
    assert pi[:a].sum() == pytest.approx(exact[:a].sum(), rel=1e-3)
