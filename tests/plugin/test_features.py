"""Per-label feature tables of result layers, block-wise counting (pure)."""

from __future__ import annotations

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.plugin.features import count_labels, label_features
from napari_diffcut.plugin.layers import LAYER_KEY, result_layer_data


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


def test_features_one_row_per_label(seg: Segmentation) -> None:
    labels = seg.labels
    feats = label_features(seg, labels)
    values, counts = np.unique(labels, return_counts=True)
    np.testing.assert_array_equal(feats["index"], values)
    np.testing.assert_array_equal(feats["area"], counts)
    assert set(feats) == {"index", "level", "parent", "area", "ncut_cost"}
    tree = seg.tree
    for i, label in enumerate(feats["index"]):
        node = tree[label - 1]  # label convention: node id + 1
        assert feats["level"][i] == node.depth
        assert feats["parent"][i] == node.parent + 1
        np.testing.assert_equal(feats["ncut_cost"][i], node.cost)


def test_features_skip_zero() -> None:
    tuples_seg = napari_diffcut.segment(
        np.tile(np.arange(64, dtype=np.uint8), (32, 1)) * 3,
        backbone="pixels",
        working_size=128,
        min_size=4,
        max_depth=2,
    )
    labels = tuples_seg.labels.copy()
    labels[:4, :4] = 0  # a user erased pixels
    feats = label_features(tuples_seg, labels)
    assert 0 not in feats["index"]
    assert feats["area"].sum() == labels.size - 16


def test_features_tolerate_hand_painted_labels() -> None:
    """A label painted by hand beyond the tree's node ids gets -1/NaN tree columns."""
    import napari_diffcut

    img = np.zeros((40, 60), np.uint8)
    img[:, 30:] = 200
    seg = napari_diffcut.segment(img, backbone="pixels", min_size=4)
    labels = seg.labels.copy()
    big = seg.hierarchy.arrays.n_nodes + 50
    labels[:5, :5] = big
    feats = label_features(seg, labels)
    row = list(feats["index"]).index(big)
    assert feats["level"][row] == -1 and feats["parent"][row] == -1
    assert np.isnan(feats["ncut_cost"][row]) and feats["area"][row] == 25


def test_count_labels_block_by_block() -> None:

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (3, 50, 40)).astype(np.uint32)
    labels[2][labels[2] == 5] = 4  # label 5 in two planes only
    index, area, planes = count_labels(labels, per_plane=True)
    values, counts = np.unique(labels, return_counts=True)
    np.testing.assert_array_equal(index, values[1:])
    np.testing.assert_array_equal(area, counts[1:])
    assert planes.tolist() == [3, 3, 3, 3, 2]
    import napari_diffcut.plugin.features as layers_mod

    small = count_labels(labels, per_plane=True)
    layers_mod.COUNT_BLOCK = 64  # many strips per plane: same answer
    try:
        strips = layers_mod.count_labels(labels, per_plane=True)
    finally:
        layers_mod.COUNT_BLOCK = 1 << 22
    for a, b in zip(small, strips, strict=True):
        np.testing.assert_array_equal(a, b)


def test_lazy_result_features_from_leaf_areas() -> None:
    from napari_diffcut.pipeline.segmentation import LazySegmentation

    img = np.zeros((600, 300), np.uint8)  # 8 bytes a pixel: beyond 1 MiB
    img[:, 150:] = 200
    img[50:150, 30:120] = 90
    seg = napari_diffcut.segment(
        img, backbone="pixels", working_size=128, min_size=4, max_depth=3, memory_budget=1
    )
    assert isinstance(seg, LazySegmentation)
    tuples = result_layer_data(seg, "img")
    assert len(tuples) == 1 + seg.hierarchy.n_levels()
    for data, kw, _ in tuples:
        assert kw["metadata"][LAYER_KEY]["data_token"] == data.name
        np.testing.assert_equal(kw["features"], label_features(seg, data.compute()))
