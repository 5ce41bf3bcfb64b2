"""Issue #4 in the plugin: stacks, channels, tiles, dask/zarr and multiscale layers.

Headless (Xvfb via pytest-xvfb): the dock widget through the plugin manager
(``make_napari_viewer_proxy``) and ``segment_layer`` on a hidden viewer. Fast
weight-free settings: the pixels backbone at a 128 px working size.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dask.array as da
import napari
import numpy as np
import pytest

import napari_diffcut.large.dispatch as engine_mod
from napari_diffcut.large.stacks import StackSegmentation
from napari_diffcut.large.tiling import TiledSegmentation
from napari_diffcut.pipeline.segmentation import LazySegmentation
from napari_diffcut.pipeline.settings import Progress, Settings
from napari_diffcut.plugin.layers import LAYER_KEY, is_edited
from napari_diffcut.plugin.run import RunPanel
from napari_diffcut.plugin.scripting import recut_layer, segment_layer
from napari_diffcut.plugin.take import layer_defaults
from napari_diffcut.plugin.widget import DiffCutWidget

RUN_TIMEOUT_MS = 120_000
FAST = {"backbone": "pixels", "working_size": 128, "min_size": 4, "max_depth": 3}


def blobs(shape: tuple[int, int], seed: int, dtype: Any = np.uint8) -> np.ndarray:
    """A dark field with a few bright discs (distinct per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 30.0)
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8, 2) * shape
        r = rng.uniform(0.1, 0.2) * min(shape)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(150, 230)
    scale = 255 if dtype == np.uint8 else 4000
    return (img / 255 * scale).astype(dtype)


