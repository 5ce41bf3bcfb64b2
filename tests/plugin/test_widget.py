"""The DiffCut dock widget, headless (Xvfb via pytest-xvfb), docked through the plugin manager."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager
from qtpy.QtCore import QTimer

import napari_diffcut.attention.model as model_mod
import napari_diffcut.large.dispatch as engine_mod
from napari_diffcut.plugin.layers import LAYER_KEY
from napari_diffcut.plugin.widget import DiffCutWidget

RUN_TIMEOUT_MS = 120_000


@pytest.fixture
def docked(make_napari_viewer_proxy: Any) -> tuple[Any, DiffCutWidget]:
    viewer = make_napari_viewer_proxy()
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffcut", "DiffCut")
    assert isinstance(widget, DiffCutWidget)
    return viewer, widget


@pytest.fixture
def notifications() -> Iterator[list[Any]]:
    """Notifications shown while the test runs."""
    seen: list[Any] = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        yield seen
    finally:
        notification_manager.notification_ready.disconnect(seen.append)


@pytest.fixture
def engine_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Count engine runs (each call of the engine's ``iter_segment``); they run for real."""
    runs: list[dict[str, Any]] = []
    real = engine_mod.iter_segment

    def counting(image: Any, settings: Any = None, **kwargs: Any) -> Any:
        runs.append({"settings": settings, **kwargs})
        return real(image, settings, **kwargs)

    monkeypatch.setattr(engine_mod, "iter_segment", counting)
    return runs


