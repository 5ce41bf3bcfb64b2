"""Scripted napari sessions: segment a layer in the calling thread, no widget needed.

:func:`segment_layer` adds (or updates in place) exactly the layers the DiffCut
dock widget adds, so a notebook or script and a click give the same result.
It works with a viewer that was never shown (``napari.Viewer(show=False)``).
The helpers here (:func:`layer_image`, :func:`apply_result_layers`,
:func:`recut_layer`) are what the widget itself calls on the GUI thread.

napari is imported inside the functions only, so importing this module is
cheap; the functions need napari installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut._layers import (
    ExistingLayer,
    Geometry,
    LayerDataTuple,
    LayerPlan,
    diffcut_meta,
    displayed_plane_axes,
    is_edited,
    is_result_of,
    plan_layer_updates,
    plane_geometry,
    plane_selection,
    result_layer_data,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_diffcut.engine import DiffCutEngine, Progress, Segmentation

#: ``contrast_limits`` value meaning "use the image layer's contrast limits".
FROM_LAYER = "layer"


@dataclass
class LayerImage:
    """The 2-D image a run sees, taken from an image layer on the GUI thread.

    Attributes
    ----------
    image : ndarray
        (Y, X) or (Y, X, C) copy of the plane now displayed.
    contrast_limits : (float, float) or None
        Intensity window passed to the engine (None: percentile/min-max).
    geometry : Geometry
        Scale, translate, units and axis labels of the plane axes.
    plane : list or None
        Index of every non-plane axis (None on plane axes); None for 2-D layers.
    source : str
        Name of the image layer.
    """

    image: NDArray[Any]
    contrast_limits: tuple[float, float] | None
    geometry: Geometry
    plane: list[int | None] | None
    source: str

    @property
    def plane_note(self) -> str:
        """Human-readable note about the plane (empty for 2-D layers)."""
        if self.plane is None:
            return ""
        where = ", ".join(f"axis {a} = {i}" for a, i in enumerate(self.plane) if i is not None)
        return f"segmenting the displayed 2-D plane only ({where})"


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


def layer_image(viewer: Any, layer: Any, *, contrast_limits: Any = FROM_LAYER) -> LayerImage:
    """Take the image to segment from a layer: the whole layer, or the displayed plane.

    Parameters
    ----------
    viewer : napari.Viewer or None
        Gives the displayed plane of layers with more than two dimensions
        (None: only 2-D layers are accepted).
    layer : napari.layers.Image or str
        The image layer (or its name when ``viewer`` is given).
    contrast_limits : "layer", (low, high) or None
        "layer" (default): map intensities through the layer's contrast
        limits, so the model sees what you see (what makes 16-bit images
        work); a pair: that window; None: the engine's percentile
        normalisation (``Settings.normalize``).

    Returns
    -------
    LayerImage
    """
    if viewer is not None:
        layer = _image_layer(viewer, layer)
    if getattr(layer, "multiscale", False):
        raise ValueError(
            f"layer {layer.name!r} is multiscale; segmenting multiscale data is not "
            "supported yet. Add one pyramid level as its own layer "
            "(viewer.add_image(layer.data[k])) "
            "and segment that"
        )
    ndim = int(layer.ndim)
    if ndim > 2 and viewer is None:
        raise ValueError(
            f"layer {layer.name!r} has {ndim} dimensions: pass the viewer to pick the plane"
        )
    if ndim > 2:
        axes = displayed_plane_axes(ndim, int(viewer.dims.ndim), tuple(viewer.dims.displayed))
        position = layer.world_to_data(viewer.dims.point)
        index, plane = plane_selection(layer.data.shape[:ndim], position, axes)
        raw = layer.data[index]
    else:
        axes, plane, raw = (0, 1), None, layer.data
    image = np.array(raw, copy=True)  # the worker must not see later changes
    limits = _contrast_limits(layer, contrast_limits)
    return LayerImage(image, limits, plane_geometry(layer, axes), plane, layer.name)


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
    """
    from napari_diffcut.errors import check_threshold

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
        geometry=plane_geometry(main),
        plane=meta.get("plane"),
    )
    set_segmentation_threshold(seg, setting)
    layers, _ = apply_result_layers(viewer, tuples)
    return layers


def set_segmentation_threshold(seg: Any, threshold: float | str) -> None:
    """Make ``seg.labels`` (and its settings record) follow the threshold shown."""
    from napari_diffcut.errors import check_threshold

    setting = check_threshold(threshold)
    seg.hierarchy.threshold_setting = setting
    seg.settings["threshold"] = setting


def result_tuples(seg: Segmentation, taken: LayerImage) -> list[LayerDataTuple]:
    """Layer-data tuples of a run on ``taken`` (main first, then levels)."""
    return result_layer_data(seg, taken.source, geometry=taken.geometry, plane=taken.plane)


def segment_layer(
    viewer: napari.Viewer,
    layer: Any,
    *,
    engine: DiffCutEngine | None = None,
    progress: Callable[[Progress], None] | None = None,
    contrast_limits: Any = FROM_LAYER,
    **settings: Any,
) -> list[Any]:
    """Segment an image layer in the calling thread and add the result layers.

    Adds, or updates in place, exactly the layers the DiffCut widget makes:
    ``"<image> diffcut"`` (visible, at the chosen threshold) and
    ``"<image> diffcut level d"`` (hidden), with features and metadata (see
    :mod:`napari_diffcut._layers`). Layers you painted on are never
    overwritten: the new result goes to a new layer instead. The image layer
    and every other layer are left unchanged. For a layer with more than two
    dimensions, the displayed 2-D plane is segmented.

    Parameters
    ----------
    viewer : napari.Viewer
        May be hidden (``napari.Viewer(show=False)``).
    layer : napari.layers.Image or str
        The image layer, or its name.
    engine : DiffCutEngine, optional
        Reuse a loaded model across calls (a fresh engine loads it each call).
    progress : callable, optional
        Called with each :class:`~napari_diffcut.engine.Progress` event.
    contrast_limits : "layer", (low, high) or None
        Intensity window (see :func:`layer_image`). When ``normalize`` is
        passed and this is left at "layer", the percentiles are used instead.
    **settings
        :class:`~napari_diffcut.engine.Settings` fields: model, backbone,
        device, mode, power, graph, threshold, min_size, max_depth, seed,
        channels, normalize, ...

    Returns
    -------
    list of napari.layers.Labels
        The main layer first, then level 1, 2, ...

    Examples
    --------
    >>> import napari, napari_diffcut as nd  # doctest: +SKIP
    >>> viewer = napari.Viewer(show=False)  # doctest: +SKIP
    >>> image = viewer.open_sample("napari-diffcut", "blood_smear")[0]  # doctest: +SKIP
    >>> out = nd.segment_layer(viewer, image, backbone="pixels")  # doctest: +SKIP
    """
    from napari_diffcut.engine import DiffCutEngine, drain

    if (
        "normalize" in settings
        and isinstance(contrast_limits, str)
        and contrast_limits == FROM_LAYER
    ):
        contrast_limits = None
    taken = layer_image(viewer, layer, contrast_limits=contrast_limits)
    engine = engine if engine is not None else DiffCutEngine()
    gen = engine.iter_segment(taken.image, contrast_limits=taken.contrast_limits, **settings)
    seg = drain(gen, progress)
    layers, _ = apply_result_layers(viewer, result_tuples(seg, taken))
    return layers
