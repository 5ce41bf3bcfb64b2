"""Hierarchy editor widget, headless under Xvfb (make_napari_viewer_proxy + pytest-qt)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.plugin.edit_widget import HierarchyEditor
from napari_diffcut.plugin.layers import result_layer_data
from napari_diffcut.results.editing import LabelTree


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


@pytest.fixture
def viewer(make_napari_viewer_proxy: Any) -> Any:
    return make_napari_viewer_proxy()


def add_result(viewer: Any, seg: Segmentation) -> list[Any]:
    """Add the plugin's layers for ``seg`` (main, then levels)."""
    return [
        viewer.add_labels(data, **kwargs) for data, kwargs, _ in result_layer_data(seg, "cells")
    ]


def activate(viewer: Any, layer: Any) -> None:
    viewer.layers.selection.active = layer


def unwrap(layer: Any) -> Any:
    return getattr(layer, "__wrapped__", layer)


def click(layer: Any, yx: tuple[float, float], *, drag_px: float = 0.0) -> None:
    """A press and a release at the same world point (moved by ``drag_px`` on screen)."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    def event(kind: str, pos: tuple[float, float]) -> Any:
        return ReadOnlyWrapper(
            SimpleNamespace(
                type=kind,
                position=yx,
                view_direction=None,
                dims_displayed=[0, 1],
                pos=np.asarray(pos),
                button=1,
                modifiers=(),
                is_dragging=False,
                handled=False,
            )
        )

    raw = unwrap(layer)
    mouse_press_callbacks(raw, event("mouse_press", (50.0, 50.0)))
    mouse_release_callbacks(raw, event("mouse_release", (50.0 + drag_px, 50.0)))


def test_split_merge_undo_redo_buttons(viewer: Any, seg: Segmentation, qtbot: Any) -> None:
    layers = add_result(viewer, seg)
    level1 = layers[1]
    activate(viewer, level1)
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    assert editor.layer is unwrap(level1)
    assert "cells diffcut level 1" in editor.status.value
    original = np.array(level1.data)
    tree = LabelTree.from_segmentation(seg)
    region = int(original[0, 0])
    level1.selected_label = region
    assert "splits into" in editor.region.value
    assert editor.split_button.enabled and not editor.undo_button.enabled

    editor.split_button.native.click()
    split = np.array(level1.data)
    np.testing.assert_array_equal(split, tree.split(original, region))
    assert level1.selected_label in tree.children_labels(region)
    assert editor.undo_button.enabled
    # The feature table follows: one row per label now in the layer.
    assert sorted(level1.features["index"]) == sorted(set(np.unique(split)) - {0})
    kid = tree.children_labels(region)[0]
    row = list(level1.features["index"]).index(kid)
    assert level1.features["parent"][row] == region
    assert level1.features["area"][row] == np.sum(split == kid)

    editor.undo_button.native.click()
    np.testing.assert_array_equal(level1.data, original)
    # Issue 13 point 8: "undid split ...", not "undid undo split ...".
    assert editor.status.value.startswith("undid split") and "undo" not in editor.status.value
    assert sorted(level1.features["index"]) == sorted(set(np.unique(original)) - {0})
    assert editor.redo_button.enabled
    editor.redo_button.native.click()
    np.testing.assert_array_equal(level1.data, split)

    # Merge one of the children: split then merge gives the original labels.
    level1.selected_label = tree.children_labels(region)[1]
    editor.merge_button.native.click()
    np.testing.assert_array_equal(level1.data, original)
    assert level1.selected_label == region


def test_refused_actions_leave_the_labels_alone(viewer: Any, seg: Segmentation, qtbot: Any) -> None:
    main = add_result(viewer, seg)[0]
    activate(viewer, main)
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    before = np.array(main.data)
    leaf = int(before[0, 0])  # the finest cut: tree leaves at max_depth
    main.selected_label = leaf
    assert "tree leaf" in editor.region.value
    assert not editor.split_button.enabled
    assert editor.split(leaf) is False
    assert "leaf" in editor.status.value
    assert editor.undo() is False
    np.testing.assert_array_equal(main.data, before)


def test_click_to_split_and_merge(viewer: Any, seg: Segmentation, qtbot: Any) -> None:
    layers = add_result(viewer, seg)
    level2 = layers[2]
    activate(viewer, level2)
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    original = np.array(level2.data)
    tree = LabelTree.from_segmentation(seg)
    editor.click_action.value = "split"
    assert level2.mode == "pan_zoom"
    y, x = 2, 2
    region = int(original[y, x])
    click(level2, (y, x), drag_px=25.0)  # a drag pans: no edit
    np.testing.assert_array_equal(level2.data, original)
    click(level2, (y, x))
    np.testing.assert_array_equal(level2.data, tree.split(original, region))
    editor.click_action.value = "merge"
    click(level2, (y, x))
    np.testing.assert_array_equal(level2.data, original)
    editor.click_action.value = "select"
    other = int(original[-1, -1])
    click(level2, (original.shape[0] - 1, original.shape[1] - 1))
    assert level2.selected_label == other
    np.testing.assert_array_equal(level2.data, original)
    # Painting mode: clicks are paint strokes, never edits.
    editor.click_action.value = "split"
    level2.visible = True  # napari keeps hidden layers in pan/zoom mode
    level2.mode = "paint"
    assert level2.mode == "paint"
    press = SimpleNamespace(type="mouse_press", position=(y, x), pos=np.zeros(2), button=1)
    gen = editor._on_mouse(unwrap(level2), press)
    with contextlib.suppress(StopIteration):  # drive a whole click: press, then release
        next(gen)
        press.type = "mouse_release"
        next(gen)
    np.testing.assert_array_equal(level2.data, original)


def test_paint_on_another_region_survives_split_and_undo(
    viewer: Any, seg: Segmentation, qtbot: Any
) -> None:
    level1 = add_result(viewer, seg)[1]
    activate(viewer, level1)
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    original = np.array(level1.data)
    a, b = int(original[0, 0]), int(original[-1, -1])
    assert a != b
    level1.brush_size = 3
    level1.paint((original.shape[0] - 3, original.shape[1] - 3), 900)  # on region b
    painted = np.array(level1.data)
    assert np.sum(painted == 900) > 0
    assert editor.split(a)
    after = np.array(level1.data)
    np.testing.assert_array_equal(after[painted == 900], 900)
    np.testing.assert_array_equal(after[original == b], painted[original == b])
    assert editor.undo()
    np.testing.assert_array_equal(level1.data, painted)


def test_follows_the_active_layer(viewer: Any, seg: Segmentation, qtbot: Any) -> None:
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    assert editor.layer is None and not editor.split_button.enabled
    plain = viewer.add_labels(np.zeros((8, 8), np.uint32), name="hand made")
    activate(viewer, plain)
    assert editor.layer is None and "Select a DiffCut" in editor.status.value
    assert editor.split(1) is False
    main = add_result(viewer, seg)[0]
    activate(viewer, main)
    assert editor.layer is unwrap(main)
    assert editor._on_mouse in unwrap(main).mouse_drag_callbacks
    activate(viewer, plain)
    assert editor._on_mouse not in unwrap(main).mouse_drag_callbacks
    activate(viewer, main)
    viewer.layers.remove(main)
    assert editor.layer is None


def test_reopened_result_is_editable(
    viewer: Any, seg: Segmentation, qtbot: Any, tmp_path: Path
) -> None:
    from npe2 import PluginManager

    PluginManager.instance().discover()
    path = seg.save(tmp_path / "cells")
    viewer.open(str(path), plugin="napari-diffcut")
    level1 = viewer.layers["cells diffcut level 1"]
    activate(viewer, level1)
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    original = np.array(level1.data)
    region = int(original[0, 0])
    assert editor.split(region)
    np.testing.assert_array_equal(
        level1.data, LabelTree.from_segmentation(seg).split(original, region)
    )


def test_export_button_function(viewer: Any, seg: Segmentation, qtbot: Any, tmp_path: Path) -> None:
    import tifffile

    main = add_result(viewer, seg)[0]
    activate(viewer, main)
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    tif, table = editor.export_to(str(tmp_path))
    assert tif.name == "cells_diffcut.tif" and table.name == "cells_diffcut.csv"
    np.testing.assert_array_equal(tifffile.imread(tif), main.data)
    again = editor.export_to(str(tmp_path))
    assert again is not None and again[0].name == "cells_diffcut-1.tif"


def test_new_data_clears_the_history_and_closing_detaches(
    viewer: Any, seg: Segmentation, qtbot: Any
) -> None:
    layers = add_result(viewer, seg)
    level1 = layers[1]
    activate(viewer, level1)
    editor = HierarchyEditor(viewer)
    qtbot.addWidget(editor.native)
    original = np.array(level1.data)
    assert editor.split(int(original[0, 0]))
    assert editor.history().can_undo
    level1.data = original.copy()  # e.g. the plugin re-ran the model
    assert not editor.history().can_undo and not editor.undo_button.enabled
    assert editor._on_mouse in unwrap(level1).mouse_drag_callbacks
    editor.dispose()  # what closing the DiffCut widget does
    assert editor._on_mouse not in unwrap(level1).mouse_drag_callbacks
    assert editor.layer is None and not editor.split_button.enabled
    activate(viewer, layers[0])
    activate(viewer, level1)  # a closed editor does not follow the viewer any more
    assert editor.layer is None and editor._on_mouse not in unwrap(level1).mouse_drag_callbacks


def test_undocking_a_standalone_editor_disposes_it(viewer: Any, seg: Segmentation) -> None:
    main = add_result(viewer, seg)[0]
    activate(viewer, main)
    editor = HierarchyEditor(viewer)
    viewer.window.add_dock_widget(editor, name="editor")
    assert editor.layer is unwrap(main)
    viewer.window.remove_dock_widget(editor.native)
    assert editor.layer is None and editor._on_mouse not in unwrap(main).mouse_drag_callbacks