def stack_of(n: int, shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    return np.stack([blobs(shape, seed) for seed in range(n)])


@pytest.fixture
def docked(make_napari_viewer_proxy: Any) -> tuple[Any, DiffCutWidget]:
    viewer = make_napari_viewer_proxy()
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffcut", "DiffCut")
    return viewer, widget


@pytest.fixture
def hidden_viewer(make_napari_viewer: Any) -> napari.Viewer:
    """A ``napari.Viewer(show=False)`` that is never shown (napari's fixture cleans it up).

    napari's fixture rather than a plain viewer: mixing both in one module
    registers the plugin's commands twice in napari's application.
    """
    return make_napari_viewer(show=False)


def fast_widget(widget: DiffCutWidget) -> None:
    widget.backbone_combo.value = "pixels"
    widget.working_size_spin.value = 128
    widget.min_size_spin.value = 4
    widget.max_depth_spin.value = 3


def run(qtbot: Any, widget: DiffCutWidget) -> None:
    widget.run_button.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def shown(widget: Any) -> bool:
    """Not hidden (the viewer itself is never shown, so ``visible`` reads False)."""
    return not widget.native.isHidden()


def result_layers(viewer: Any) -> list[Any]:
    return [lay for lay in viewer.layers if "diffcut" in lay.name]


@pytest.fixture
def progress_seen(monkeypatch: pytest.MonkeyPatch) -> list[Progress]:
    """Every progress event the widget receives (its real slot runs too)."""
    seen: list[Progress] = []
    real = RunPanel._on_progress

    def spy(self: RunPanel, event: Progress) -> None:
        seen.append(event)
        real(self, event)

    monkeypatch.setattr(RunPanel, "_on_progress", spy)
    return seen


class ReadLog:
    """A numpy array that records every read (key) and refuses to be read whole."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads: list[Any] = []

    def __getitem__(self, key: Any) -> np.ndarray:
        self.reads.append(key)
        return self._array[key]

    def planes_per_read(self) -> list[int]:
        """How many planes (indices of axis 0) each read covered."""
        out = []
        for key in self.reads:
            first = key[0] if isinstance(key, tuple) else key
            if isinstance(first, slice):
                out.append(len(range(*first.indices(self.shape[0]))))
            else:
                out.append(1)
        return out


# -- whole stacks -----------------------------------------------------------------
def test_whole_stack_gives_one_labels_layer_with_source_geometry(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, progress_seen: list[Progress]
) -> None:
    viewer, widget = docked
    data = stack_of(3)
    image = viewer.add_image(
        data,
        name="zstack",
        scale=(4.0, 0.5, 0.25),
        translate=(10.0, 1.0, 2.0),
        units=("um", "um", "um"),
        axis_labels=("z", "y", "x"),
    )
    fast_widget(widget)
    assert widget.channel_axis_combo.value == "none"
    assert shown(widget.run_on_combo) and widget.run_on_combo.value == "plane"
    assert not widget.consistent_check.enabled
    widget.run_on_combo.value = "stack"
    assert widget.consistent_check.enabled and "whole stack: 3 planes" in widget.plane_label.value
    widget.consistent_check.value = True
    run(qtbot, widget)

    [main] = result_layers(viewer)  # one layer: no per-level layers for a stack
    assert main.name == "zstack diffcut" and main.data.shape == (3, 64, 80)
    np.testing.assert_allclose(main.scale, (4.0, 0.5, 0.25))
    np.testing.assert_allclose(main.translate, (10.0, 1.0, 2.0))
    assert tuple(main.axis_labels) == ("z", "y", "x")
    assert [str(u) for u in main.units] == ["micrometer"] * 3
    meta = main.metadata[LAYER_KEY]
    seg = meta["segmentation"]
    assert isinstance(seg, StackSegmentation) and seg.consistent
    assert meta["role"] == "main" and meta["level"] is None and meta["source"] == "zstack"
    assert meta["kind"] == "stack" and meta["plane"] is None and meta["version"]
    assert meta["settings"]["consistent_stack"] is True and meta["settings"]["planes"] == 3
    np.testing.assert_array_equal(main.data, seg.labels)
    assert main.data is not seg.labels  # painting the layer never changes the result
    assert list(main.features.columns) == ["index", "area", "planes"]
    assert int(main.features["area"].sum()) == main.data.size
    np.testing.assert_array_equal(image.data, data)

    # Progress per plane: the bar counts planes, one "plane" event before each.
    planes = [e for e in progress_seen if e.stage == "plane"]
    assert [(e.step, e.total) for e in planes] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert widget.progress_bar.max == 3 and widget.progress_bar.value == 3
    assert "3 planes" in widget.status_label.value

    # The planes' trees were kept: the threshold re-cuts every plane, no model run.
    assert widget.auto_check.enabled
    widget.auto_check.value = False
    before = np.array(main.data)
    for value in (1e-3, 1.0, 0.05):
        widget.threshold_value = value
        if not np.array_equal(main.data, before):
            break
    assert not np.array_equal(main.data, before)
    np.testing.assert_array_equal(main.data, seg.cut(widget.threshold_value))
    assert main.metadata[LAYER_KEY]["threshold"] == pytest.approx(widget.threshold_value)
    assert not is_edited(main.data, main.metadata)

    # The hierarchy editor refuses a stack result (no single tree) cleanly.
    viewer.layers.selection.active = main
    editor = widget.hierarchy_editor
    assert editor.layer is None and "whole-stack" in editor.status.tooltip
    assert editor.split(int(main.data.max())) is False
    np.testing.assert_array_equal(main.data, seg.cut(widget.threshold_value))


def test_cancel_between_planes_leaves_no_layer(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel after the first plane: the run stops before plane 2, nothing is added."""
    state: dict[str, Any] = {"paused": threading.Event(), "gate": threading.Event()}
    real = engine_mod.iter_segment

    def gated(image: Any, settings: Any = None, **kwargs: Any) -> Any:
        gen = real(image, settings, **kwargs)
        try:
            for event in gen:
                yield event
                if event.stage == "plane" and event.step == 1:  # plane 1 done, 2 next
                    state["paused"].set()
                    state["gate"].wait(30)
            return None
        finally:
            gen.close()
            state["closed_in"] = threading.current_thread()

    monkeypatch.setattr(engine_mod, "iter_segment", gated)
    viewer, widget = docked
    viewer.add_image(stack_of(3), name="zstack")
    fast_widget(widget)
    widget.run_on_combo.value = "stack"
    widget.run_button.clicked()
    qtbot.waitUntil(state["paused"].is_set, timeout=RUN_TIMEOUT_MS)
    widget.cancel()
    state["gate"].set()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)
    qtbot.wait(50)
    assert result_layers(viewer) == []
    assert widget.status_label.value == "cancelled" and widget.progress_bar.value == 0
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert state["closed_in"] is not threading.main_thread()