@pytest.fixture
def gated_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make every run stop after its first progress event until ``state["gate"]`` is set.

    The real engine generator runs before and after the pause; the wrapper only
    records which thread closed it (cleanup must happen in the worker thread).
    """
    state: dict[str, Any] = {
        "first": threading.Event(),
        "gate": threading.Event(),
        "gate_ok": None,
        "closed_in": None,
        "before_gate": None,
    }
    real = engine_mod.iter_segment

    def gated(image: Any, settings: Any = None, **kwargs: Any) -> Any:
        gen = real(image, settings, **kwargs)
        try:
            yield next(gen)
            state["first"].set()
            hook = state.get("before_gate")
            if hook is not None:
                hook()
            state["gate_ok"] = state["gate"].wait(30)
            return (yield from gen)
        finally:
            gen.close()
            state["closed_in"] = threading.current_thread()

    monkeypatch.setattr(engine_mod, "iter_segment", gated)
    return state


def result_layers(viewer: Any) -> list[Any]:
    return [lay for lay in viewer.layers if "diffcut" in lay.name]


def wait_done(qtbot: Any, widget: DiffCutWidget) -> None:
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def start_paused_run(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, model: Path, gated_run: dict[str, Any]
) -> None:
    """Run the tiny model on the smear sample; return once it is paused mid-run.

    It pauses inside the engine right after the first ("load") event, before
    the model is loaded, until ``gated_run["gate"]`` is set.
    """
    viewer, widget = docked
    viewer.open_sample("napari-diffcut", "blood_smear")
    widget.model_edit.value = str(model)
    widget.run_button.clicked()
    qtbot.waitUntil(gated_run["first"].is_set, timeout=RUN_TIMEOUT_MS)


def test_run_with_tiny_model_recut_rerun_and_close(
    docked: tuple[Any, DiffCutWidget],
    qtbot: Any,
    tiny_model: Path,
    engine_runs: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    viewer, widget = docked
    loads: list[str] = []
    real_load = model_mod.load_model
    monkeypatch.setattr(
        model_mod, "load_model", lambda *a, **k: loads.append(str(a[0])) or real_load(*a, **k)
    )
    [image] = viewer.open_sample("napari-diffcut", "blood_smear")
    assert widget.image_combo.value.name == image.name  # picker follows the new layer
    widget.model_edit.value = str(tiny_model)
    widget.min_size_spin.value = 4
    widget.run_button.clicked()
    assert widget.running and not widget.run_button.enabled and widget.cancel_button.enabled
    wait_done(qtbot, widget)
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert widget.progress_bar.value == widget.progress_bar.max

    # Layers, features and metadata.
    main = viewer.layers["synthetic blood smear diffcut"]
    levels = [lay for lay in result_layers(viewer) if "level" in lay.name]
    assert main.visible and levels and not any(lay.visible for lay in levels)
    assert [lay.name for lay in levels] == [
        f"synthetic blood smear diffcut level {d}" for d in range(1, len(levels) + 1)
    ]
    meta = main.metadata[LAYER_KEY]
    seg = meta["segmentation"]
    assert meta["role"] == "main" and meta["level"] is None
    assert meta["source"] == "synthetic blood smear"
    assert meta["settings"]["model"] == str(tiny_model)
    assert meta["settings"]["backbone"] == "diffusion"
    assert meta["version"]
    np.testing.assert_array_equal(main.data, seg.labels)
    for d, lay in enumerate(levels, start=1):
        assert lay.metadata[LAYER_KEY]["level"] == d
        np.testing.assert_array_equal(lay.data, seg.levels[d - 1])
    assert list(main.features.columns) == ["index", "level", "parent", "area", "ncut_cost"]
    assert int(main.features["area"].sum()) == main.data.size
    np.testing.assert_array_equal(image.data, viewer.layers[image.name].data)
    assert len(engine_runs) == 1 and loads == [str(tiny_model)]

    # Moving the threshold re-cuts at once, without running the model again.
    widget.auto_check.value = False
    assert widget.threshold_slider.enabled
    before = np.array(main.data)
    for value in (1e-3, 1.0, 0.05, 0.3):
        widget.threshold_value = value
        if not np.array_equal(main.data, before):
            break
    assert not np.array_equal(main.data, before)
    tau = widget.threshold_value
    assert widget.threshold_readout.value == f"{tau:.3g}"
    np.testing.assert_array_equal(main.data, seg.cut(tau))
    assert main.metadata[LAYER_KEY]["threshold"] == pytest.approx(tau)
    assert len(engine_runs) == 1

    # A second run updates the same layers in place and reuses the loaded model.
    widget.power_spin.value = 2
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert viewer.layers["synthetic blood smear diffcut"] is main or (
        viewer.layers["synthetic blood smear diffcut"] == main
    )
    assert len([lay for lay in result_layers(viewer) if lay.name.endswith("]")]) == 0
    assert main.metadata[LAYER_KEY]["settings"]["power"] == 2
    assert len(engine_runs) == 2 and loads == [str(tiny_model)]
    assert widget.engine.loaded

    # Choosing another model loads that one.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    widget.model_edit.value = str(other)
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert loads == [str(tiny_model), str(other)]
    assert main.metadata[LAYER_KEY]["settings"]["model"] == str(other)

    # Closing the widget frees the model.
    viewer.window.remove_dock_widget(widget.native)
    assert not widget.engine.loaded


def test_pixels_backbone_on_sample(docked: tuple[Any, DiffCutWidget], qtbot: Any) -> None:
    viewer, widget = docked
    viewer.open_sample("napari-diffcut", "blood_smear")
    widget.backbone_combo.value = "pixels"
    assert not widget.model_edit.enabled  # diffusion-only fields are off
    widget.max_depth_spin.value = 2
    widget.min_size_spin.value = 64
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    main = viewer.layers["synthetic blood smear diffcut"]
    meta = main.metadata[LAYER_KEY]
    assert meta["settings"]["backbone"] == "pixels"
    assert meta["settings"]["max_depth"] == 2
    assert len(main.features) == len(np.unique(main.data))
    assert "segments" in widget.result_label.value


def test_refine_switch_and_instance_count_on_the_nuclei_sample(
    docked: tuple[Any, DiffCutWidget], qtbot: Any
) -> None:
    from napari_diffcut.plugin.instances import INSTANCES_KEY, instances_layer_name

    viewer, widget = docked
    [image] = viewer.open_sample("napari-diffcut", "nuclei")
    widget.backbone_combo.value = "pixels"
    assert widget.refine_check.value is True and widget.instances_check.value is False
    widget.refine_check.value = False
    widget.instances_check.value = True
    widget.instance_min_spin.value = 20
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    main = viewer.layers[f"{image.name} diffcut"]
    assert main.metadata[LAYER_KEY]["settings"]["refined"] is False
    inst = viewer.layers[instances_layer_name(image.name)]
    entry = inst.metadata[INSTANCES_KEY]
    assert entry["min_size"] == 20 and entry["count"] == len(inst.features) > 0
    assert f"{entry['count']} instances" in widget.status_label.value
    # Run on a stack with instances: refused before anything runs.
    viewer.add_image(np.zeros((2, 64, 64), np.uint16), name="zstack")
    widget.image_combo.value = viewer.layers["zstack"]
    widget.run_on_combo.value = "stack"
    widget.run_button.clicked()
    assert not widget.running and "zstack diffcut" not in viewer.layers


def test_closing_the_widget_stops_click_edits(
    docked: tuple[Any, DiffCutWidget], qtbot: Any
) -> None:
    viewer, widget = docked
    image = viewer.add_image(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)), name="ramp")
    widget.backbone_combo.value = "pixels"
    widget.max_depth_spin.value = 2
    widget.min_size_spin.value = 4
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    main = viewer.layers["ramp diffcut"]
    viewer.layers.selection.active = main
    editor = widget.hierarchy_editor
    editor.click_action.value = "split"
    raw = getattr(main, "__wrapped__", main)
    assert editor.layer is raw and editor._on_mouse in raw.mouse_drag_callbacks
    viewer.window.remove_dock_widget(widget.native)
    assert editor._on_mouse not in raw.mouse_drag_callbacks
    viewer.layers.selection.active = image
    viewer.layers.selection.active = main  # a closed editor does not hook on again
    assert editor.layer is None and editor._on_mouse not in raw.mouse_drag_callbacks


def test_cancel_mid_run_leaves_no_layer(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, tiny_model: Path, gated_run: dict[str, Any]
) -> None:
    viewer, widget = docked
    start_paused_run(docked, qtbot, tiny_model, gated_run)
    widget.cancel()  # the run is paused inside the engine: it is mid-run
    gated_run["gate"].set()
    wait_done(qtbot, widget)
    qtbot.wait(50)
    assert result_layers(viewer) == []
    assert widget.status_label.value == "cancelled"
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    # The engine generator was closed at once, in the worker thread (its arrays freed).
    assert gated_run["closed_in"] is not None
    assert gated_run["closed_in"] is not threading.main_thread()


def test_closing_mid_run_frees_the_model_loaded_after_close(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, tiny_model: Path, gated_run: dict[str, Any]
) -> None:
    viewer, widget = docked
    start_paused_run(docked, qtbot, tiny_model, gated_run)  # the model is not loaded yet
    viewer.window.remove_dock_widget(widget.native)
    gated_run["gate"].set()  # the run goes on to load the model, then sees the stop
    wait_done(qtbot, widget)
    assert not widget.engine.loaded
    assert result_layers(viewer) == []


def test_gui_stays_responsive_during_a_run(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, tiny_model: Path, gated_run: dict[str, Any]
) -> None:
    """The run cannot go on until the Qt event loop has fired a timer several times."""
    viewer, widget = docked
    viewer.open_sample("napari-diffcut", "blood_smear")
    widget.model_edit.value = str(tiny_model)
    ticks = {"n": 0, "run_enabled_while_running": []}

    def tick() -> None:
        ticks["n"] += 1
        if widget.running:
            ticks["run_enabled_while_running"].append(widget.run_button.enabled)

    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(tick)
    timer.start()

    def release_after_ticks() -> None:  # runs in the worker thread, mid-run
        start = ticks["n"]
        deadline = time.monotonic() + 30
        while ticks["n"] < start + 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        gated_run["gate"].set()

    gated_run["before_gate"] = release_after_ticks
    try:
        widget.run_button.clicked()
        wait_done(qtbot, widget)
    finally:
        timer.stop()
    assert gated_run["gate_ok"] is True
    assert ticks["run_enabled_while_running"] and not any(ticks["run_enabled_while_running"])
    assert viewer.layers["synthetic blood smear diffcut"].data.shape == (256, 256)


def test_missing_model_notifies_and_adds_nothing(
    docked: tuple[Any, DiffCutWidget],
    qtbot: Any,
    tmp_path: Path,
    notifications: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub.constants

    # No network here: fail at once instead of retrying the hub for a missing folder.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    viewer, widget = docked
    viewer.open_sample("napari-diffcut", "blood_smear")
    missing = tmp_path / "no-such-model"
    widget.model_edit.value = str(missing)
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    errors = [n for n in notifications if n.severity == NotificationSeverity.ERROR]
    assert errors and "no-such-model" in errors[-1].message
    assert errors[-1].message.startswith("DiffCut:")
    assert result_layers(viewer) == []
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert "failed" in widget.status_label.value
    assert widget.progress_bar.value == 0  # a full bar would say "done"


def test_failure_while_adding_layers_is_reported(
    docked: tuple[Any, DiffCutWidget],
    qtbot: Any,
    notifications: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import napari_diffcut.plugin.widget as widget_mod

    def no_memory(*_args: Any) -> Any:
        raise MemoryError("no room for the levels")

    monkeypatch.setattr(widget_mod, "plan_result_layers", no_memory)
    viewer, widget = docked
    viewer.add_image(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)), name="ramp")
    widget.backbone_combo.value = "pixels"
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    errors = [n for n in notifications if n.severity == NotificationSeverity.ERROR]
    assert errors and "no room for the levels" in errors[-1].message
    assert "failed" in widget.status_label.value and widget.progress_bar.value == 0
    assert widget.run_button.enabled and result_layers(viewer) == []


def test_bad_settings_show_an_error_and_do_not_start(
    docked: tuple[Any, DiffCutWidget], notifications: list[Any]
) -> None:
    viewer, widget = docked
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="rgb")
    assert widget.channel_axis_combo.value == 2 and widget.channels_edit.enabled
    widget.channels_edit.value = "red"
    widget.run_button.clicked()
    assert not widget.running
    assert any("channels" in n.message for n in notifications)
    assert result_layers(viewer) == []


def test_picker_follows_active_layer_and_nd_note(docked: tuple[Any, DiffCutWidget]) -> None:
    viewer, widget = docked
    assert widget.image_combo.value is None
    a = viewer.add_image(np.zeros((64, 64), np.uint16), name="a")
    b = viewer.add_image(np.zeros((3, 64, 64), np.uint8), name="b")
    viewer.add_labels(np.zeros((64, 64), np.uint32), name="not an image")
    assert [c.name for c in widget.image_combo.choices if c is not None] == ["a", "b"]
    viewer.layers.selection.active = viewer.layers["a"]
    assert widget.image_combo.value.name == "a"
    assert widget.plane_label.native.isHidden()  # (the viewer itself is never shown)
    viewer.layers.selection.active = viewer.layers["b"]
    assert widget.image_combo.value.name == "b"
    viewer.dims.set_current_step(0, 2)
    assert not widget.plane_label.native.isHidden()
    assert "axis 0 = 2" in widget.plane_label.value
    b.name = "renamed"
    assert "renamed" in [c.name for c in widget.image_combo.choices if c is not None]
    viewer.layers.remove("renamed")
    assert widget.image_combo.value.name == a.name
