"""The content-free null graph and the automatic cut on null and planted graphs (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from napari_diffcut.core.hierarchy import Hierarchy, build_tree, ncut_hierarchy
from napari_diffcut.core.ncut import ncut_cost
from napari_diffcut.core.null import null_affinity, null_model, offset_kernel
from napari_diffcut.core.pixels import pixel_transition
from napari_diffcut.core.walk import build_affinity, walk_affinity
from napari_diffcut.testing import planted_transition

GRID = (32, 32)


def _auto_segments(transition: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    return ncut_hierarchy(transition, grid, min_size=8).labels


def test_kernel_of_translation_invariant_graph_is_recovered() -> None:
    h, w = 6, 5
    yy, xx = np.divmod(np.arange(h * w), w)
    d2 = (yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2
    graph = np.exp(-d2 / 3.0)
    kernel = offset_kernel(graph, (h, w))
    assert kernel.shape == (2 * h - 1, 2 * w - 1)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1])
    # Offsets farther apart carry less mean transition.
    assert kernel[h - 1, w - 1] > kernel[h - 1, w] > kernel[h - 1, w + 1]


def test_fft_null_cost_matches_dense_null_graph() -> None:
    rng = np.random.default_rng(3)
    p = planted_transition((12, 10), np.zeros((12, 10), int), seed=2)
    w = walk_affinity(p)
    model = null_model(w, (12, 10))
    dense = null_affinity(model.kernel, (12, 10), np.float64)
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    node = rng.random(120) < 0.7
    side = rng.random(120) < 0.5
    a, b = node & side, node & ~side
    expected = ncut_cost(dense[np.ix_(node, node)], side[node])
    assert model.ncut(a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("graph", ["walk", "similarity"])
def test_local_structureless_walk_gives_one_segment(graph: str) -> None:
    # Softmax of a Gaussian in patch distance plus noise: locality, no regions.
    p = planted_transition(GRID, np.zeros(GRID, int), strength=0.0, seed=4)
    labels = ncut_hierarchy(p, GRID, min_size=8, graph=graph).labels
    assert len(np.unique(labels)) == 1


@pytest.mark.parametrize("kind", ["constant", "noise"])
@pytest.mark.parametrize("global_weight", [0.0, 0.2])
def test_pixels_null_images_give_one_segment(kind: str, global_weight: float) -> None:
    rng = np.random.default_rng(5)
    if kind == "constant":
        rgb = np.full((256, 256, 3), 0.4, np.float32)
    else:
        rgb = rng.random((256, 256, 3)).astype(np.float32)
    p = pixel_transition(rgb, GRID, global_weight=global_weight)
    assert len(np.unique(_auto_segments(p, GRID))) == 1


def test_pixels_two_regions_are_split_at_auto() -> None:
    rgb = np.full((256, 256, 3), 0.2, np.float32)
    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 128) ** 2 + (xx - 150) ** 2 < 60**2
    rgb[disc] = 0.8
    labels = _auto_segments(pixel_transition(rgb, GRID), GRID)
    truth = np.asarray(
        [[disc[y * 8 + 4, x * 8 + 4] for x in range(32)] for y in range(32)], int
    )
    assert adjusted_rand_score(truth.ravel(), labels.ravel()) >= 0.9


def test_planted_local_graph_is_recovered_at_auto() -> None:
    yy, xx = np.mgrid[:32, :32]
    regions = (yy > 16).astype(int) * 2 + (xx > 10) + ((yy - 8) ** 2 + (xx - 22) ** 2 < 25) * 4
    p = planted_transition(GRID, regions, seed=1)
    labels = _auto_segments(p, GRID)
    assert adjusted_rand_score(regions.ravel(), labels.ravel()) >= 0.95


def test_auto_is_per_node_and_numeric_cut_still_works() -> None:
    p = planted_transition(GRID, np.zeros(GRID, int), strength=0.0, seed=4)
    affinity, _ = build_affinity(p, dtype=np.float32)
    tree = build_tree(affinity, min_size=8, grid_shape=GRID)
    h = Hierarchy(tree, GRID)
    assert tree.null_cost is not None and np.isfinite(tree.null_cost[0])
    ratio = h.null_ratio
    assert ratio is not None and ratio[0] > 0.5  # a tiling split is explained by locality
    # The cheap spatial splits are still in the tree: a numeric cut reaches them.
    assert len(np.unique(h.cut(1.0))) > 1
    assert len(np.unique(h.cut("auto"))) == 1
    assert len(np.unique(h.cut(h.auto_threshold))) == 1  # root cost: nothing below it
    # Without a grid the tree has no null costs and "auto" falls back to Otsu.
    plain = Hierarchy(build_tree(affinity, min_size=8), GRID)
    assert plain.null_ratio is None and np.isfinite(plain.auto_threshold)


@pytest.mark.parametrize("grid", [(6, 5), (4, 9)])
def test_kernel_and_dense_null_match_their_definitions(grid: tuple[int, int]) -> None:
    """The row-block kernel sums and the Toeplitz-block W0 equal the pairwise definitions."""
    rng = np.random.default_rng(7)
    h, w = grid
    n = h * w
    graph = rng.random((n, n))
    graph = graph + graph.T
    yy, xx = np.divmod(np.arange(n), w)
    walk = graph / graph.sum(1, keepdims=True)
    sums = np.zeros((2 * h - 1, 2 * w - 1))
    counts = np.zeros_like(sums)
    for i in range(n):
        for j in range(n):
            sums[yy[j] - yy[i] + h - 1, xx[j] - xx[i] + w - 1] += walk[i, j]
            counts[yy[j] - yy[i] + h - 1, xx[j] - xx[i] + w - 1] += 1
    expected = sums / counts
    expected = 0.5 * (expected + expected[::-1, ::-1])
    kernel = offset_kernel(graph, grid)
    np.testing.assert_allclose(kernel, expected, rtol=1e-12)
    dense = null_affinity(kernel, grid, np.float64)
    for i in range(n):
        for j in range(n):
            assert dense[i, j] == kernel[yy[j] - yy[i] + h - 1, xx[j] - xx[i] + w - 1]


def test_pixel_graph_is_the_walk_graph_of_its_transition() -> None:
    """Reversible by construction: pi = row sums of K / sum(K), W = K / sum(K) (core.pixels)."""
    from napari_diffcut.core.pixels import pixel_graph

    rng = np.random.default_rng(2)
    rgb = np.full((128, 96, 3), 0.2, np.float32)
    rgb[30:90, 20:60] = (0.7, 0.3, 0.5)
    rgb += rng.normal(0, 0.03, rgb.shape).astype(np.float32)
    g = pixel_graph(rgb, (16, 12))
    np.testing.assert_array_equal(g.affinity, g.affinity.T)
    np.testing.assert_allclose(g.affinity.sum(1), g.stationary, rtol=1e-5)
    np.testing.assert_allclose(g.transition.sum(1), 1, atol=1e-5)
    reference = walk_affinity(g.transition)
    np.testing.assert_allclose(g.affinity, reference, rtol=1e-4, atol=1e-12)
    np.testing.assert_array_equal(g.transition, pixel_transition(rgb, (16, 12)))


def test_near_complete_nodes_split_through_an_index_as_on_a_copy() -> None:
    """The tree's index path (no sub-matrix copy) grows the same tree as copies."""
    import napari_diffcut.core.tree as tree_module

    p = planted_transition(GRID, (np.mgrid[:32, :32][0] > 28).astype(int), seed=6)
    affinity, _ = build_affinity(p, dtype=np.float32)
    shared = build_tree(affinity, min_size=8, grid_shape=GRID)
    old = tree_module.SHARE_MIN_FRACTION
    try:
        tree_module.SHARE_MIN_FRACTION = 2.0  # never share: always gather the sub-graph
        copied = build_tree(affinity, min_size=8, grid_shape=GRID)
    finally:
        tree_module.SHARE_MIN_FRACTION = old
    np.testing.assert_array_equal(shared.parent, copied.parent)
    np.testing.assert_array_equal(shared.leaf_of_patch, copied.leaf_of_patch)
    np.testing.assert_allclose(shared.cost, copied.cost, rtol=1e-6, equal_nan=True)
    assert shared.null_cost is not None and copied.null_cost is not None
    np.testing.assert_allclose(shared.null_cost, copied.null_cost, rtol=1e-6, equal_nan=True)