def test_dask_stack_layer_is_read_one_plane_at_a_time(
    docked: tuple[Any, DiffCutWidget], qtbot: Any
) -> None:
    viewer, widget = docked
    source = ReadLog(stack_of(3))
    lazy = da.from_array(source, chunks=(1, 64, 80), asarray=False)
    viewer.add_image(lazy, name="dask stack", contrast_limits=(0, 255))
    fast_widget(widget)
    widget.run_on_combo.value = "stack"
    run(qtbot, widget)
    main = viewer.layers["dask stack diffcut"]
    assert main.data.shape == (3, 64, 80)
    assert isinstance(main.metadata[LAYER_KEY]["segmentation"], StackSegmentation)
    # Every read of the source (napari's own display included) covered one plane.
    assert source.reads and max(source.planes_per_read()) == 1
    # Each plane's labels come from that plane alone (same as segmenting it in memory).
    first = engine_mod.segment(source[0], threshold="auto", **FAST)
    np.testing.assert_array_equal(main.data[0], first.labels)


# -- channels ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "kwargs", "axis"),
    [
        ((2, 48, 64), {"axis_labels": ("c", "y", "x")}, 0),
        ((48, 64, 2), {"axis_labels": ("y", "x", "Channel")}, 2),
        ((48, 64, 3), {"rgb": True}, 2),
        ((3, 48, 64), {}, None),  # no label: a stack of 3 planes, as napari shows it
    ],
)
def test_channel_axis_default_comes_from_the_layer(
    docked: tuple[Any, DiffCutWidget], shape: tuple[int, ...], kwargs: dict[str, Any], axis: Any
) -> None:
    viewer, widget = docked
    dtype = np.uint8 if kwargs.get("rgb") else np.uint16
    viewer.add_image(np.zeros(shape, dtype), name="img", **kwargs)
    assert widget.channel_axis_combo.value == ("none" if axis is None else axis)
    assert widget.channels_edit.enabled == (axis is not None)
    assert shown(widget.run_on_combo) == (axis is None)  # 3 non-channel axes: a stack
    if kwargs.get("rgb"):  # an RGB layer's channels are its colours: no other choice
        assert list(widget.channel_axis_combo.choices) == [2]
    if axis == 2 and not kwargs.get("rgb"):  # (Y, X, C): a result cannot overlay it
        assert "will not overlay" in widget.plane_label.value


def test_16_bit_multichannel_layer_runs_on_its_channel_axis(
    docked: tuple[Any, DiffCutWidget], qtbot: Any
) -> None:
    viewer, widget = docked
    cyx = np.stack([blobs((48, 64), 1, np.uint16), blobs((48, 64), 2, np.uint16)])
    viewer.add_image(
        cyx,
        name="cells",
        axis_labels=("c", "y", "x"),
        scale=(1.0, 0.3, 0.2),
        contrast_limits=(0, 4000),
    )
    fast_widget(widget)
    assert widget.channel_axis_combo.value == 0
    run(qtbot, widget)
    main = viewer.layers["cells diffcut"]
    assert main.data.shape == (48, 64)  # the image's shape without the channel axis
    np.testing.assert_allclose(main.scale, (0.3, 0.2))
    assert tuple(main.axis_labels) == ("y", "x")
    settings = main.metadata[LAYER_KEY]["settings"]
    assert settings["channel_axis_used"] == 0 and settings["channels_used"] == [0, 1]
    assert settings["image_dtype"] == "uint16"
    assert any("level" in lay.name for lay in result_layers(viewer))  # 2-D: levels exist


def test_plane_of_a_zcyx_stack_keeps_all_channels(hidden_viewer: napari.Viewer) -> None:
    zcyx = np.stack([np.stack([blobs((40, 56), z), blobs((40, 56), z + 5)]) for z in range(3)])
    layer = hidden_viewer.add_image(zcyx, name="zc", axis_labels=("z", "c", "y", "x"))
    defaults = layer_defaults(layer)
    assert defaults.channel_axis == 1 and defaults.stack_shape == (3,)
    hidden_viewer.dims.set_current_step(0, 2)
    main = segment_layer(hidden_viewer, layer, **FAST)[0]
    meta = main.metadata[LAYER_KEY]
    assert meta["plane"] == [2, None, None, None] and main.data.shape == (40, 56)
    assert meta["settings"]["channels_used"] == [0, 1]
    expected = engine_mod.segment(zcyx[2], channel_axis=0, threshold="auto", **FAST)
    np.testing.assert_array_equal(main.data, expected.labels)


