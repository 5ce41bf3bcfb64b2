"""Result layer-data tuples, edit detection and the update plan (pure: no viewer, no Qt)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.plugin.layers import (
    LAYER_KEY,
    ExistingLayer,
    Geometry,
    cut_data,
    displayed_plane_axes,
    expected_data,
    is_edited,
    label_features,
    level_layer_name,
    main_layer_name,
    plan_layer_updates,
    plane_geometry,
    plane_selection,
    result_layer_data,
)


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


def existing_from(tuples: list, **overrides: object) -> list[ExistingLayer]:
    """ExistingLayer records of tuples as if they had been added unchanged."""
    return [ExistingLayer(kw["name"], data, kw["metadata"]) for data, kw, _ in tuples]


def test_names() -> None:
    assert main_layer_name("cells") == "cells diffcut"
    assert level_layer_name("cells", 2) == "cells diffcut level 2"


def test_result_layer_data_main_then_levels(seg: Segmentation) -> None:
    geo = Geometry(
        scale=(0.5, 0.25), translate=(1.0, 2.0), units=("um", "um"), axis_labels=("y", "x")
    )
    tuples = result_layer_data(seg, "img", geometry=geo)
    assert len(tuples) == 1 + len(seg.levels)
    names = [kw["name"] for _, kw, _ in tuples]
    assert names == ["img diffcut"] + [
        f"img diffcut level {d}" for d in range(1, len(seg.levels) + 1)
    ]
    assert all(kind == "labels" for *_, kind in tuples)
    assert [kw["visible"] for _, kw, _ in tuples] == [True] + [False] * len(seg.levels)
    np.testing.assert_array_equal(tuples[0][0], seg.labels)
    for (data, _, _), level in zip(tuples[1:], seg.levels, strict=True):
        np.testing.assert_array_equal(data, level)
    for _, kw, _ in tuples:
        assert kw["scale"] == (0.5, 0.25)
        assert kw["translate"] == (1.0, 2.0)
        assert kw["units"] == ("um", "um")
        assert kw["axis_labels"] == ("y", "x")


def test_metadata_contract(seg: Segmentation) -> None:
    tuples = result_layer_data(seg, "img")
    main = tuples[0][1]["metadata"][LAYER_KEY]
    assert set(main) >= {
        "settings",
        "version",
        "role",
        "level",
        "source",
        "threshold",
        "segmentation",
    }
    assert main["role"] == "main" and main["level"] is None and main["source"] == "img"
    assert main["segmentation"] is seg
    assert main["version"] == napari_diffcut.__version__
    assert main["threshold"] == pytest.approx(seg.threshold)
    json.dumps(main["settings"])  # JSON-serialisable
    assert main["settings"]["backbone"] == "pixels"
    levels = [kw["metadata"][LAYER_KEY] for _, kw, _ in tuples[1:]]
    assert [m["level"] for m in levels] == list(range(1, len(levels) + 1))
    assert {m["role"] for m in levels} == {"level"}


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


def test_threshold_changes_cut_and_levels(seg: Segmentation) -> None:
    low = result_layer_data(seg, "img", threshold=1e-6)  # only perfect (cost 0) splits
    np.testing.assert_array_equal(low[0][0], seg.cut(1e-6))
    high = result_layer_data(seg, "img", threshold=1.0)
    assert len(np.unique(high[0][0])) > len(np.unique(low[0][0]))
    np.testing.assert_array_equal(high[0][0], seg.cut(1.0))
    assert len(high) - 1 == len(seg.levels_at(1.0))
    assert high[0][1]["metadata"][LAYER_KEY]["threshold"] == 1.0
    assert high[0][1]["metadata"][LAYER_KEY]["settings"]["threshold"] == 1.0


def test_cut_data_levels_match_engine(seg: Segmentation) -> None:
    for d, level in enumerate(seg.levels_at(0.5), start=1):
        np.testing.assert_array_equal(cut_data(seg, seg.hierarchy.resolve(0.5), d), level)


def test_is_edited_detects_paint(seg: Segmentation) -> None:
    data, kw, _ = result_layer_data(seg, "img")[0]
    meta = kw["metadata"]
    assert not is_edited(data, meta)
    np.testing.assert_array_equal(expected_data(meta), data)
    painted = data.copy()
    painted[0, 0] = painted.max() + 7
    assert is_edited(painted, meta)
    assert is_edited(data[:-1], meta)  # other shape
    assert is_edited(data, {})  # not ours: cannot be verified, never overwritten
    meta_auto = {LAYER_KEY: {**meta[LAYER_KEY], "threshold": "auto"}}  # reader style
    seg_auto_data = seg.cut("auto")
    assert not is_edited(seg_auto_data, meta_auto)


def test_plan_adds_then_updates_in_place(seg: Segmentation) -> None:
    tuples = result_layer_data(seg, "img")
    first = plan_layer_updates([ExistingLayer("img", None, {}, False)], tuples)
    assert [(n, upd) for n, upd, _ in first.steps] == [(kw["name"], False) for _, kw, _ in tuples]
    assert first.remove == [] and first.protected == []
    again = plan_layer_updates(existing_from(tuples), tuples)
    assert [(n, upd) for n, upd, _ in again.steps] == [(kw["name"], True) for _, kw, _ in tuples]


def test_plan_protects_edited_layer(seg: Segmentation) -> None:
    tuples = result_layer_data(seg, "img")
    existing = existing_from(tuples)
    painted = tuples[0][0].copy()
    painted[:3, :3] = 99
    existing[0] = ExistingLayer(existing[0].name, painted, existing[0].metadata)
    plan = plan_layer_updates(existing, tuples)
    assert plan.steps[0][:2] == ("img diffcut [1]", False)
    assert plan.protected == [("img diffcut", "img diffcut [1]")]
    assert all(upd for _, upd, _ in plan.steps[1:])  # unedited levels are updated
    # Next time, the unedited "[1]" layer is the one updated; the painted one stays.
    existing.append(ExistingLayer("img diffcut [1]", tuples[0][0], tuples[0][1]["metadata"]))
    plan = plan_layer_updates(existing, tuples)
    assert plan.steps[0][:2] == ("img diffcut [1]", True)


def test_plan_never_takes_foreign_layer(seg: Segmentation) -> None:
    tuples = result_layer_data(seg, "img")
    foreign = ExistingLayer("img diffcut", np.zeros(seg.shape, np.uint32), {"other": 1})
    plan = plan_layer_updates([foreign], tuples)
    assert plan.steps[0][:2] == ("img diffcut [1]", False)
    # A result of another source with the same layer name is not ours either.
    other = result_layer_data(seg, "other image")[0]
    renamed = ExistingLayer("img diffcut", other[0], other[1]["metadata"])
    assert plan_layer_updates([renamed], tuples).steps[0][:2] == ("img diffcut [1]", False)


def test_plan_removes_stale_unedited_levels(seg: Segmentation) -> None:
    many = result_layer_data(seg, "img", threshold=1.0)
    few = result_layer_data(seg, "img", threshold=1e-6)
    assert len(many) > len(few)
    existing = existing_from(many)
    # The user painted on the deepest level: it must survive.
    deep = existing[-1]
    edited = np.asarray(deep.data).copy()
    edited[0, 0] = 12345
    existing[-1] = ExistingLayer(deep.name, edited, deep.metadata)
    plan = plan_layer_updates(existing, few)
    expected_removed = [kw["name"] for _, kw, _ in many[len(few) : -1]]
    assert plan.remove == expected_removed
    assert deep.name not in plan.remove


def test_plane_selection_and_geometry() -> None:
    index, plane = plane_selection((5, 40, 50), (2.6, 10.0, 3.0), (1, 2))
    assert index == (3, slice(None), slice(None))
    assert plane == [3, None, None]
    index, _ = plane_selection((5, 40, 50), (-3.0, 0, 0), (1, 2))
    assert index[0] == 0  # clipped

    class FakeLayer:
        scale = (2.0, 0.5, 0.25)
        translate = (1.0, 2.0, 3.0)
        units = ("s", "um", "um")
        axis_labels = ("t", "y", "x")

    geo = plane_geometry(FakeLayer())
    assert geo == Geometry((0.5, 0.25), (2.0, 3.0), ("um", "um"), ("y", "x"))


def test_displayed_plane_axes() -> None:
    assert displayed_plane_axes(3, 3, (1, 2)) == (1, 2)
    assert displayed_plane_axes(3, 3, (2, 1)) == (1, 2)  # swapped Y/X is fine
    assert displayed_plane_axes(3, 4, (2, 3)) == (1, 2)  # layer with fewer dims
    assert displayed_plane_axes(3, 3, (0, 1, 2)) == (1, 2)  # 3-D view: the last two
    with pytest.raises(ValueError, match="last two"):
        displayed_plane_axes(3, 3, (0, 2))


def test_layer_modules_import_light() -> None:
    """_layers, scripting and the sample data need neither Qt, napari nor torch to import."""
    import subprocess
    import sys

    code = (
        "import sys, napari_diffcut.plugin.layers, napari_diffcut.plugin.scripting, "
        "napari_diffcut.plugin.sample_data\n"
        "heavy = [m for m in ('torch', 'diffusers', 'napari', 'qtpy', 'magicgui', 'PyQt5', "
        "'PyQt6', 'PySide6') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_features_tolerate_hand_painted_labels() -> None:
    """A label painted by hand beyond the tree's node ids gets -1/NaN tree columns."""
    import napari_diffcut
    from napari_diffcut.plugin.layers import label_features

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


