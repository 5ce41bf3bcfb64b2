"""The image a run sees, taken from a napari image layer on the GUI thread.

:func:`layer_defaults` reads what a run of a layer defaults to (channel axis,
stack, pyramid); :func:`layer_image` takes the displayed plane or the whole
stack (numpy data copied up to a memory budget, dask and zarr data left lazy:
the engine reads them plane by plane, tile by tile).

Intensities (issue 13, point 6): by default a run maps intensities exactly as
the CLI and the Python API do (``Settings.normalize``, percentiles), so a file
gives the same result everywhere. The layer's contrast limits are used only
when asked for (``contrast_limits="layer"``, the widget's *use layer contrast
limits*); :func:`record_intensity` writes which mapping was used into the
result's settings record (``"intensity"``).

napari is imported inside the functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_diffcut.core.image import NO_CHANNEL_AXIS
from napari_diffcut.plugin.geometry import (
    Geometry,
    axes_geometry,
    displayed_plane_axes,
    layer_channel_axis,
    lines_up,
    plane_selection,
)
from napari_diffcut.plugin.layers import as_dask

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.pipeline.settings import Settings

#: ``contrast_limits`` value meaning "use the image layer's contrast limits".
FROM_LAYER = "layer"
#: ``channel_axis`` value meaning "the layer's own" (see :func:`layer_defaults`).
LAYER_DEFAULT = "layer"
#: What a run covers for a layer with more than two (non-channel) axes.
RUN_ON = ("plane", "stack")
#: Memory budget (MiB) when none is given: numpy data up to it is copied for a run.
DEFAULT_BUDGET_MIB = 512


@dataclass
class LayerImage:
    """The image a run sees, taken from an image layer on the GUI thread.

    Attributes
    ----------
    image : array-like or list of array-likes
        The displayed plane ((Y, X) plus a channel axis), or the whole layer
        ((..., Y, X) plus a channel axis); a list for a multiscale layer
        (largest level first; the engine runs on the level nearest the
        working size). numpy data is a copy (up to the memory budget); dask
        and zarr data stay lazy (never read whole here).
    contrast_limits : (float, float) or None
        Intensity window passed to the engine (None: percentile/min-max).
    geometry : Geometry
        Scale, translate, units and axis labels of the result's axes.
    plane : list or None
        Plane mode on a stack: the index of every layer axis (None on the
        plane and channel axes); None otherwise.
    source : str
        Name of the image layer.
    channel_axis : int or "none"
        The channel axis in ``image``'s axes (``Settings.channel_axis`` of the run).
    run_on : {"plane", "stack"}
        The displayed plane, or every plane of the stack.
    kept_axes : tuple of int
        The layer axes the result has, in order.
    layer_ndim : int
        Number of layer axes (an RGB layer's colour axis is not one).
    """

    image: Any
    contrast_limits: tuple[float, float] | None
    geometry: Geometry
    plane: list[int | None] | None
    source: str
    channel_axis: int | str = "none"
    run_on: str = "plane"
    kept_axes: tuple[int, ...] = (0, 1)
    layer_ndim: int = 2

    @property
    def plane_note(self) -> str:
        """Human-readable note about the plane (empty unless one plane of a stack)."""
        if self.plane is None:
            return ""
        where = ", ".join(f"axis {a} = {i}" for a, i in enumerate(self.plane) if i is not None)
        return f"segmenting the displayed 2-D plane only ({where})"

    @property
    def lines_up(self) -> bool:
        """Whether the result lines up with the layer in napari (see :func:`lines_up`)."""
        return lines_up(self.kept_axes, self.layer_ndim)

    @property
    def alignment_note(self) -> str:
        """A warning when the result cannot line up with its layer ("" when it does)."""
        if self.lines_up:
            return ""
        dropped = [a for a in range(self.layer_ndim) if a not in self.kept_axes]
        return (
            f"the result keeps layer axes {self.kept_axes} and drops {tuple(dropped)} "
            "(the channel axis); napari lines layers up by their last axes, so it will not "
            "overlay the image until the channel axis comes first (e.g. np.moveaxis(data, "
            f"{dropped[-1]}, 0)) or the channels are split into layers"
        )

    def run_settings(self, settings: Settings) -> Settings:
        """``settings`` with the channel axis of :attr:`image`."""
        from napari_diffcut.pipeline.settings import make_settings

        return make_settings(settings, channel_axis=self.channel_axis)


@dataclass(frozen=True)
class LayerDefaults:
    """What a run of a layer defaults to, read from the layer alone.

    Attributes
    ----------
    channel_axis : int or None
        Channel axis in the data's axes (:func:`~napari_diffcut.plugin.layers.layer_channel_axis`).
    rgb : bool
        napari shows the layer as RGB(A): its last data axis is the colours.
    kept_axes : tuple of int
        Layer axes other than the channel axis.
    stack_shape : tuple of int
        Sizes of the kept axes before (Y, X) (() for a single plane).
    levels : int
        Pyramid levels (1 unless multiscale).
    dtype : str
        The data's dtype.
    contrast_limits : (float, float)
        The layer's contrast limits (how it is displayed).
    """

    channel_axis: int | None
    rgb: bool
    kept_axes: tuple[int, ...]
    stack_shape: tuple[int, ...]
    levels: int
    dtype: str
    contrast_limits: tuple[float, float]

    @property
    def n_planes(self) -> int:
        """Number of (Y, X) planes."""
        return int(np.prod(self.stack_shape)) if self.stack_shape else 1

    @property
    def stacked(self) -> bool:
        """More than two non-channel axes: the run can cover one plane or all of them."""
        return bool(self.stack_shape)


def _image_layer(viewer: Any, layer: Any) -> Any:
    """Resolve ``layer`` (a layer or a layer name) to an Image layer of ``viewer``."""
    import napari.layers

    if isinstance(layer, str):
        if layer not in viewer.layers:
            names = [lay.name for lay in viewer.layers]
            raise ValueError(
                f"layer must be an image layer of the viewer, got {layer!r}; layers: {names}"
            )
        layer = viewer.layers[layer]
    if not isinstance(layer, napari.layers.Image):
        raise ValueError(
            f"layer must be a napari Image layer (grey, RGB or 16-bit), got "
            f"{type(layer).__name__} {getattr(layer, 'name', layer)!r}"
        )
    return layer


def _levels(layer: Any) -> list[Any]:
    """The layer's arrays: its pyramid levels (largest first), or its one array."""
    if getattr(layer, "multiscale", False):
        return list(layer.data)
    return [layer.data]


def _data_channel_axis(layer: Any, channel_axis: Any) -> int | None:
    """The channel axis in the layer's data axes: the layer's own, or checked ``channel_axis``."""
    rgb = bool(getattr(layer, "rgb", False))
    data_ndim = int(layer.ndim) + (1 if rgb else 0)
    if channel_axis is None or (isinstance(channel_axis, str) and channel_axis == LAYER_DEFAULT):
        return layer_channel_axis(data_ndim, rgb, getattr(layer, "axis_labels", None))
    if isinstance(channel_axis, str) and channel_axis.lower() == NO_CHANNEL_AXIS:
        axis = None
    elif isinstance(channel_axis, int | np.integer) and not isinstance(channel_axis, bool):
        if not -data_ndim <= int(channel_axis) < data_ndim:
            axis = -1  # reported below
        else:
            axis = int(channel_axis) % data_ndim
    else:
        axis = -1
    if axis == -1 or (rgb and axis != data_ndim - 1):
        what = f"{data_ndim - 1} (its RGB axis)" if rgb else f"0..{data_ndim - 1} or 'none'"
        raise ValueError(
            f"channel_axis must be 'layer' (the layer's own), or an axis of layer "
            f"{layer.name!r} with data shape {tuple(_levels(layer)[0].shape)}: {what}; "
            f"got {channel_axis!r}"
        )
    return axis


def layer_defaults(layer: Any, channel_axis: Any = LAYER_DEFAULT) -> LayerDefaults:
    """Defaults of a run on an image layer: channels, stack, pyramid (issue #4 point 6).

    Parameters
    ----------
    layer : napari.layers.Image
        Any object with napari's ``data``, ``ndim``, ``rgb``, ``multiscale``,
        ``axis_labels`` and ``contrast_limits``.
    channel_axis : "layer", "none" or int
        The channel axis in the data's axes ("layer": the layer's own).
    """
    cax = _data_channel_axis(layer, channel_axis)
    ndim = int(layer.ndim)
    kept = tuple(a for a in range(ndim) if a != cax)
    if len(kept) < 2:
        raise ValueError(
            f"layer {layer.name!r} needs two axes besides the channel axis {cax}, got {ndim} axes"
        )
    shape = tuple(int(n) for n in _levels(layer)[0].shape)
    lo, hi = layer.contrast_limits
    return LayerDefaults(
        channel_axis=cax,
        rgb=bool(getattr(layer, "rgb", False)),
        kept_axes=kept,
        stack_shape=tuple(shape[a] for a in kept[:-2]),
        levels=len(_levels(layer)),
        dtype=str(np.dtype(_levels(layer)[0].dtype)),
        contrast_limits=(float(lo), float(hi)),
    )


def _snapshot(array: Any, budget_bytes: int) -> Any:
    """What a run reads: numpy data copied (up to the budget), lazy data as it is.

    A copy keeps the worker from seeing later changes to the layer. dask
    arrays are immutable graphs (napari paints them by replacing the graph),
    so they need none; zarr and other stores are read on demand, never whole.
    numpy data beyond the budget is used in place (do not paint the source
    layer during such a run).
    """
    if isinstance(array, np.ndarray):
        return np.array(array, copy=True) if array.nbytes <= budget_bytes else array
    return array


def _take(array: Any, index: tuple[Any, ...]) -> Any:
    """``array[index]`` without reading it when it is lazy (zarr goes through dask)."""
    if isinstance(array, np.ndarray) or hasattr(array, "dask"):
        return array[index]
    return as_dask(array)[index]


def layer_image(
    viewer: Any,
    layer: Any,
    *,
    contrast_limits: Any = None,
    run_on: str = "plane",
    channel_axis: Any = LAYER_DEFAULT,
    memory_budget: int = DEFAULT_BUDGET_MIB,
) -> LayerImage:
    """Take the image to segment from a layer: the displayed plane, or the whole stack.

    Parameters
    ----------
    viewer : napari.Viewer or None
        Gives the displayed plane of stacks in plane mode (None: only
        single planes and ``run_on="stack"`` are accepted).
    layer : napari.layers.Image or str
        The image layer (or its name when ``viewer`` is given): numpy, dask
        or zarr data, or a multiscale pyramid.
    contrast_limits : None, "layer" or (low, high)
        None (default): the run's ``Settings.normalize`` (percentiles), as
        in the CLI and the Python API; "layer": the layer's contrast limits
        (what you see); a pair: that window.
    run_on : {"plane", "stack"}
        For a layer with more than two non-channel axes: the plane now
        displayed (default), or every plane (the result has the stack's shape).
    channel_axis : "layer", "none" or int
        Channel axis in the layer data's axes; "layer" (default): the
        layer's own (RGB, or an axis labelled "c"/"channel", else none).
    memory_budget : int
        MiB: numpy data up to this size is copied for the run.

    Returns
    -------
    LayerImage
    """
    if run_on not in RUN_ON:
        raise ValueError(f"run_on must be one of {RUN_ON}, got {run_on!r}")
    if viewer is not None:
        layer = _image_layer(viewer, layer)
    defaults = layer_defaults(layer, channel_axis)
    cax = defaults.channel_axis
    kept = defaults.kept_axes
    ndim = int(layer.ndim)
    budget = int(memory_budget) * (1 << 20)
    levels = _levels(layer)
    limits = _contrast_limits(layer, contrast_limits)
    if not defaults.stacked or run_on == "stack":
        image_axis: int | str = NO_CHANNEL_AXIS if cax is None else cax
        taken = [_snapshot(level, budget) for level in levels]
        return LayerImage(
            taken if len(taken) > 1 else taken[0],
            limits,
            axes_geometry(layer, kept),
            None,
            layer.name,
            image_axis,
            run_on if defaults.stacked else "plane",
            kept,
            ndim,
        )
    if viewer is None:
        raise ValueError(
            f"layer {layer.name!r} is a stack of {defaults.n_planes} planes: pass the viewer "
            "to pick the displayed plane, or run_on='stack'"
        )
    plane_axes = displayed_plane_axes(
        ndim, int(viewer.dims.ndim), tuple(viewer.dims.displayed), kept[-2:]
    )
    whole = (*plane_axes, *([cax] if cax is not None and cax < ndim else []))
    position = layer.world_to_data(viewer.dims.point)
    index, plane = plane_selection(levels[0].shape[:ndim], position, whole)
    # Pyramid levels that also shrink the stack axes would index another plane.
    factors = np.asarray(getattr(layer, "downsample_factors", np.ones((1, ndim))), float)
    stack_axes = [a for a in range(ndim) if a not in whole]
    same = [k for k in range(len(levels)) if np.allclose(factors[k][stack_axes], 1.0)]
    taken = [_snapshot(_take(levels[k], index), budget) for k in same]
    image_axis = NO_CHANNEL_AXIS if cax is None else sum(1 for a in plane_axes if a < cax)
    return LayerImage(
        taken if len(taken) > 1 else taken[0],
        limits,
        axes_geometry(layer, plane_axes),
        plane,
        layer.name,
        image_axis,
        run_on,
        tuple(plane_axes),
        ndim,
    )


def _contrast_limits(layer: Any, contrast_limits: Any) -> tuple[float, float] | None:
    if contrast_limits is None:
        return None
    if isinstance(contrast_limits, str):
        if contrast_limits != FROM_LAYER:
            raise ValueError(
                "contrast_limits must be 'layer', a (low, high) pair or None, "
                f"got {contrast_limits!r}"
            )
        lo, hi = layer.contrast_limits
        return (float(lo), float(hi))
    try:
        lo, hi = (float(v) for v in contrast_limits)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not lo < hi:
        raise ValueError(
            "contrast_limits must be 'layer', (low, high) with low < high, or "
            f"None, got {contrast_limits!r}"
        )
    return (lo, hi)


def intensity_record(contrast_limits: tuple[float, float] | None, normalize: Any) -> dict[str, Any]:
    """The settings-record entries saying how intensities were mapped.

    ``{"intensity": "contrast_limits", "contrast_limits": [low, high]}`` for a
    window, else ``{"intensity": "percentiles"}`` (``normalize`` a pair),
    ``"minmax"`` (``normalize`` None) or the name of another rule.

    Examples
    --------
    >>> intensity_record(None, (1.0, 99.8))
    {'intensity': 'percentiles'}
    >>> intensity_record((0, 4095), (1.0, 99.8))
    {'intensity': 'contrast_limits', 'contrast_limits': [0.0, 4095.0]}
    """
    if contrast_limits is not None:
        lo, hi = contrast_limits
        return {"intensity": "contrast_limits", "contrast_limits": [float(lo), float(hi)]}
    if normalize is None:
        return {"intensity": "minmax"}
    if isinstance(normalize, str):
        return {"intensity": normalize}
    return {"intensity": "percentiles"}


def record_intensity(seg: Any, contrast_limits: tuple[float, float] | None) -> None:
    """Write :func:`intensity_record` into ``seg.settings`` (saved with the result).

    Without a window the engine's own record stands where it has one: it
    names the rule the data actually got (bright 8-bit data is divided by 255,
    dim 8-bit and 16-bit data get the percentiles; ``core.image.intensity_rule``).
    """
    settings = getattr(seg, "settings", None)
    if isinstance(settings, dict):
        entry = intensity_record(contrast_limits, settings.get("normalize"))
        if contrast_limits is None and settings.get("intensity"):
            entry["intensity"] = settings["intensity"]
        settings.update(entry)
