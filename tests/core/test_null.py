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