def test_saved_labels_fill_their_layer(seg: Segmentation) -> None:
    """What the reader asks for: edited labels in the layer they were saved from."""
    edited = seg.levels[1].copy()
    edited[:2, :2] = 0
    tuples = result_layer_data(seg, "img", labels=edited, labels_level=2, version="0.0.9")
    by_name = {kw["name"]: (data, kw) for data, kw, _ in tuples}
    data, kw = by_name["img diffcut level 2"]
    assert data is edited and kw["visible"]
    assert not by_name["img diffcut"][1]["visible"]
    np.testing.assert_array_equal(by_name["img diffcut"][0], seg.labels)
    assert kw["features"]["area"].sum() == edited.size - 4
    assert {kw["metadata"][LAYER_KEY]["version"] for _, kw in by_name.values()} == {"0.0.9"}
    main_only = result_layer_data(seg, "img", labels=edited)
    assert main_only[0][0] is edited and main_only[0][1]["visible"]
    with pytest.raises(ValueError, match="labels_level"):
        result_layer_data(seg, "img", labels=edited, labels_level=len(seg.levels) + 1)
    with pytest.raises(ValueError, match="shape"):
        result_layer_data(seg, "img", labels=edited[1:])


def test_geometry_from_a_saved_placement() -> None:
    geo = Geometry.from_placement(
        {"scale": [2.0, 0.5], "translate": [1, 2], "units": ["um", "um"], "axis_labels": "yx"}
    )
    assert geo == Geometry((2.0, 0.5), (1.0, 2.0), ("um", "um"), None)
    assert Geometry.from_placement({}) == Geometry()


