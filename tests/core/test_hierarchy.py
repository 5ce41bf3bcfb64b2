"""The NCut tree, the automatic threshold, flat cuts and levels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from napari_diffcut import ncut_hierarchy
from napari_diffcut.core.hierarchy import (
    STRUCTURELESS_COST,
    Hierarchy,
    auto_threshold,
    build_tree,
    iter_ncut_tree,
    otsu_threshold,
)
from napari_diffcut.core.walk import walk_affinity
from napari_diffcut.testing import planted_transition


def test_quadrants_are_found(quadrant_transition: np.ndarray, quadrant_regions: np.ndarray) -> None:
    h = ncut_hierarchy(quadrant_transition, (24, 24), min_size=8)
    assert adjusted_rand_score(quadrant_regions.ravel(), h.labels.ravel()) > 0.9
    assert h.labels.min() >= 1


def test_levels_nest_and_end_at_labels(quadrant_transition: np.ndarray) -> None:
    h = ncut_hierarchy(quadrant_transition, (24, 24), min_size=4, threshold=0.9)
    levels = h.levels
    assert len(levels) >= 2
    np.testing.assert_array_equal(levels[-1], h.labels)
    for coarse, fine in zip(levels[:-1], levels[1:], strict=True):
        for label in np.unique(fine):
            assert (
                len(np.unique(coarse[fine == label])) == 1
            )  # each fine segment inside one coarse one
        assert len(np.unique(fine)) >= len(np.unique(coarse))


def test_labels_are_node_ids_plus_one(quadrant_transition: np.ndarray) -> None:
    h = ncut_hierarchy(quadrant_transition, (24, 24), min_size=8)
    nodes = {n.id: n for n in h.tree}
    for label in np.unique(h.labels):
        node = nodes[int(label) - 1]
        assert node.size == int((h.labels == label).sum())
    root = nodes[0]
    assert root.parent == -1 and root.size == 24 * 24 and root.depth == 0
    for n in h.tree:
        for c in n.children:
            assert nodes[c].parent == n.id and nodes[c].depth == n.depth + 1
        if n.children:
            assert sum(nodes[c].size for c in n.children) == n.size


def test_cut_is_monotone_in_threshold(quadrant_transition: np.ndarray) -> None:
    h = ncut_hierarchy(quadrant_transition, (24, 24), min_size=4)
    counts = [len(np.unique(h.cut(t))) for t in (0.001, 0.05, 0.3, 0.6, 1.0)]
    assert counts == sorted(counts)
    assert counts[0] == 1
    # A lower threshold is always a coarsening (top-down pruning of the same tree).
    coarse, fine = h.cut(0.05), h.cut(0.6)
    for label in np.unique(fine):
        assert len(np.unique(coarse[fine == label])) == 1


def test_auto_threshold_rule() -> None:
    assert otsu_threshold(np.array([0.1, 0.12, 0.8, 0.9])) == pytest.approx(0.46)
    tau = auto_threshold(np.array([0.01, 0.02, 0.015, 0.5, 0.6, 0.7, np.nan]))
    assert 0.02 < tau < 0.5
    # All splits strong: the structureless reference keeps them all.
    assert auto_threshold(np.array([0.01, 0.02])) > 0.02
    assert auto_threshold(np.array([np.nan])) == 0.5


def test_structureless_walk_does_not_split() -> None:
    p = np.full((64, 64), 1 / 64, np.float32)
    h = ncut_hierarchy(p, (8, 8), min_size=2)
    assert len(np.unique(h.labels)) == 1
    assert np.nanmin(h.arrays.cost) >= STRUCTURELESS_COST - 1e-6


def test_generator_yields_and_can_be_closed(quadrant_transition: np.ndarray) -> None:
    w = walk_affinity(quadrant_transition)
    gen = iter_ncut_tree(w, min_size=4)
    first = next(gen)
    assert first[0] == 1
    gen.close()  # stops the recursion without error
    tree = build_tree(w, min_size=4, max_depth=2)
    assert tree.depth.max() <= 2


def test_min_size_and_depth_bounds(quadrant_transition: np.ndarray) -> None:
    h = ncut_hierarchy(quadrant_transition, (24, 24), min_size=20, max_depth=3, threshold=1.0)
    sizes = h.arrays.size[1:]
    assert sizes.min() >= 20
    assert h.arrays.depth.max() <= 3


def test_power_and_similarity_graph(
    quadrant_transition: np.ndarray, quadrant_regions: np.ndarray
) -> None:
    for graph in ("walk", "similarity"):
        for power in (1, 2):
            h = ncut_hierarchy(quadrant_transition, (24, 24), power=power, graph=graph, min_size=8)
            assert adjusted_rand_score(quadrant_regions.ravel(), h.labels.ravel()) > 0.8


def test_reproducible(quadrant_transition: np.ndarray) -> None:
    a = ncut_hierarchy(quadrant_transition, (24, 24), seed=5)
    b = ncut_hierarchy(quadrant_transition, (24, 24), seed=5)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid_shape": (5, 5)}, "grid_shape"),
        ({"threshold": 1.5}, "threshold must be"),
        ({"threshold": "high"}, "threshold must be"),
        ({"min_size": 0}, "min_size must be"),
        ({"max_depth": 0}, "max_depth must be"),
        ({"power": 0}, "power must be"),
        ({"graph": "knn"}, "graph must be one of"),
    ],
)
def test_bad_arguments(quadrant_transition: np.ndarray, kwargs: dict, match: str) -> None:
    args = {"grid_shape": (24, 24), **kwargs}
    grid = args.pop("grid_shape")
    with pytest.raises(ValueError, match=match):
        ncut_hierarchy(quadrant_transition, grid, **args)


def test_hierarchy_checks_grid(quadrant_transition: np.ndarray) -> None:
    tree = build_tree(walk_affinity(quadrant_transition), min_size=8)
    with pytest.raises(ValueError, match="grid_shape"):
        Hierarchy(tree, (10, 10))


def test_attention_like_graph_with_six_regions() -> None:
    yy, xx = np.mgrid[:32, :32]
    regions = (yy > 16).astype(int) * 2 + (xx > 10) + ((yy - 8) ** 2 + (xx - 22) ** 2 < 25) * 4
    p = planted_transition((32, 32), regions, seed=1)
    h = ncut_hierarchy(p, (32, 32), min_size=8)
    assert adjusted_rand_score(regions.ravel(), h.labels.ravel()) > 0.8
