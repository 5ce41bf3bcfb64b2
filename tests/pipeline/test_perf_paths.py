"""The fast paths of issue #5 give the results of the plain computations they replace."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest

from napari_diffcut.core import ncut, upsample, walk
from napari_diffcut.core.hierarchy import build_tree
from napari_diffcut.core.ncut import bipartition, fiedler_vector, ncut_cost, sweep_cut
from napari_diffcut.testing import planted_transition


def random_affinity(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.random((n, n)) ** 4  # uneven weights, so that the best split is unique
    return x + x.T


def reference_sweep(w: np.ndarray, z: np.ndarray, min_size: int) -> tuple[np.ndarray, float]:
    """The plain O(n^2)-memory sweep: NCut of every prefix of the sorted Fiedler vector."""
    order = np.argsort(-z, kind="stable")
    n = z.size
    costs = [
        ncut_cost(w, np.isin(np.arange(n), order[:j])) if min_size <= j <= n - min_size else np.inf
        for j in range(1, n + 1)
    ]
    j = int(np.argmin(costs))
    return np.isin(np.arange(n), order[: j + 1]), costs[j]


@pytest.mark.parametrize("n", [300, 517])  # blocked sweep, with a partial last block
def test_blocked_sweep_equals_plain_sweep(rng: np.random.Generator, n: int) -> None:
    assert n > ncut.SWEEP_GATHER_MAX
    w = random_affinity(rng, n)
    z = rng.normal(size=n)
    mask, cost = sweep_cut(w, w.sum(1), z, min_size=7)
    ref_mask, ref_cost = reference_sweep(w, z, 7)
    np.testing.assert_array_equal(mask, ref_mask)
    assert cost == pytest.approx(ref_cost, rel=1e-10)


def test_float32_graph_gives_the_float64_split(rng: np.random.Generator) -> None:
    """The tree's float32 products: same split, cost within float32 rounding."""
    w = planted_transition((20, 20), (np.mgrid[:20, :20][1] > 8).astype(int), seed=2)
    w = walk.walk_affinity(w)
    a64 = bipartition(w, min_size=4)
    a32 = bipartition(w.astype(np.float32), min_size=4)
    np.testing.assert_array_equal(a32.mask, a64.mask)
    assert a32.cost == pytest.approx(a64.cost, rel=1e-5)
    assert a32.cost == pytest.approx(ncut_cost(w, a32.mask), rel=1e-5)


def test_dense_and_lanczos_fiedler_agree(rng: np.random.Generator) -> None:
    w = random_affinity(rng, ncut.DENSE_MAX + 40)
    d = w.sum(1)
    z_lanczos, lam_lanczos = fiedler_vector(w, d)
    z_dense = ncut._top_eigenvector(
        w / np.sqrt(np.outer(d, d)) - np.outer(np.sqrt(d), np.sqrt(d)) / d.sum()
    ) / np.sqrt(d)
    z_dense *= np.sign(z_dense[np.argmax(np.abs(z_dense))])
    np.testing.assert_allclose(
        z_lanczos / np.linalg.norm(z_lanczos), z_dense / np.linalg.norm(z_dense), atol=1e-5
    )
    assert 0 < lam_lanczos < 1


def test_single_thread_blas_without_threadpoolctl(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_threadpoolctl(name: str, *args: object, **kwargs: object) -> object:
        if name == "threadpoolctl":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_threadpoolctl)
    with ncut.single_thread_blas()():
        assert np.ones((3, 3)) @ np.ones(3) == pytest.approx([3, 3, 3])


def test_single_thread_blas_limits_and_restores() -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads() -> list[int]:
        info = threadpoolctl.threadpool_info()
        return [i["num_threads"] for i in info if i["user_api"] == "blas"]

    before = blas_threads()
    with ncut.single_thread_blas()():
        inside = blas_threads()
    after = blas_threads()
    assert all(t == 1 for t in inside)
    assert after == before