# -- issue #4: stacks, tiles, lazy labels -------------------------------------------
def _stack_result(consistent: bool) -> object:
    img = np.zeros((3, 40, 56), np.uint8)
    img[:, :, 28:] = 200
    img[1, 5:20, 5:20] = 90
    return napari_diffcut.segment(
        img,
        backbone="pixels",
        working_size=128,
        min_size=4,
        max_depth=3,
        consistent_stack=consistent,
    )


def test_stack_result_is_one_layer_with_the_stack_shape() -> None:
    from napari_diffcut.plugin.layers import recut_refusal, result_kind

    seg = _stack_result(consistent=True)
    geo = Geometry((4.0, 0.5, 0.5), (0.0, 1.0, 2.0), ("um", "um", "um"), ("z", "y", "x"))
    [(data, kw, kind)] = result_layer_data(seg, "st", geometry=geo)
    assert kind == "labels" and kw["name"] == "st diffcut" and data.shape == (3, 40, 56)
    np.testing.assert_array_equal(data, seg.labels)
    assert data is not seg.labels  # the layer's own copy: paint never reaches the result
    assert kw["scale"] == (4.0, 0.5, 0.5) and kw["axis_labels"] == ("z", "y", "x")
    meta = kw["metadata"][LAYER_KEY]
    assert meta["kind"] == "stack" and meta["segmentation"] is seg and meta["data_token"] is None
    assert result_kind(seg) == "stack" and recut_refusal(seg) == ""
    values, counts = np.unique(seg.labels, return_counts=True)
    np.testing.assert_array_equal(kw["features"]["index"], values[values > 0])
    np.testing.assert_array_equal(kw["features"]["area"], counts[values > 0])
    planes = [len({z for z in range(3) if (seg.labels[z] == v).any()}) for v in values]
    np.testing.assert_array_equal(kw["features"]["planes"], planes)
    assert not is_edited(data, kw["metadata"])
    data[0, 0, 0] += 1
    assert is_edited(data, kw["metadata"])
    # Another threshold re-cuts every plane's tree.
    [(low, kw_low, _)] = result_layer_data(seg, "st", threshold=1e-6)
    np.testing.assert_array_equal(low, seg.cut(1e-6))
    assert not is_edited(low, kw_low["metadata"])
    json.dumps(kw["metadata"][LAYER_KEY]["settings"])


