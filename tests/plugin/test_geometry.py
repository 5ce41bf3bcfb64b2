"""Where results sit: geometry of kept axes, the displayed plane, channel axes (pure)."""

from __future__ import annotations

import pytest

from napari_diffcut.plugin.geometry import (
    Geometry,
    axes_geometry,
    displayed_plane_axes,
    layer_channel_axis,
    lines_up,
    plane_geometry,
    plane_selection,
)


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


def test_geometry_from_a_saved_placement() -> None:
    geo = Geometry.from_placement(
        {"scale": [2.0, 0.5], "translate": [1, 2], "units": ["um", "um"], "axis_labels": "yx"}
    )
    assert geo == Geometry((2.0, 0.5), (1.0, 2.0), ("um", "um"), None)
    assert Geometry.from_placement({}) == Geometry()


# -- issue #4: stacks, tiles, lazy labels -------------------------------------------


def test_layer_channel_axis_and_alignment() -> None:

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