# -- large planes: tiles, lazy labels, pyramids ------------------------------------
def test_tiled_run_gives_stitched_labels_and_a_disabled_threshold(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, progress_seen: list[Progress]
) -> None:
    viewer, widget = docked
    big = blobs((1500, 1500), 7)
    viewer.add_image(big, name="field", scale=(0.1, 0.1))
    fast_widget(widget)
    assert not widget.overlap_auto_check.enabled
    widget.tile_size_spin.value = 512
    assert widget.overlap_auto_check.enabled and widget.overlap_auto_check.value  # auto
    run(qtbot, widget)
    [main] = result_layers(viewer)  # stitched labels only, no levels
    meta = main.metadata[LAYER_KEY]
    seg = meta["segmentation"]
    assert isinstance(seg, TiledSegmentation) and meta["kind"] == "tiled"
    assert main.data.shape == (1500, 1500) and main.data.min() >= 1
    np.testing.assert_array_equal(main.data, seg.labels)
    np.testing.assert_allclose(main.scale, (0.1, 0.1))
    assert meta["settings"]["tiles"] == 16 and meta["settings"]["tile_overlap"] == 64
    assert list(main.features.columns) == ["index", "area"]
    assert int(main.features["area"].sum()) == big.size
    tiles = [e for e in progress_seen if e.stage == "tile"]
    assert tiles[0].total == 16 and widget.progress_bar.max == 16
    # No common tree: the threshold cannot move, and the tooltip says why.
    assert not widget.threshold_slider.enabled and not widget.auto_check.enabled
    assert "tile" in widget.threshold_slider.tooltip
    assert "stitched from 16 tiles" in widget.result_label.value
    with pytest.raises(ValueError, match="tiled result"):
        recut_layer(viewer, "field", 0.5)