def test_tree_accepts_float64_and_float32_alike(quadrant_transition: np.ndarray) -> None:
    w = walk.walk_affinity(quadrant_transition)
    t64 = build_tree(w, min_size=8)
    t32 = build_tree(w.astype(np.float32), min_size=8)
    np.testing.assert_array_equal(t64.leaf_of_patch, t32.leaf_of_patch)
    np.testing.assert_allclose(t64.cost, t32.cost, rtol=1e-6)


# -- walk ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [70, 300, 513])  # one tile, several, a partial last tile
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_symmetric_flow(rng: np.random.Generator, n: int, dtype: type) -> None:
    p = rng.random((n, n)).astype(np.float32)
    p /= p.sum(1, keepdims=True)
    pi = rng.random(n)
    w = walk._symmetric_flow(p, pi, dtype)
    flow = p.astype(np.float64) * pi[:, None]
    assert w.dtype == dtype
    np.testing.assert_array_equal(w, w.T)  # exactly symmetric
    np.testing.assert_allclose(w, (flow + flow.T) / 2, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_stationary_distribution_float32_path_matches_float64() -> None:
    n = walk.FLOAT32_MIN_NODES
    side = int(math.isqrt(n))
    regions = (np.mgrid[:side, :side][0] > side // 2).astype(int)
    p = planted_transition((side, side), regions, seed=3)
    pi32 = walk.stationary_distribution(p)  # float32 products
    pi64 = walk.stationary_distribution(p.astype(np.float64))  # float64 Arnoldi
    np.testing.assert_allclose(pi32, pi64, rtol=1e-4)
    np.testing.assert_allclose(pi32 @ p.astype(np.float64), pi32, rtol=1e-4)


def test_aggregate_in_place_lift_equals_explicit_lift(rng: np.random.Generator) -> None:
    def softmax_rows(n: int) -> np.ndarray:
        e = np.exp(rng.normal(size=(n, n)))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    grids = {(8, 12): softmax_rows(96), (4, 6): softmax_rows(24), (2, 3): softmax_rows(6)}
    weights = {(8, 12): 0.5, (4, 6): 0.3, (2, 3): 0.2}
    p = walk.aggregate_attention(grids, weights)
    expected = sum(w * walk.lift_attention(grids[g], g, (8, 12)) for g, w in weights.items())
    np.testing.assert_allclose(p, expected, atol=1e-6)


# -- upsampling ---------------------------------------------------------------------------
def dense_argmax(maps: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Every region at every pixel: the computation the fast path must reproduce."""
    _, h, w = maps.shape
    y0, y1, wy = upsample._bilinear_taps(out_shape[0], h)
    x0, x1, wx = upsample._bilinear_taps(out_shape[1], w)
    a = wy[None, :, None]
    my = (1 - a) * maps[:, y0, :] + a * maps[:, y1, :]
    return np.argmax((1 - wx) * my[:, :, x0] + wx * my[:, :, x1], axis=0)


@pytest.mark.parametrize("out_shape", [(512, 512), (300, 700), (97, 1200), (20, 30)])
def test_pruned_upsampling_equals_dense(
    rng: np.random.Generator, out_shape: tuple[int, int]
) -> None:
    # Smooth maps with region structure, like mean walk rows of tree leaves.
    k, h, w = 40, 32, 32
    cy, cx = (rng.uniform(0, 32, (2, k)))[:, :, None, None]
    yy, xx = np.mgrid[:h, :w]
    maps = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30)
    maps = (maps * rng.uniform(0.5, 1.5, (k, 1, 1))).astype(np.float32)
    assert k * out_shape[0] * out_shape[1] > upsample.DENSE_ELEMENTS or out_shape == (20, 30)
    fast = upsample.upsample_argmax(maps, out_shape, max_elements=1 << 16)
    np.testing.assert_array_equal(fast, dense_argmax(maps, out_shape))


def test_pruned_upsampling_keeps_first_index_on_ties() -> None:
    maps = np.zeros((3, 4, 4), np.float32)
    maps[1] = maps[2] = 1.0  # regions 1 and 2 tie everywhere: argmax picks 1
    maps[0, :2] = 2.0
    out = upsample.upsample_argmax(maps, (2048, 2048))
    np.testing.assert_array_equal(out, dense_argmax(maps, (2048, 2048)))
