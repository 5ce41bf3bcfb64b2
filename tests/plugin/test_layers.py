"""Result layer-data tuples, metadata and edit detection (pure: no viewer, no Qt)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.plugin.geometry import Geometry
from napari_diffcut.plugin.layers import (
    LAYER_KEY,
    cut_data,
    expected_data,
    is_edited,
    level_layer_name,
    main_layer_name,
    result_layer_data,
)


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


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


def test_layer_modules_import_light() -> None:
    """The pure plugin modules and the sample data need neither Qt, napari nor torch."""
    import subprocess
    import sys

    code = (
        "import sys, napari_diffcut.plugin.layers, napari_diffcut.plugin.scripting, "
        "napari_diffcut.plugin.sample_data, napari_diffcut.plugin.geometry, "
        "napari_diffcut.plugin.features, napari_diffcut.plugin.plan, "
        "napari_diffcut.plugin.take, napari_diffcut.plugin.fields\n"
        "heavy = [m for m in ('torch', 'diffusers', 'napari', 'qtpy', 'magicgui', 'PyQt5', "
        "'PyQt6', 'PySide6') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


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
    from napari_diffcut.plugin.features import recut_refusal, result_kind

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


def test_tiled_result_cannot_be_recut() -> None:
    from napari_diffcut.plugin.features import recut_refusal

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


def test_unmatched_stack_has_no_feature_table() -> None:
    [(_, kw, _)] = result_layer_data(_stack_result(consistent=False), "st")
    assert kw["features"] == {}  # equal labels in two planes name unrelated regions