def test_multiscale_layer_runs_on_the_nearest_level(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, engine_calls: list[dict[str, Any]]
) -> None:
    viewer, widget = docked
    base = blobs((512, 384), 3)
    pyramid = [base, base[::2, ::2], base[::4, ::4]]
    viewer.add_image(pyramid, multiscale=True, name="pyr", scale=(2.0, 2.0))
    fast_widget(widget)
    assert "multiscale (3 levels)" in widget.plane_label.value
    run(qtbot, widget)
    main = viewer.layers["pyr diffcut"]
    assert main.data.shape == (512, 384)  # level 0's size
    np.testing.assert_allclose(main.scale, (2.0, 2.0))
    settings = main.metadata[LAYER_KEY]["settings"]
    assert settings["levels_in"] == 3 and settings["source_level"] == 2  # 128 x 96: nearest
    assert isinstance(engine_calls[-1]["image"], list)  # the pyramid, not a copy of level 0


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what each engine run was given, then run it for real."""
    calls: list[dict[str, Any]] = []
    real = engine_mod.iter_segment

    def spy(image: Any, settings: Any = None, **kwargs: Any) -> Any:
        calls.append({"image": image, "settings": settings, **kwargs})
        return real(image, settings, **kwargs)

    monkeypatch.setattr(engine_mod, "iter_segment", spy)
    return calls


def test_lazy_pyramid_gives_lazy_level0_labels(
    hidden_viewer: napari.Viewer, engine_calls: list[dict[str, Any]]
) -> None:
    """A dask pyramid beyond the memory budget: dask labels at level 0, nothing read whole."""
    base = blobs((1024, 768), 4)
    source = ReadLog(base[None])  # (1, Y, X): reads record their rows
    level0 = da.from_array(source, chunks=(1, 256, 768), asarray=False)[0]
    pyramid = [level0, da.from_array(base[::4, ::4]), da.from_array(base[::8, ::8])]
    layer = hidden_viewer.add_image(pyramid, multiscale=True, name="slide")
    source.reads.clear()  # what napari read to show the layer does not count
    main, *levels = segment_layer(hidden_viewer, layer, memory_budget=1, **FAST)
    seg = main.metadata[LAYER_KEY]["segmentation"]
    assert isinstance(seg, LazySegmentation) and levels  # 2-D: the tree's levels too
    assert isinstance(main.data, da.Array) and main.data.shape == (1024, 768)
    assert main.metadata[LAYER_KEY]["data_token"] == main.data.name
    assert main.metadata[LAYER_KEY]["settings"]["source_level"] == 2
    # Features from per-leaf areas: every pixel counted once, no level-0 array built.
    assert int(main.features["area"].sum()) == base.size
    np.testing.assert_array_equal(main.data[:64, :64].compute(), seg.labels[:64, :64].compute())
    # The run read level 2 only (napari may show a coarse level; level 0 is never read).
    assert source.reads == []
    assert not is_edited(main.data, main.metadata)
    # A re-run updates the lazy layer in place; after a paint stroke it is kept.
    again = segment_layer(hidden_viewer, layer, memory_budget=1, **{**FAST, "seed": 1})
    assert again[0] is main
    main.paint((5, 5), 7, refresh=False)
    assert is_edited(main.data, main.metadata)
    third = segment_layer(hidden_viewer, layer, memory_budget=1, **FAST)
    assert third[0] is not main and third[0].name == "slide diffcut [1]"


# -- scripted sessions --------------------------------------------------------------
def test_segment_layer_whole_stack_on_hidden_viewer(hidden_viewer: napari.Viewer) -> None:
    data = stack_of(3)
    layer = hidden_viewer.add_image(
        data, name="st", scale=(5.0, 0.5, 0.5), axis_labels=("z", "y", "x")
    )
    events: list[Progress] = []
    layers = segment_layer(hidden_viewer, layer, run_on="stack", progress=events.append, **FAST)
    [main] = layers
    assert [lay.name for lay in hidden_viewer.layers] == ["st", "st diffcut"]
    assert main.data.shape == (3, 64, 80)
    np.testing.assert_allclose(main.scale, (5.0, 0.5, 0.5))
    assert [e.step for e in events if e.stage == "plane"] == [0, 1, 2, 3]
    seg = main.metadata[LAYER_KEY]["segmentation"]
    # Without consistent_stack, labels are per plane: no features table.
    assert not seg.consistent and len(main.features) == 0
    for z in range(3):  # each plane as the 2-D run would give it
        plane = engine_mod.segment(data[z], threshold="auto", **FAST)
        np.testing.assert_array_equal(main.data[z], plane.labels)
    # Same call again: updated in place. The displayed plane is still the default.
    assert segment_layer(hidden_viewer, layer, run_on="stack", **FAST)[0] is main
    plane_run = segment_layer(hidden_viewer, layer, **FAST)
    assert plane_run[0] is main and main.data.shape == (64, 80)  # now one plane, with levels
    assert len(plane_run) > 1


def test_widget_and_segment_layer_agree_on_a_stack(
    docked: tuple[Any, DiffCutWidget], qtbot: Any
) -> None:
    viewer, widget = docked
    viewer.add_image(stack_of(2), name="a")
    fast_widget(widget)
    widget.run_on_combo.value = "stack"
    widget.consistent_check.value = True
    run(qtbot, widget)
    by_widget = np.array(viewer.layers["a diffcut"].data)
    settings, _ = widget.settings()
    viewer.layers.remove("a diffcut")
    main = segment_layer(
        viewer, "a", run_on="stack", consistent_stack=True, **FAST, threshold="auto"
    )[0]
    np.testing.assert_array_equal(main.data, by_widget)
    assert settings.consistent_stack and settings.working_size == 128


# -- lifetime ---------------------------------------------------------------------
def test_closing_the_viewer_frees_the_model(
    docked: tuple[Any, DiffCutWidget], qtbot: Any, tiny_model: Path
) -> None:
    viewer, widget = docked
    viewer.add_image(blobs((48, 64), 0), name="img")
    fast_widget(widget)
    run(qtbot, widget)  # a run starts watching the viewer's window
    widget.engine.model_for(Settings(model=str(tiny_model)))  # as a diffusion run leaves it
    assert widget.engine.loaded
    viewer.close()
    assert not widget.engine.loaded
    assert widget._disposed


def test_whole_stack_with_the_tiny_diffusion_model(
    hidden_viewer: napari.Viewer, tiny_model: Path
) -> None:
    layer = hidden_viewer.add_image(stack_of(2, (48, 64)), name="st", scale=(2.0, 1.0, 1.0))
    engine = engine_mod.DiffCutEngine()
    [main] = segment_layer(
        hidden_viewer, layer, run_on="stack", model=str(tiny_model), engine=engine, min_size=4
    )
    seg = main.metadata[LAYER_KEY]["segmentation"]
    assert main.data.shape == (2, 48, 64) and isinstance(seg, StackSegmentation)
    assert all(p.settings["backbone"] == "diffusion" for p in seg.planes)
    assert seg.planes[0].settings["device_used"] == "cpu" and engine.loaded
    np.testing.assert_allclose(main.scale, (2.0, 1.0, 1.0))
