"""``segment_layer`` on a viewer that is never shown: layers, updates, edits, planes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import napari
import numpy as np
import pytest

import napari_diffcut
import napari_diffcut.large.dispatch as engine_mod
from napari_diffcut.plugin.layers import LAYER_KEY
from napari_diffcut.plugin.sample_data import make_blood_smear
from napari_diffcut.plugin.scripting import recut_layer, segment_layer

#: Fast weight-free settings (a 16 x 16 patch grid).
FAST = {"backbone": "pixels", "working_size": 128, "min_size": 4, "max_depth": 3}


@pytest.fixture
def smear(viewer: napari.Viewer) -> Any:
    image, _ = make_blood_smear(128, seed=1)
    return viewer.add_image(
        image,
        name="smear",
        rgb=True,
        scale=(0.5, 0.25),
        translate=(3.0, 4.0),
        units=("um", "um"),
        axis_labels=("y", "x"),
    )


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every engine run (image and keyword arguments), then run it for real."""
    calls: list[dict[str, Any]] = []
    real = engine_mod.iter_segment

    def spy(image: Any, settings: Any = None, **kwargs: Any) -> Any:
        calls.append({"image": np.array(image), **kwargs})
        return real(image, settings, **kwargs)

    monkeypatch.setattr(engine_mod, "iter_segment", spy)
    return calls


def diffcut_layers(viewer: napari.Viewer) -> list[str]:
    return [lay.name for lay in viewer.layers if "diffcut" in lay.name]


def test_segment_layer_on_hidden_viewer(viewer: napari.Viewer, smear: Any) -> None:
    before = smear.data.copy()
    points = viewer.add_points([[1.0, 2.0]], name="marks")
    layers = napari_diffcut.segment_layer(viewer, smear, **FAST)
    main, *levels = layers
    assert main.name == "smear diffcut" and main.visible
    assert [lay.name for lay in levels] == [
        f"smear diffcut level {d}" for d in range(1, len(levels) + 1)
    ]
    assert levels and not any(lay.visible for lay in levels)
    assert all(isinstance(lay, napari.layers.Labels) for lay in layers)
    for lay in layers:
        np.testing.assert_allclose(lay.scale, (0.5, 0.25))
        np.testing.assert_allclose(lay.translate, (3.0, 4.0))
        assert [str(u) for u in lay.units] == ["micrometer", "micrometer"]
        assert tuple(lay.axis_labels) == ("y", "x")
        assert lay.data.shape == (128, 128)
    meta = main.metadata[LAYER_KEY]
    seg = meta["segmentation"]
    np.testing.assert_array_equal(main.data, seg.labels)
    assert meta["role"] == "main" and meta["source"] == "smear"
    assert meta["settings"]["backbone"] == "pixels"
    assert list(main.features.columns) == ["index", "level", "parent", "area", "ncut_cost"]
    assert sorted(main.features["index"]) == sorted(np.unique(main.data))
    # The source and other layers are untouched.
    np.testing.assert_array_equal(smear.data, before)
    np.testing.assert_array_equal(points.data, [[1.0, 2.0]])
    assert viewer.layers[-1] is main  # on top, levels below it


def test_rerun_updates_in_place(viewer: napari.Viewer, smear: Any) -> None:
    first = segment_layer(viewer, smear, **FAST)
    second = segment_layer(viewer, "smear", **{**FAST, "threshold": 1.0})
    assert second[0] is first[0]
    assert len(viewer.layers) == 1 + len(second)
    assert second[0].metadata[LAYER_KEY]["threshold"] == 1.0
    np.testing.assert_array_equal(
        second[0].data, second[0].metadata[LAYER_KEY]["segmentation"].cut(1.0)
    )


def test_update_in_place_shows_the_new_result_to_data_listeners(
    viewer: napari.Viewer, smear: Any
) -> None:
    """A listener of the data event (the hierarchy editor) sees the new tree, not the old."""
    main = segment_layer(viewer, smear, **FAST)[0]
    old = main.metadata[LAYER_KEY]["segmentation"]
    seen: list[Any] = []
    main.events.data.connect(lambda _e: seen.append(main.metadata[LAYER_KEY]["segmentation"]))
    assert segment_layer(viewer, smear, **{**FAST, "seed": 3})[0] is main
    new = main.metadata[LAYER_KEY]["segmentation"]
    assert new is not old and seen and all(s is new for s in seen)


def test_painted_layer_is_never_overwritten(viewer: napari.Viewer, smear: Any) -> None:
    main = segment_layer(viewer, smear, **FAST)[0]
    painted = main.data.copy()
    painted[:10, :10] = 999
    main.data = painted
    messages: list[str] = []
    napari.utils.notifications.notification_manager.notification_ready.connect(
        lambda n: messages.append(n.message)
    )
    again = segment_layer(viewer, smear, **{**FAST, "seed": 1})
    np.testing.assert_array_equal(main.data, painted)  # the user's edit survives
    assert again[0] is not main and again[0].name == "smear diffcut [1]"
    assert any("smear diffcut [1]" in m for m in messages)
    # A third run updates the unedited "[1]" layer, not the painted one.
    third = segment_layer(viewer, smear, **FAST)
    assert third[0] is again[0]
    np.testing.assert_array_equal(main.data, painted)


