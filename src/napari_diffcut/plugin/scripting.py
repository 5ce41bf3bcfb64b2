"""Scripted napari sessions: segment a layer in the calling thread, no widget needed.

:func:`segment_layer` adds (or updates in place) exactly the layers the DiffCut
dock widget adds, so a notebook or script and a click give the same result.
It works with a viewer that was never shown (``napari.Viewer(show=False)``).
The helpers here (:func:`layer_defaults`, :func:`layer_image`,
:func:`apply_result_layers`, :func:`recut_layer`) are what the widget itself
calls on the GUI thread.

Layers of any size (issue #4): the displayed plane or the whole stack
(``run_on``), a channel axis read from the layer (RGB, or an axis labelled
"c"/"channel"), numpy, dask or zarr data (lazy data is never read whole
here: the engine reads it plane by plane, tile by tile) and multiscale
pyramids (the engine runs on the level nearest its working size; the labels
have level 0's size).

napari is imported inside the functions only, so importing this module is
cheap; the functions need napari installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_diffcut.core.image import NO_CHANNEL_AXIS
from napari_diffcut.plugin.layers import (
    ExistingLayer,
    Geometry,
    LayerDataTuple,
    LayerPlan,
    axes_geometry,
    diffcut_meta,
    displayed_plane_axes,
    is_edited,
    is_result_of,
    layer_channel_axis,
    lines_up,
    plan_layer_updates,
    plane_selection,
    result_kind,
    result_layer_data,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.segmentation import Segmentation
    from napari_diffcut.pipeline.settings import Progress, Settings

#: ``contrast_limits`` value meaning "use the image layer's contrast limits".
FROM_LAYER = "layer"
#: ``channel_axis`` value meaning "the layer's own" (see :func:`layer_defaults`).
LAYER_DEFAULT = "layer"
#: What a run covers for a layer with more than two (non-channel) axes.
RUN_ON = ("plane", "stack")
#: Memory budget (MiB) when none is given: numpy data up to it is copied for a run.
_DEFAULT_BUDGET_MIB = 512


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
    from napari_diffcut.plugin.layers import as_dask

    return as_dask(array)[index]


def layer_image(
    viewer: Any,
    layer: Any,
    *,
    contrast_limits: Any = FROM_LAYER,
    run_on: str = "plane",
    channel_axis: Any = LAYER_DEFAULT,
    memory_budget: int = _DEFAULT_BUDGET_MIB,
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
    contrast_limits : "layer", (low, high) or None
        "layer" (default): map intensities through the layer's contrast
        limits, so the model sees what you see (what makes 16-bit images
        work); a pair: that window; None: the engine's percentile
        normalisation (``Settings.normalize``).
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


def update_layer(layer: Any, data: Any, kwargs: dict[str, Any]) -> None:
    """Write a result tuple into an existing Labels layer (keeps its visibility).

    Metadata first: listeners of the data event (the hierarchy editor) must
    see the new segmentation, not the one the old labels came from.
    """
    layer.metadata = kwargs["metadata"]
    layer.features = kwargs["features"]
    layer.data = data
    for key in ("scale", "translate", "units", "axis_labels"):
        if key in kwargs:
            setattr(layer, key, kwargs[key])


def apply_result_layers(viewer: Any, tuples: list[LayerDataTuple]) -> tuple[list[Any], LayerPlan]:
    """Add or update result layers in ``viewer`` following :func:`plan_layer_updates`.

    Must run on the GUI thread. Edited result layers and layers that are not
    ours are never changed: the new result goes to a new layer and a
    notification says where. New layers are added levels first, so the main
    layer ends up on top.

    Returns
    -------
    layers : list of napari.layers.Labels
        In the order of ``tuples`` (main layer first).
    plan : LayerPlan
        What was updated, added, removed or protected.
    """
    import napari.layers

    existing = [
        ExistingLayer(lay.name, lay.data, lay.metadata, isinstance(lay, napari.layers.Labels))
        for lay in viewer.layers
    ]
    plan = plan_layer_updates(existing, tuples)
    for name in plan.remove:
        viewer.layers.remove(name)
    placed: dict[int, Any] = {}
    order = list(range(1, len(plan.steps))) + [0]
    for i in order:
        name, update, (data, kwargs, _kind) = plan.steps[i]
        if update:
            layer = viewer.layers[name]
            update_layer(layer, data, kwargs)
        else:
            layer = viewer.add_labels(data, **{**kwargs, "name": name})
        placed[i] = layer
    _tuck_new_levels_below_main(viewer, plan, placed)
    if plan.protected:
        from napari.utils.notifications import show_info

        moved = "; ".join(f"{old!r} -> {new!r}" for old, new in plan.protected)
        show_info(
            "DiffCut kept layers you edited (or that are not DiffCut results) and "
            f"wrote the new result next to them: {moved}"
        )
    return [placed[i] for i in range(len(plan.steps))], plan


def _tuck_new_levels_below_main(viewer: Any, plan: LayerPlan, placed: dict[int, Any]) -> None:
    """Keep the layer list tidy: new level layers go right below the main one."""
    if 0 not in placed:
        return
    for i in sorted(placed):
        if i == 0 or plan.steps[i][1]:  # the main layer, or an existing layer
            continue
        src = viewer.layers.index(placed[i].name)
        dest = viewer.layers.index(placed[0].name)
        if src > dest:
            viewer.layers.move(src, dest)


def find_result(viewer: Any, source: str) -> tuple[Segmentation, Any] | None:
    """The segmentation shown for image ``source`` and its main layer, or None.

    Prefers an unedited main layer (the one a re-run or a re-cut updates),
    lowest ``[n]`` suffix first; falls back to the last main layer.
    """
    import napari.layers

    mains = [
        lay
        for lay in viewer.layers
        if isinstance(lay, napari.layers.Labels)
        and is_result_of(lay.metadata, source, "main")
        and diffcut_meta(lay.metadata).get("segmentation") is not None  # type: ignore[union-attr]
    ]
    if not mains:
        return None
    unedited = [lay for lay in mains if not is_edited(lay.data, lay.metadata)]
    layer = unedited[0] if unedited else mains[-1]
    return diffcut_meta(layer.metadata)["segmentation"], layer  # type: ignore[index]


def recut_layer(viewer: Any, layer: Any, threshold: float | str) -> list[Any]:
    """Re-cut the result of image ``layer`` at another NCut threshold, instantly.

    No model and no eigen solve: the tree is pruned at ``threshold`` and the
    main and level layers are updated in place (edited layers are kept, see
    :func:`apply_result_layers`). The segmentation's own threshold setting is
    set too, so ``Segmentation.labels`` and a saved result match the layer.
    A whole-stack result re-cuts every plane's tree (and matches the planes
    again with ``consistent_stack``).

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari.layers.Image or str
        The source image layer (or its name).
    threshold : "auto" or float in (0, 1]

    Returns
    -------
    list of napari.layers.Labels
        Main layer first, then levels; empty when ``layer`` has no result.

    Raises
    ------
    ValueError
        The result cannot be re-cut (a tiled result, or a stack whose trees
        were not kept: :func:`~napari_diffcut.plugin.layers.recut_refusal`).
    """
    from napari_diffcut.core.errors import check_threshold

    source = layer if isinstance(layer, str) else layer.name
    setting = check_threshold(threshold)
    found = find_result(viewer, source)
    if found is None:
        return []
    seg, main = found
    meta = diffcut_meta(main.metadata) or {}
    tuples = result_layer_data(
        seg,
        source,
        threshold=setting,
        geometry=axes_geometry(main),
        plane=meta.get("plane"),
    )
    set_segmentation_threshold(seg, setting)
    layers, _ = apply_result_layers(viewer, tuples)
    return layers


def set_segmentation_threshold(seg: Any, threshold: float | str) -> None:
    """Make ``seg.labels`` (and its settings record) follow the threshold shown.

    2-D results only: a stack keeps the labels of its run (its layers record
    the threshold shown in their metadata), a tiled result has no threshold
    to change.
    """
    from napari_diffcut.core.errors import check_threshold

    setting = check_threshold(threshold)
    if result_kind(seg) != "tree":
        return
    seg.hierarchy.threshold_setting = setting
    seg.settings["threshold"] = setting


def result_tuples(seg: Any, taken: LayerImage) -> list[LayerDataTuple]:
    """Layer-data tuples of a run on ``taken`` (main first, then levels)."""
    return result_layer_data(seg, taken.source, geometry=taken.geometry, plane=taken.plane)


def warn_alignment(taken: LayerImage) -> None:
    """A napari warning when the result will not overlay its layer (see :class:`LayerImage`)."""
    if not taken.lines_up:
        from napari.utils.notifications import show_warning

        show_warning(f"DiffCut: {taken.alignment_note}")


def segment_layer(
    viewer: napari.Viewer,
    layer: Any,
    *,
    engine: DiffCutEngine | None = None,
    progress: Callable[[Progress], None] | None = None,
    contrast_limits: Any = FROM_LAYER,
    run_on: str = "plane",
    **settings: Any,
) -> list[Any]:
    """Segment an image layer in the calling thread and add the result layers.

    Adds, or updates in place, exactly the layers the DiffCut widget makes:
    ``"<image> diffcut"`` (visible, at the chosen threshold) and, for a 2-D
    result, ``"<image> diffcut level d"`` (hidden), with features and
    metadata (see :mod:`napari_diffcut.plugin.layers`). Layers you painted on are
    never overwritten: the new result goes to a new layer instead. The image
    layer and every other layer are left unchanged.

    Parameters
    ----------
    viewer : napari.Viewer
        May be hidden (``napari.Viewer(show=False)``).
    layer : napari.layers.Image or str
        The image layer, or its name: numpy, dask or zarr data, or a
        multiscale pyramid (run on the level nearest the working size;
        labels at level 0's size, lazy beyond ``memory_budget``).
    engine : DiffCutEngine, optional
        Reuse a loaded model across calls (a fresh engine loads it each call).
    progress : callable, optional
        Called with each :class:`~napari_diffcut.pipeline.settings.Progress` event
        (stacks add "plane" events, tiled runs "tile" and "stitch").
    contrast_limits : "layer", (low, high) or None
        Intensity window (see :func:`layer_image`). When ``normalize`` is
        passed and this is left at "layer", the percentiles are used instead.
    run_on : {"plane", "stack"}
        For a layer with more than two non-channel axes: the displayed 2-D
        plane (default), or the whole stack, plane by plane (one Labels
        layer with the stack's shape, no level layers).
    **settings
        :class:`~napari_diffcut.pipeline.settings.Settings` fields: model, backbone,
        device, mode, power, graph, threshold, min_size, max_depth, seed,
        channels, normalize, working_size, tile_size, tile_overlap,
        consistent_stack, memory_budget, ... ``channel_axis`` is an axis of
        the layer's data, or "none"; by default (or None) the layer's own:
        the colour axis of an RGB layer, else an axis labelled "c" or
        "channel", else none.

    Returns
    -------
    list of napari.layers.Labels
        The main layer first, then level 1, 2, ... (2-D results only).

    Examples
    --------
    >>> import napari, napari_diffcut as nd  # doctest: +SKIP
    >>> viewer = napari.Viewer(show=False)  # doctest: +SKIP
    >>> image = viewer.open_sample("napari-diffcut", "blood_smear")[0]  # doctest: +SKIP
    >>> out = nd.segment_layer(viewer, image, backbone="pixels")  # doctest: +SKIP
    """
    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.engine import drain
    from napari_diffcut.pipeline.settings import make_settings

    if (
        "normalize" in settings
        and isinstance(contrast_limits, str)
        and contrast_limits == FROM_LAYER
    ):
        contrast_limits = None
    channel_axis = settings.pop("channel_axis", LAYER_DEFAULT)
    base = make_settings(None, **settings)  # unknown names and bad values fail first
    taken = layer_image(
        viewer,
        layer,
        contrast_limits=contrast_limits,
        run_on=run_on,
        channel_axis=channel_axis,
        memory_budget=base.memory_budget,
    )
    engine = engine if engine is not None else DiffCutEngine()
    gen = engine.iter_segment(
        taken.image, taken.run_settings(base), contrast_limits=taken.contrast_limits
    )
    seg = drain(gen, progress)
    layers, _ = apply_result_layers(viewer, result_tuples(seg, taken))
    warn_alignment(taken)
    return layers
