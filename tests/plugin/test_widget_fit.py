"""Issue 13 on the dock widget: it fits a narrow dock, runs keep result sets whole,
intensities map as in the CLI, Cancel is quick while a model loads (headless, Xvfb)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from qtpy.QtWidgets import QDockWidget

import napari_diffcut
import napari_diffcut.pipeline.engine as cache_mod
from napari_diffcut.plugin.layers import LAYER_KEY
from napari_diffcut.plugin.loading import BackgroundLoadEngine, LoadCancelledError
from napari_diffcut.plugin.widget import DiffCutWidget

RUN_TIMEOUT_MS = 120_000
FAST = {"working_size": 128, "min_size": 4, "max_depth": 3}
#: Issue 13 point 1: the dock must fit about 400 px at napari's default font.
MAX_DOCK_PX = 420


@pytest.fixture
def docked(make_napari_viewer_proxy: Any) -> tuple[Any, DiffCutWidget]:
    viewer = make_napari_viewer_proxy(show=True)
    viewer.window.resize(1600, 1000)
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffcut", "DiffCut")
    return viewer, widget


def fast(widget: DiffCutWidget) -> None:
    widget.backbone_combo.value = "pixels"
    widget.working_size_spin.value = FAST["working_size"]
    widget.min_size_spin.value = FAST["min_size"]
    widget.max_depth_spin.value = FAST["max_depth"]


def run(qtbot: Any, widget: DiffCutWidget) -> None:
    widget.run_button.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def dock_of(widget: DiffCutWidget) -> QDockWidget:
    w = widget.native
    while not isinstance(w, QDockWidget):
        w = w.parentWidget()
    return w


def test_dock_fits_400_px_with_every_row_and_message(
    docked: tuple[Any, DiffCutWidget], qtbot: Any
) -> None:
    viewer, widget = docked
    viewer.add_image(
        np.zeros((3, 2, 40, 50), np.uint16),
        name="a stack with a rather long layer name for the picker",
        axis_labels=("z", "c", "y", "x"),
    )
    widget.form.toggle_advanced()  # unfold: every row shown
    assert widget.advanced_button.text.startswith("\u25be")
    widget.status_label.value = "cancelled; " + "a long message " * 20
    qtbot.wait(50)
    assert widget.plane_label.visible and widget.run_on_combo.visible
    dock = dock_of(widget)
    assert dock.minimumSizeHint().width() <= MAX_DOCK_PX
    assert widget.native.minimumSizeHint().width() <= MAX_DOCK_PX
    # The canvas keeps most of the 1600 px window.
    assert viewer.window._qt_viewer.canvas.native.width() >= 800


def test_tile_overlap_never_shows_minus_one(docked: tuple[Any, DiffCutWidget]) -> None:
    _, widget = docked
    # "Off" values read as words (issue 13 point 8), and still mean 0 / None.
    assert widget.tile_size_spin.native.text() == "off"
    assert widget.working_size_spin.native.text() == "model"
    settings, _ = widget.settings()
    assert settings.tile_size is None and settings.working_size is None
    assert widget.overlap_auto_check.value and not widget.tile_overlap_spin.enabled
    widget.tile_size_spin.value = 256
    assert widget.overlap_auto_check.enabled and not widget.tile_overlap_spin.enabled
    widget.overlap_auto_check.value = False
    assert widget.tile_overlap_spin.enabled
    assert widget.tile_overlap_spin.min == 0
    assert not widget.tile_overlap_spin.native.text().startswith("-")
    assert widget.settings()[0].tile_overlap == widget.tile_overlap_spin.value


def test_16_bit_maps_as_the_cli_unless_asked(docked: tuple[Any, DiffCutWidget], qtbot: Any) -> None:
    """Issue 13 point 6: one default intensity mapping (percentiles), recorded."""
    viewer, widget = docked
    rng = np.random.default_rng(0)
    img = (rng.random((96, 96)) * 300).astype(np.uint16)
    img[20:60, 20:60] += 3000
    viewer.add_image(img, name="u16", contrast_limits=(0, 65535))
    fast(widget)
    run(qtbot, widget)
    main = viewer.layers["u16 diffcut"]
    settings = main.metadata[LAYER_KEY]["settings"]
    assert settings["intensity"] == "percentiles"
    api = napari_diffcut.segment(img, backbone="pixels", **FAST)
    np.testing.assert_array_equal(main.data, api.labels)  # the same as the API and CLI
    widget.contrast_check.value = True
    run(qtbot, widget)
    settings = viewer.layers["u16 diffcut"].metadata[LAYER_KEY]["settings"]
    assert settings["intensity"] == "contrast_limits"
    assert settings["contrast_limits"] == [0.0, 65535.0]


def test_rerun_after_painting_keeps_each_result_set_whole(
    docked: tuple[Any, DiffCutWidget], qtbot: Any
) -> None:
    """Issue 13 point 7: the edited main layer keeps its own levels; the re-run gets new ones."""
    viewer, widget = docked
    viewer.open_sample("napari-diffcut", "blood_smear")
    fast(widget)
    run(qtbot, widget)
    name = "synthetic blood smear diffcut"
    main = viewer.layers[name]
    levels = [lay for lay in viewer.layers if lay.name.startswith(f"{name} level")]
    assert levels
    old_seg = main.metadata[LAYER_KEY]["segmentation"]
    old_level_data = [np.array(lay.data) for lay in levels]
    painted = np.array(main.data)
    painted[:10, :10] = 999
    main.data = painted
    widget.power_spin.value = 2
    run(qtbot, widget)
    # The edited set is untouched: main and levels still from the first run.
    assert viewer.layers[name].metadata[LAYER_KEY]["segmentation"] is old_seg
    for lay, data in zip(levels, old_level_data, strict=True):
        assert viewer.layers[lay.name].metadata[LAYER_KEY]["segmentation"] is old_seg
        np.testing.assert_array_equal(viewer.layers[lay.name].data, data)
    # The new set is whole: "[1]" main and its own "[1]" levels, one segmentation.
    new_main = viewer.layers[f"{name} [1]"]
    new_seg = new_main.metadata[LAYER_KEY]["segmentation"]
    assert new_seg is not old_seg and new_seg.settings["power"] == 2
    new_levels = [
        lay
        for lay in viewer.layers
        if lay.name.startswith(f"{name} level") and lay.name.endswith(" [1]")
    ]
    assert len(new_levels) == new_seg.hierarchy.n_levels(new_seg.threshold)
    assert all(lay.metadata[LAYER_KEY]["segmentation"] is new_seg for lay in new_levels)


def test_cancel_while_the_model_loads_takes_effect_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13 point 2: a load that cannot be interrupted no longer holds Cancel."""
    release = threading.Event()
    loaded: list[str] = []

    def slow_load(self: Any, settings: Any) -> Any:
        release.wait(30)  # stands for a 30 s weight load
        loaded.append(settings.model)
        return "model"

    monkeypatch.setattr(cache_mod.ModelCache, "model_for", slow_load)
    engine = BackgroundLoadEngine()
    stop = threading.Event()
    engine.should_stop = stop.is_set
    threading.Timer(0.2, stop.set).start()
    start = time.perf_counter()
    with pytest.raises(LoadCancelledError, match="finishes in the background"):
        engine.model_for(napari_diffcut.Settings(model="m"))
    assert time.perf_counter() - start < 2.0
    assert engine.loading_in_background
    time.sleep(0.6)  # a load longer than a cache hit: it is timed
    release.set()
    deadline = time.monotonic() + 10
    while engine.loading_in_background and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loaded == ["m"] and not engine.loading_in_background
    assert engine.last_load_s is not None and engine.last_load_s > 0.1
    with pytest.raises(LoadCancelledError, match="^$"):  # stopped before: no load at all
        engine.model_for(napari_diffcut.Settings(model="n"))
    assert loaded == ["m"]