def test_diffusion_backbone_with_tiny_model(
    viewer: napari.Viewer, smear: Any, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_diffcut.attention.model as model_mod

    loads: list[str] = []
    real_load = model_mod.load_model

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(str(args[0]))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_mod, "load_model", counting_load)
    engine = napari_diffcut.DiffCutEngine()
    layers = segment_layer(viewer, smear, model=str(tiny_model), engine=engine, min_size=4)
    meta = layers[0].metadata[LAYER_KEY]
    assert meta["settings"]["backbone"] == "diffusion"
    assert meta["settings"]["model"] == str(tiny_model)
    assert meta["settings"]["device_used"] == "cpu"
    segment_layer(viewer, smear, model=str(tiny_model), engine=engine, min_size=4, power=2)
    assert loads == [str(tiny_model)]  # one engine, one load


def test_16_bit_maps_as_the_cli_unless_contrast_limits_are_asked_for(
    viewer: napari.Viewer, engine_calls: list[dict[str, Any]]
) -> None:
    """Issue 13 point 6: percentiles by default (as the CLI), the layer's limits on request."""
    [nuclei] = viewer.open_sample("napari-diffcut", "nuclei")
    nuclei.contrast_limits = (250.0, 3000.0)
    [main, *_] = segment_layer(viewer, nuclei, **FAST)
    assert engine_calls[-1]["contrast_limits"] is None
    assert engine_calls[-1]["image"].dtype == np.uint16
    assert main.metadata[LAYER_KEY]["settings"]["intensity"] == "percentiles"
    [main, *_] = segment_layer(viewer, nuclei, contrast_limits="layer", **FAST)
    assert engine_calls[-1]["contrast_limits"] == (250.0, 3000.0)
    assert main.metadata[LAYER_KEY]["settings"]["intensity"] == "contrast_limits"
    segment_layer(viewer, nuclei, contrast_limits=(0, 5000), **FAST)
    assert engine_calls[-1]["contrast_limits"] == (0.0, 5000.0)


def test_nd_layer_segments_the_displayed_plane(
    viewer: napari.Viewer, engine_calls: list[dict[str, Any]]
) -> None:
    stack = np.stack([make_blood_smear(128, seed=s)[0][..., 0] for s in range(3)])
    layer = viewer.add_image(stack, name="stack", scale=(5.0, 0.5, 0.5))
    viewer.dims.set_current_step(0, 2)
    main = segment_layer(viewer, layer, **FAST)[0]
    np.testing.assert_array_equal(engine_calls[-1]["image"], stack[2])
    assert main.metadata[LAYER_KEY]["plane"] == [2, None, None]
    assert main.data.shape == (128, 128)
    np.testing.assert_allclose(main.scale, (0.5, 0.5))


def test_recut_layer_needs_no_model(
    viewer: napari.Viewer, smear: Any, engine_calls: list[dict[str, Any]]
) -> None:
    main = segment_layer(viewer, smear, **FAST)[0]
    seg = main.metadata[LAYER_KEY]["segmentation"]
    n_calls = len(engine_calls)
    layers = recut_layer(viewer, smear, 1.0)
    assert layers[0] is main
    np.testing.assert_array_equal(main.data, seg.cut(1.0))
    np.testing.assert_array_equal(seg.labels, main.data)  # the result follows the layer
    assert main.metadata[LAYER_KEY]["threshold"] == 1.0
    assert len(engine_calls) == n_calls
    assert recut_layer(viewer, "no such image", 0.5) == []


def test_bad_input(viewer: napari.Viewer, smear: Any) -> None:
    labels = viewer.add_labels(np.zeros((8, 8), np.uint32), name="lab")
    with pytest.raises(ValueError, match="Image layer"):
        segment_layer(viewer, labels, **FAST)
    with pytest.raises(ValueError, match="layer must be an image layer"):
        segment_layer(viewer, "missing", **FAST)
    with pytest.raises(ValueError, match="run_on"):
        segment_layer(viewer, smear, run_on="volume", **FAST)
    with pytest.raises(ValueError, match="channel_axis.*RGB axis"):
        segment_layer(viewer, smear, channel_axis=0, **FAST)
    stack = viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="stack")
    with pytest.raises(ValueError, match=r"channel_axis.*0\.\.2 or 'none'"):
        segment_layer(viewer, stack, channel_axis=5, **FAST)
    with pytest.raises(TypeError, match="unknown setting"):
        segment_layer(viewer, smear, no_such_setting=1)
    with pytest.raises(ValueError, match="contrast_limits"):
        segment_layer(viewer, smear, contrast_limits=(5, 1), **FAST)
    assert diffcut_layers(viewer) == []
