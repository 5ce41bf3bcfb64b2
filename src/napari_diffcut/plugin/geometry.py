"""Where a result sits: the source axes it keeps, and the displayed plane of a stack.

Pure functions, no Qt, no napari import: :class:`Geometry` (scale, translate,
units, axis labels of the kept axes), the default channel axis of a layer, the
index of the displayed 2-D plane of an nD layer, and whether a result lines up
with its layer in napari (which aligns layers by their last axes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Geometry:
    """World placement of a result: the source axes it kept.

    A 2-D result keeps the source's (Y, X) plane axes; a whole-stack result
    keeps every axis but the channel axis.

    Attributes
    ----------
    scale, translate : tuple of float
        Per kept axis, copied from the source layer.
    units, axis_labels : tuple of str, optional
        Per kept axis, copied from the source layer (None: napari's default).
    """

    scale: tuple[float, ...] = (1.0, 1.0)
    translate: tuple[float, ...] = (0.0, 0.0)
    units: tuple[str, ...] | None = None
    axis_labels: tuple[str, ...] | None = None

    @classmethod
    def from_placement(cls, placement: dict[str, Any]) -> Geometry:
        """The geometry recorded in a saved result's JSON ``layer`` placement.

        Entries that are missing or not a pair fall back to napari's defaults.
        """

        def pair(key: str, cast: type) -> Any:
            values = placement.get(key)
            if not isinstance(values, list | tuple) or len(values) != 2:
                return None
            return (cast(values[0]), cast(values[1]))

        return cls(
            scale=pair("scale", float) or (1.0, 1.0),
            translate=pair("translate", float) or (0.0, 0.0),
            units=pair("units", str),
            axis_labels=pair("axis_labels", str),
        )

    def as_kwargs(self) -> dict[str, Any]:
        """Layer keyword arguments (units/axis_labels only when known)."""
        kw: dict[str, Any] = {"scale": self.scale, "translate": self.translate}
        if self.units is not None:
            kw["units"] = self.units
        if self.axis_labels is not None:
            kw["axis_labels"] = self.axis_labels
        return kw


def plane_geometry(layer: Any, axes: Sequence[int] | None = None) -> Geometry:
    """Geometry of a layer's plane axes (default: its last two axes).

    ``layer`` is anything with napari's ``scale``, ``translate`` and, when
    present, ``units`` and ``axis_labels`` (one entry per layer axis).
    """
    n = len(layer.scale)
    picked = list(axes) if axes is not None else [n - 2, n - 1]
    if len(picked) != 2:
        raise ValueError(f"axes must name two layer axes, got {axes!r}")
    return axes_geometry(layer, picked)


def axes_geometry(layer: Any, axes: Sequence[int] | None = None) -> Geometry:
    """Geometry of some of a layer's axes, in order (default: all of them).

    ``layer`` is anything with napari's ``scale``, ``translate`` and, when
    present, ``units`` and ``axis_labels`` (one entry per layer axis; an
    RGB layer's colour axis is not one).
    """
    n = len(layer.scale)
    picked = [int(a) % n for a in (range(n) if axes is None else axes)]
    if len(picked) < 2 or len(set(picked)) != len(picked):
        raise ValueError(f"axes must name at least two distinct layer axes, got {axes!r}")

    def some(values: Any, cast: type) -> Any:
        if values is None:
            return None
        seq = list(values)
        if len(seq) != n:
            return None
        return tuple(cast(seq[a]) for a in picked)

    return Geometry(
        scale=some(layer.scale, float),
        translate=some(layer.translate, float),
        units=some(getattr(layer, "units", None), str),
        axis_labels=some(getattr(layer, "axis_labels", None), str),
    )


#: Axis labels that name a channel axis (compared case-insensitively).
CHANNEL_AXIS_NAMES = frozenset({"c", "ch", "chan", "channel", "channels"})


def layer_channel_axis(
    data_ndim: int, rgb: bool, axis_labels: Sequence[str] | None = None
) -> int | None:
    """Default channel axis of an image layer, in the axes of its data (None: none).

    An RGB(A) layer's colour axis (the data's last axis, which is not a
    layer axis) comes first; otherwise the axis whose label is one of
    :data:`CHANNEL_AXIS_NAMES` ("c", "channel", ... as napari readers and
    ``add_image(axis_labels=...)`` write them). Anything else has no channel
    axis: every axis is one that napari shows, so the stack is what you see.

    Examples
    --------
    >>> layer_channel_axis(3, True), layer_channel_axis(3, False, ("c", "y", "x"))
    (2, 0)
    >>> layer_channel_axis(3, False, ("z", "y", "x")) is None
    True
    """
    if rgb:
        return data_ndim - 1
    for axis, label in enumerate(axis_labels or ()):
        if str(label).strip().lower() in CHANNEL_AXIS_NAMES:
            return axis
    return None


def plane_selection(
    shape: Sequence[int], position: Sequence[float], plane_axes: Sequence[int]
) -> tuple[tuple[int | slice, ...], list[int | None]]:
    """Index that takes the 2-D plane through ``position`` of an nD array.

    Parameters
    ----------
    shape : sequence of int
        Shape of the layer's data over its (non-channel) axes.
    position : sequence of float
        Data coordinates of the current slice (napari ``world_to_data``).
    plane_axes : sequence of int
        The axes kept whole: the displayed (Y, X) plane, and a channel axis.

    Returns
    -------
    index : tuple
        ``slice(None)`` on kept axes, the rounded, clipped position elsewhere.
    plane : list
        The same as JSON-friendly metadata (None on kept axes).
    """
    if len(shape) != len(position):
        raise ValueError(f"position {list(position)} does not match shape {tuple(shape)}")
    index: list[int | slice] = []
    plane: list[int | None] = []
    for axis, (size, pos) in enumerate(zip(shape, position, strict=True)):
        if axis in plane_axes:
            index.append(slice(None))
            plane.append(None)
        else:
            i = int(min(max(round(float(pos)), 0), size - 1))
            index.append(i)
            plane.append(i)
    return tuple(index), plane


def displayed_plane_axes(
    layer_ndim: int,
    viewer_ndim: int,
    displayed: Sequence[int],
    plane_axes: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Layer axes of the displayed 2-D plane; they must be the (Y, X) plane axes.

    ``plane_axes`` are the layer's (Y, X) axes: its last two axes (default),
    or the last two that are not the channel axis. napari aligns a layer's
    axes with the viewer's *last* axes. A 2-D result lands on the viewer's
    last two axes, so it is placed correctly only when the displayed plane
    is the source's (Y, X) plane (in either order: a swapped Y/X view shows
    the result swapped the same way). Other transposed views are refused
    with a message saying how to fix them.
    """
    want = tuple(plane_axes) if plane_axes is not None else (layer_ndim - 2, layer_ndim - 1)
    offset = viewer_ndim - layer_ndim
    layer_axes = [a - offset for a in displayed if a - offset >= 0]
    if len(layer_axes) < 2:
        raise ValueError(
            f"the displayed axes {tuple(displayed)} show fewer than two axes of this layer"
        )
    axes = (layer_axes[-2], layer_axes[-1])
    if sorted(axes) != sorted(want):
        which = "last two" if plane_axes is None else "(Y, X)"
        raise ValueError(
            f"the displayed plane shows layer axes {axes}; DiffCut segments the "
            f"{which} axes {want} = (Y, X). Reset the axis order "
            "(viewer.dims.order, or the 'transpose' button) and try again"
        )
    return (int(want[0]), int(want[1]))


def lines_up(kept_axes: Sequence[int], layer_ndim: int) -> bool:
    """Whether a result keeping ``kept_axes`` of a layer lines up with it in napari.

    napari aligns layers by their last axes, so a result lines up when the
    axes it dropped (channel axis, the indices of a plane) all come first.

    Examples
    --------
    >>> lines_up((1, 2), 3), lines_up((0, 2, 3), 4), lines_up((1, 2, 3), 4)
    (True, False, True)
    """
    n = len(kept_axes)
    return list(kept_axes) == list(range(layer_ndim - n, layer_ndim))
