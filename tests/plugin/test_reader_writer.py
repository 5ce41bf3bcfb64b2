"""napari reader and writer contributions for *.diffcut.zarr (no Qt needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import napari_diffcut
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.plugin.layers import result_layer_data
from napari_diffcut.plugin.reader import get_reader, read_layers
from napari_diffcut.plugin.writer import write_labels_layer
from napari_diffcut.results.editing import LabelTree
from napari_diffcut.results.store import read_result


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


def plugin_layers(seg: Segmentation, source: str = "cells") -> list[tuple[Any, dict, str]]:
    """What the plugin adds after a run."""
    return result_layer_data(seg, source)


def main_meta(layers: list[tuple[Any, dict, str]]) -> dict[str, Any]:
    return next(kw for _, kw, _ in layers if kw["metadata"]["napari_diffcut"]["role"] == "main")


def test_writer_then_reader_round_trip(seg: Segmentation, tmp_path: Path) -> None:
    data, kwargs, _ = plugin_layers(seg)[0]
    kwargs = {**kwargs, "scale": (2.0, 0.5), "translate": (10.0, -3.0)}
    written = write_labels_layer(str(tmp_path / "cells.diffcut.zarr"), data, kwargs)
    assert written == [str(tmp_path / "cells.diffcut.zarr")]
    reader = get_reader(written[0])
    assert callable(reader)
    layers = reader(written[0])
    # Added as a run adds them: the levels, then the main layer on top.
    assert [kw["name"] for _, kw, _ in layers] == [
        f"cells diffcut level {n}" for n in range(1, len(seg.levels) + 1)
    ] + ["cells diffcut"]
    layers = layers[-1:] + layers[:-1]
    expected = plugin_layers(seg)
    for (d1, kw1, t1), (d2, kw2, t2) in zip(layers, expected, strict=True):
        assert t1 == t2 == "labels"
        np.testing.assert_array_equal(d1, d2)
        assert kw1["visible"] == kw2["visible"]
        assert set(kw1) == set(kw2)
        for column in kw2["features"]:
            np.testing.assert_array_equal(kw1["features"][column], kw2["features"][column])
        assert kw1["scale"] == (2.0, 0.5) and kw1["translate"] == (10.0, -3.0)
        m1, m2 = kw1["metadata"]["napari_diffcut"], kw2["metadata"]["napari_diffcut"]
        assert set(m1) == set(m2)
        for key in ("settings", "role", "level", "source", "threshold", "plane"):
            assert m1[key] == m2[key], key
        assert isinstance(m1["segmentation"], Segmentation)
        assert m1["version"] == napari_diffcut.__version__
    back = layers[0][1]["metadata"]["napari_diffcut"]["segmentation"]
    np.testing.assert_array_equal(back.labels, seg.labels)
    assert [n.as_dict() for n in back.tree] == [n.as_dict() for n in seg.tree]
    assert back.settings == seg.settings


def test_edits_survive_save_and_reopen_and_stay_editable(seg: Segmentation, tmp_path: Path) -> None:
    data, kwargs, _ = plugin_layers(seg)[0]
    tree = LabelTree.from_segmentation(seg)
    region = int(data[-1, -1])  # far from the paint stroke
    edited = np.array(data)
    edited[:3, :3] = 4242  # a paint stroke
    path = write_labels_layer(str(tmp_path / "e"), edited, kwargs)[0]
    assert path.endswith("e.diffcut.zarr")
    layers = read_layers(path)
    main = layers[-1]
    assert main[1]["name"] == "cells diffcut" and main[1]["visible"]
    np.testing.assert_array_equal(main[0], edited)
    # A painted label gets a feature row like after a run: no tree columns.
    features = main[1]["features"]
    row = list(features["index"]).index(4242)
    assert features["level"][row] == -1 and features["area"][row] == 9
    # Merge and split work on the reopened result, with the reopened tree.
    reopened = LabelTree.from_segmentation(main[1]["metadata"]["napari_diffcut"]["segmentation"])
    merged = reopened.merge(main[0], region)
    np.testing.assert_array_equal(merged, tree.merge(edited, region))
    parent = reopened.parent_label(region)
    assert parent is not None and np.any(merged == parent)
    np.testing.assert_array_equal(reopened.split(merged, parent), tree.split(merged, parent))
    assert np.all(merged[:3, :3] == 4242)


def test_a_saved_level_reopens_as_that_level(seg: Segmentation, tmp_path: Path) -> None:
    tuples = plugin_layers(seg)
    data, kwargs, _ = tuples[2]  # level 2
    edited = np.array(data)
    edited[-3:, -3:] = 0  # erased by the user
    path = write_labels_layer(str(tmp_path / "lvl"), edited, kwargs)[0]
    layers = {kw["name"]: (d, kw) for d, kw, _ in read_layers(path)}
    level2, kw2 = layers["cells diffcut level 2"]
    np.testing.assert_array_equal(level2, edited)
    assert kw2["visible"]  # what was saved is what is shown
    main, kw_main = layers["cells diffcut"]
    np.testing.assert_array_equal(main, seg.labels)  # recomputed from the tree
    assert not kw_main["visible"]
    assert [kw["visible"] for name, (_, kw) in layers.items() if name.endswith("level 1")] == [
        False
    ]


def test_writer_keeps_the_threshold_setting(seg: Segmentation, tmp_path: Path) -> None:
    layers = result_layer_data(seg, "cells", threshold="auto")
    data, kwargs, _ = layers[0]
    path = write_labels_layer(str(tmp_path / "auto"), data, kwargs)[0]
    back = napari_diffcut.load(path)
    assert back.hierarchy.threshold_setting == "auto"
    np.testing.assert_array_equal(back.labels, data)


def test_writer_refuses_layers_without_a_tree(seg: Segmentation, tmp_path: Path) -> None:
    with pytest.raises(DiffCutError, match="no napari-diffcut segmentation"):
        write_labels_layer(str(tmp_path / "x"), np.zeros((4, 4), np.uint32), {"name": "paint"})
    data, kwargs, _ = plugin_layers(seg)[0]
    with pytest.raises(DiffCutError, match="shape"):
        write_labels_layer(str(tmp_path / "x"), data[:-2], kwargs)
    assert not (tmp_path / "x.diffcut.zarr").exists()


def test_reader_returns_none_for_foreign_paths(tmp_path: Path) -> None:
    import zarr

    (tmp_path / "image.tif").write_bytes(b"II*\x00")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array(
        "x", data=np.zeros(3, np.uint8)
    )
    (tmp_path / "empty.diffcut.zarr").mkdir()
    for path in ("image.tif", "other.zarr", "empty.diffcut.zarr", "missing.diffcut.zarr"):
        assert get_reader(str(tmp_path / path)) is None, path
    assert get_reader([str(tmp_path / "a"), str(tmp_path / "b")]) is None
    assert get_reader(None) is None  # type: ignore[arg-type]


def test_damaged_store_gives_a_notification(
    seg: Segmentation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = seg.save(tmp_path / "bad")
    shutil.rmtree(path / "pixel_leaf")
    shown: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    reader = get_reader(str(path))
    assert reader is not None  # it is ours (header), so we explain what is wrong
    assert reader(str(path)) == [(None,)]
    assert len(shown) == 1 and "bad.diffcut.zarr" in shown[0] and "pixel_leaf" in shown[0]
    with pytest.raises(DiffCutError):
        napari_diffcut.load(path)


def test_reader_survives_a_store_that_lies_about_itself(
    seg: Segmentation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = seg.save(tmp_path / "liar")
    meta = json.loads((path / "labels" / "zarr.json").read_text())
    meta["codecs"].append({"name": "numcodecs.pickle", "configuration": {}})
    (path / "labels" / "zarr.json").write_text(json.dumps(meta))
    shown: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    assert read_layers(str(path)) == [(None,)]
    assert "no pickles" in shown[0]


def test_napari_opens_and_saves_through_the_manifest(seg: Segmentation, tmp_path: Path) -> None:
    """End to end through npe2: viewer.open / layers.save pick our contributions."""
    from napari.components import ViewerModel
    from npe2 import PluginManager

    PluginManager.instance().discover()  # a Qt viewer does this at start-up
    path = seg.save(tmp_path / "cells")
    viewer = ViewerModel()
    layers = viewer.open(str(path), plugin="napari-diffcut")
    names = [layer.name for layer in layers]
    assert names == [f"cells diffcut level {n}" for n in range(1, len(seg.levels) + 1)] + [
        "cells diffcut"
    ]
    main = viewer.layers["cells diffcut"]
    assert viewer.layers[-1] is main and viewer.layers.selection.active is main
    np.testing.assert_array_equal(main.data, seg.labels)
    assert isinstance(main.metadata["napari_diffcut"]["segmentation"], Segmentation)
    main.data[:2, :2] = 77
    viewer.layers.selection = {main}
    out = viewer.layers.save(
        str(tmp_path / "again.diffcut.zarr"), selected=True, plugin="napari-diffcut"
    )
    assert out == [str(tmp_path / "again.diffcut.zarr")]
    back = read_result(out[0])
    assert np.all(back.labels[:2, :2] == 77)
    assert_same_tree(back.segmentation, seg)
    # Plain label TIFFs for other tools: napari's own writer still takes our layers.
    import tifffile

    [tif] = viewer.layers.save(str(tmp_path / "plain.tif"), selected=True)
    np.testing.assert_array_equal(tifffile.imread(tif), main.data)


def assert_same_tree(a: Segmentation, b: Segmentation) -> None:
    assert [n.as_dict() for n in a.tree] == [n.as_dict() for n in b.tree]
    np.testing.assert_array_equal(a.pixel_leaf, b.pixel_leaf)