def test_unmatched_stack_has_no_feature_table() -> None:
    [(_, kw, _)] = result_layer_data(_stack_result(consistent=False), "st")
    assert kw["features"] == {}  # equal labels in two planes name unrelated regions


def test_tiled_result_cannot_be_recut() -> None:
    from napari_diffcut.plugin.layers import recut_refusal

    img = np.zeros((300, 300), np.uint8)
    img[:, 150:] = 200
    seg = napari_diffcut.segment(
        img, backbone="pixels", working_size=128, min_size=4, max_depth=2, tile_size=128
    )
    assert "tile" in recut_refusal(seg)
    [(data, kw, _)] = result_layer_data(seg, "big")
    np.testing.assert_array_equal(data, seg.labels)
    assert set(kw["features"]) == {"index", "area"}
    assert kw["metadata"][LAYER_KEY]["threshold"] == pytest.approx(seg.threshold)
    with pytest.raises(ValueError, match="tiled result"):
        result_layer_data(seg, "big", threshold=0.5)


def test_zarr_labels_go_to_a_dask_layer_and_edits_show_in_its_name(tmp_path: object) -> None:
    """Labels held in zarr are never read whole: a dask view, edits seen by graph name."""
    import dask.array as da

    img = np.zeros((2, 40, 56), np.uint8)
    img[:, :, 28:] = 200
    seg = napari_diffcut.segment(
        img,
        backbone="pixels",
        working_size=128,
        min_size=4,
        max_depth=2,
        out=str(tmp_path / "labels.zarr"),  # type: ignore[operator]
    )
    assert not isinstance(seg.labels, np.ndarray)
    [(data, kw, _)] = result_layer_data(seg, "st")
    assert isinstance(data, da.Array) and kw["metadata"][LAYER_KEY]["data_token"] == data.name
    np.testing.assert_array_equal(data.compute(), np.asarray(seg.labels))
    assert not is_edited(data, kw["metadata"])
    painted = data.copy()
    painted[0, 0, 0] = 99  # what napari's paint does to a dask array: a new graph
    assert is_edited(painted, kw["metadata"])
    assert is_edited(np.asarray(data), kw["metadata"])  # replaced by numpy: not ours


def test_count_labels_block_by_block() -> None:
    from napari_diffcut.plugin.layers import count_labels

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (3, 50, 40)).astype(np.uint32)
    labels[2][labels[2] == 5] = 4  # label 5 in two planes only
    index, area, planes = count_labels(labels, per_plane=True)
    values, counts = np.unique(labels, return_counts=True)
    np.testing.assert_array_equal(index, values[1:])
    np.testing.assert_array_equal(area, counts[1:])
    assert planes.tolist() == [3, 3, 3, 3, 2]
    import napari_diffcut.plugin.layers as layers_mod

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


def test_layer_channel_axis_and_alignment() -> None:
    from napari_diffcut.plugin.layers import axes_geometry, layer_channel_axis, lines_up

    assert layer_channel_axis(3, True) == 2
    assert layer_channel_axis(4, False, ("t", "C", "y", "x")) == 1
    assert layer_channel_axis(3, False, ("-3", "-2", "-1")) is None
    assert lines_up((1, 2), 3) and not lines_up((0, 1), 3)
    assert displayed_plane_axes(3, 3, (0, 1), plane_axes=(0, 1)) == (0, 1)
    with pytest.raises(ValueError, match=r"\(Y, X\) axes \(0, 1\)"):
        displayed_plane_axes(3, 3, (1, 2), plane_axes=(0, 1))

    class FakeLayer:
        scale = (2.0, 0.5, 0.25)
        translate = (1.0, 2.0, 3.0)
        units = ("s", "um", "um")
        axis_labels = ("t", "y", "x")

    assert axes_geometry(FakeLayer(), (0, 2)) == Geometry(
        (2.0, 0.25), (1.0, 3.0), ("s", "um"), ("t", "x")
    )
    assert axes_geometry(FakeLayer()).scale == (2.0, 0.5, 0.25)
